"""Capture what every decoder block receives, without running the blocks.

Each block's ``forward`` is swapped for a stub that records its arguments (hidden states, attention
mask, position embeddings, cache position ... everything, positional and keyword) and passes the hidden
states straight through; the last stub stops the model forward. One cheap forward thus yields, per block,
the exact extra arguments the model would give it (sliding-window and global layers differ in Gemma, so
they are recorded per block, not copied from block 0). Only the embeddings and the modules outside the
blocks need to be on the compute device.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .adapter import ModelAdapter


class _StopForward(Exception):
    pass


@dataclass
class BlockInputs:
    """Calibration activations flowing through the blocks, one entry per batch.

    hidden[b]:     (batch, seq, hidden) input of the current block for batch b
    args[b][i]:    extra positional args block i receives for batch b
    kwargs[b][i]:  keyword args block i receives for batch b (use_cache=False)
    tags[b]:       the tag (e.g. calibration domain) of every row of batch b, when the pass was given tags
    current:       the batch being run now (engine.run_block sets it), so `tag` names its tag
    """
    hidden: list[torch.Tensor]
    args: list[list[tuple]] = field(default_factory=list)
    kwargs: list[list[dict]] = field(default_factory=list)
    block_returns_tuple: bool = False  # learnt when a block runs (GPT-2 blocks return tuples, Llama tensors)
    tags: list[str] | None = None
    current: int = 0

    @property
    def tag(self) -> str | None:
        """The tag of the batch being run now (None when the pass has no tags)."""
        return self.tags[self.current] if self.tags is not None else None

    def n_tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


def move_outside_blocks(model: nn.Module, adapter: ModelAdapter, device) -> None:
    """Move every module that is not a decoder block (embeddings, rotary, final norm, head) to device."""
    blocks = adapter.blocks

    def visit(module: nn.Module):
        for child in module.children():
            if child is blocks:
                continue
            if any(m is blocks for m in child.modules()):
                visit(child)
            else:
                child.to(device)
        for name, p in list(module.named_parameters(recurse=False)):
            p.data = p.data.to(device)
        for name, b in list(module.named_buffers(recurse=False)):
            module._buffers[name] = b.to(device)

    visit(model)


def _dedupe(value, reference):
    """Return `reference` where it holds the same tensors as `value`, so equal kwargs share memory."""
    if isinstance(value, torch.Tensor) and isinstance(reference, torch.Tensor):
        if value.shape == reference.shape and value.device == reference.device and torch.equal(value, reference):
            return reference
        return value
    if isinstance(value, (tuple, list)) and isinstance(reference, (tuple, list)) and len(value) == len(reference):
        return type(value)(_dedupe(v, r) for v, r in zip(value, reference))
    if isinstance(value, dict) and isinstance(reference, dict):
        return {k: _dedupe(v, reference.get(k)) for k, v in value.items()}
    return value


def tagged_batches(tags: list[str], batch_size: int) -> tuple[list[int], list[tuple[int, int]]]:
    """Batches whose rows share one tag: (order, spans). Rows are taken in `order` (with batch_size 1 the given
    order; else grouped by tag, tags in order of first appearance, rows of a tag in their given order) and
    spans [(start, stop)] index that reordered list, each at most batch_size rows of one tag."""
    n = len(tags)
    order = list(range(n))
    if batch_size > 1:
        first = {t: k for k, t in reversed(list(enumerate(tags)))}
        order.sort(key=lambda r: first[tags[r]])  # stable: a tag's rows keep their order
    spans, start = [], 0
    for k in range(1, n + 1):
        if k == n or k - start == batch_size or tags[order[k]] != tags[order[start]]:
            spans.append((start, k))
            start = k
    return order, spans


@torch.no_grad()
def capture_block_inputs(model: nn.Module, adapter: ModelAdapter, input_ids: torch.Tensor, device,
                         batch_size: int = 1, storage_device=None,
                         spans: list[tuple[int, int]] | None = None) -> BlockInputs:
    """Run the model's embedding stage on `input_ids` (n, seq) and record every block's arguments.

    Batches are `batch_size` consecutive rows, or the rows [start, stop) of each of `spans`.
    Hidden states are kept on `storage_device` (default: the compute device).
    """
    storage_device = storage_device or device
    move_outside_blocks(model, adapter, device)
    n_blocks = len(adapter.blocks)
    result = BlockInputs(hidden=[])
    originals = [b.forward for b in adapter.blocks]
    record: dict = {}

    def make_stub(i: int):
        def stub(*args, **kwargs):
            if args:
                hidden, rest = args[0], tuple(args[1:])
            else:
                hidden, rest = kwargs.pop("hidden_states"), ()
            if "use_cache" in kwargs:
                kwargs["use_cache"] = False
            if i == 0:
                record["hidden"] = hidden
            record.setdefault("args", []).append(rest)
            record.setdefault("kwargs", []).append(kwargs)
            if i == n_blocks - 1:
                raise _StopForward
            return hidden
        return stub

    try:
        for i, block in enumerate(adapter.blocks):
            block.forward = make_stub(i)
        n = input_ids.shape[0]
        for start, stop in spans or [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]:
            record.clear()
            try:
                model(input_ids[start:stop].to(device), use_cache=False)
            except _StopForward:
                pass
            args, kwargs = record["args"], record["kwargs"]
            if result.args:  # share tensors equal to the first batch's (masks, rotary tables ...)
                args = _dedupe(args, result.args[0])
                kwargs = _dedupe(kwargs, result.kwargs[0])
            result.hidden.append(record["hidden"].to(storage_device))
            result.args.append(args)
            result.kwargs.append(kwargs)
    finally:
        for block, fwd in zip(adapter.blocks, originals):
            del block.forward  # drop the instance attribute; the class method is back
            assert block.forward.__func__ is fwd.__func__
    return result
