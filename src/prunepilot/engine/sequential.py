"""The one sequential pass every calibration pass goes through: one decoder block on the compute device at a time.

    for blk in blocks(adapter, ids, device, states=lambda name, linear: State()):
        # blk.module is on the device; blk.states[name] has seen the inputs of blk.linears[name]
        ... prune blk.module (or only read its statistics) ...
    # the iterator itself moved every block's outputs on to the next block

outputs="pruned" (default): after the loop body, the block runs again and its (possibly pruned) outputs feed
the next block, so each block's statistics come from the pruned model's activations (SparseGPT, Wanda).
outputs="dense": the outputs of the statistics run itself (the block as it was before the body) feed the next
block: a statistics-only pass over the unpruned model (OWL ratios, FLAP's global ranking). No caller moves
activations by hand.

tags=[one string per row of ids] (e.g. each calibration sample's domain): every batch holds rows of one tag
(with batch_size > 1 the rows are grouped by tag first), and `pass_.tag` names the tag of the batch whose inputs
the states are being fed, so a state can keep per-tag statistics (moments.DomainMoments).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..statistic_state import StatisticState
from .adapter import ModelAdapter
from .capture import BlockInputs, capture_block_inputs, tagged_batches
from .moe import ExpertMatrix, routed_hook
from .offload import block_placed

log = logging.getLogger(__name__)


def block_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_block(block: nn.Module, i: int, inputs: BlockInputs) -> list[torch.Tensor]:
    """Outputs of block i for every batch (kept where the inputs are)."""
    outs = []
    for b, hidden in enumerate(inputs.hidden):
        inputs.current = b  # inputs.tag names this batch's tag while it runs
        dev = next(block.parameters()).device
        out = block(hidden.to(dev), *inputs.args[b][i], **inputs.kwargs[b][i])
        inputs.block_returns_tuple = isinstance(out, (tuple, list))
        outs.append(block_output(out).to(hidden.device))
    return outs


@contextlib.contextmanager
def blocks_bypassed(adapter: ModelAdapter, returns_tuple: bool):
    """While active every decoder block ignores its input and returns injected["h"], so a model forward
    runs only the modules outside the blocks: the embeddings, then the final norm and the head applied to
    the injected last hidden state, whatever the architecture. Yields the `injected` dict to fill."""
    injected: dict = {}

    def stub(*args, **kwargs):
        return (injected["h"],) if returns_tuple else injected["h"]

    try:
        for block in adapter.blocks:
            block.forward = stub
        yield injected
    finally:
        for block in adapter.blocks:
            vars(block).pop("forward", None)  # the class method is back


@contextlib.contextmanager
def input_hooks(linears: dict[str, nn.Module | ExpertMatrix], fn: Callable[[str, torch.Tensor], None]):
    """Call fn(name, x) with the input of each linear on every forward (for an expert matrix: the inputs of the
    tokens routed to that expert); hooks always removed on exit."""
    handles, experts = [], {}
    try:
        for name, module in linears.items():
            if isinstance(module, ExpertMatrix):
                experts.setdefault(id(module.module), (module.module, {}))[1][name] = module
                continue
            handles.append(module.register_forward_hook(
                lambda m, args, out, name=name: fn(name, args[0].detach())))
        for module, members in experts.values():
            handles.append(routed_hook(module, members, fn))
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class Block:
    """One decoder block during a pass: on the compute device, its statistics already collected."""
    index: int
    module: nn.Module
    linears: dict[str, nn.Module]                            # the observed linears (keys: the caller's names)
    states: dict[str, StatisticState] = field(default_factory=dict)  # one per observed linear
    inputs: BlockInputs | None = None                        # inputs.hidden: this block's input, every batch


class BlockPass:
    """Iterate over the decoder blocks of `adapter` on `device`, one at a time (see the module docstring).

    ids: (n, seq) token ids, captured here (embedding-only forward, `batch_size` rows per batch), or BlockInputs.
    states(name, linear) -> a StatisticState, .add(x) fed every input of that linear; None: no statistics.
    linears(i, block) -> {name: linear} to observe; default: the adapter's prunable linears of block i.
    tags: one string per row of ids (n,): batches of one tag each, `tag` names the current batch's (see above).
    After the loop, `hidden` holds the last block's outputs (one tensor per batch; with tags and batch_size > 1
    the rows are in the tag-grouped order).
    """

    def __init__(self, adapter: ModelAdapter, ids, device, *,
                 states: Callable[[str, nn.Module], StatisticState] | None = None,
                 linears: Callable[[int, nn.Module], dict[str, nn.Module]] | None = None,
                 outputs: Literal["pruned", "dense"] = "pruned", batch_size: int = 1, storage_device=None,
                 desc: str = "blocks", shard: bool = True, tags: list[str] | None = None):
        if outputs not in ("pruned", "dense"):
            raise ValueError(f"outputs must be 'pruned' or 'dense', got {outputs!r}")
        self.adapter, self.device, self.desc = adapter, device, desc
        self.make_state, self.outputs = states, outputs
        self.select = linears or (lambda i, block: adapter.linears(i))
        if isinstance(ids, BlockInputs):
            if tags is not None:
                raise ValueError("tags go with token ids; captured BlockInputs carry their own inputs.tags")
            self.inputs = ids
            return
        if shard:  # torchrun: this rank's share of the samples
            ids, tags = distributed.shard(ids), (None if tags is None else distributed.shard_list(list(tags)))
        self.inputs = self._capture(ids, tags, batch_size, storage_device)

    def _capture(self, ids: torch.Tensor, tags: list[str] | None, batch_size: int, storage_device) -> BlockInputs:
        """Embedding-only forward of ids (n, seq): batch_size rows per batch, or single-tag batches with tags."""
        if tags is None:
            return capture_block_inputs(self.adapter.model, self.adapter, ids, self.device, batch_size, storage_device)
        if len(tags) != ids.shape[0]:
            raise ValueError(f"{len(tags)} tags for {ids.shape[0]} rows of token ids")
        order, spans = tagged_batches(list(tags), batch_size)
        inputs = capture_block_inputs(self.adapter.model, self.adapter, ids[order], self.device, batch_size,
                                      storage_device, spans=spans)
        inputs.tags = [tags[order[start]] for start, _ in spans]
        return inputs

    @property
    def hidden(self) -> list[torch.Tensor]:
        return self.inputs.hidden

    @property
    def tag(self) -> str | None:
        """The tag of the batch whose inputs the states are being fed now (None without tags)."""
        return self.inputs.tag

    def __iter__(self) -> Iterator[Block]:
        for i in tqdm(range(len(self.adapter.blocks)), desc=self.desc, leave=False):
            with block_placed(self.adapter, i, self.device) as module:  # moved, or read from disk (offload)
                blk = Block(i, module, self.select(i, module), inputs=self.inputs)
                dense_out = self._observe(blk)
                yield blk
                self.inputs.hidden = dense_out if self.outputs == "dense" else run_block(module, i, self.inputs)

    def _observe(self, blk: Block) -> list[torch.Tensor] | None:
        """Run the block once with its linears' inputs fed to fresh states; return the outputs when they move on
        from this run (outputs="dense"), else None. Linears that read the same input tensor (q/k/v, gate/up)
        share one state, fed once per forward: the statistic of one input, computed once."""
        if self.make_state is None:
            return run_block(blk.module, blk.index, self.inputs) if self.outputs == "dense" else None
        seen: dict[tuple, tuple[str, torch.Tensor]] = {}  # inputs of this forward (kept alive: addresses stay unique)
        shares: dict[str, str] = {}      # linear -> the linear whose state it shares (decided in the first forward)

        fed: set[str] = set()            # linears whose own state has been fed

        def add(name: str, x: torch.Tensor) -> None:
            key = (x.data_ptr(), tuple(x.shape), x.dtype)
            first = seen.setdefault(key, (name, x))[0]
            if first != name and name not in fed and name not in shares:  # the same tensor as `first`: share
                shares[name] = first
                blk.states[name] = blk.states[first]
            if name in shares:
                if shares[name] != first:
                    raise RuntimeError(f"{name} shared {shares[name]}'s input in an earlier batch but not now")
                return                   # x was added for `first` already
            fed.add(name)
            blk.states[name].add(x)

        def new_forward(module, args):
            seen.clear()

        blk.states = {name: self.make_state(name, lin) for name, lin in blk.linears.items()}
        pre = blk.module.register_forward_pre_hook(new_forward)
        try:
            with input_hooks(blk.linears, add):
                out = run_block(blk.module, blk.index, self.inputs)
        finally:
            pre.remove()
        if distributed.world_size() > 1:  # every rank saw its share: merge, so every rank prunes alike
            for state in {id(s): s for s in blk.states.values()}.values():
                state.all_reduce()
        return out


blocks = BlockPass  # for blk in blocks(adapter, ids, device, states=...)
