"""Sequential layer-by-layer pass: one block on the compute device at a time.

    inputs = capture_block_inputs(...)
    for i, block in blocks:
        block -> device
        visit(i, block, inputs)          # collect statistics with hooks, prune ...
        inputs.hidden = block(inputs)    # the *pruned* block's outputs feed the next block
        block -> offload device
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapter import ModelAdapter
from .capture import BlockInputs

log = logging.getLogger(__name__)


def block_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_block(block: nn.Module, i: int, inputs: BlockInputs) -> list[torch.Tensor]:
    """Outputs of block i for every batch (kept where the inputs are)."""
    outs = []
    for b, hidden in enumerate(inputs.hidden):
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
def input_hooks(linears: dict[str, nn.Module], fn: Callable[[str, torch.Tensor], None]):
    """Call fn(name, x) with the input of each linear on every forward; hooks always removed on exit."""
    handles = []
    try:
        for name, module in linears.items():
            handles.append(module.register_forward_hook(
                lambda m, args, out, name=name: fn(name, args[0].detach())))
        yield
    finally:
        for h in handles:
            h.remove()


def sequential_pass(adapter: ModelAdapter, inputs: BlockInputs, device,
                    visit: Callable[[int, nn.Module, BlockInputs], None], offload_device=None,
                    desc: str = "blocks", propagate: bool = True) -> None:
    """Visit every block in order with its block on `device`; then replace inputs.hidden by its outputs.

    `visit` may prune the block: the next block then sees the pruned model's activations. Afterwards each
    block goes to `offload_device`, by default back where it was (a block already on the device stays).
    """
    for i, block in enumerate(tqdm(adapter.blocks, desc=desc, leave=False)):
        home = offload_device or next(block.parameters()).device
        block.to(device)
        visit(i, block, inputs)
        if propagate:
            inputs.hidden = run_block(block, i, inputs)
        block.to(home)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def collect(block: nn.Module, i: int, linears: dict[str, nn.Module], inputs: BlockInputs,
            fn: Callable[[str, torch.Tensor], None]) -> None:
    """Run block i over all calibration batches, feeding every linear's input to fn(name, x)."""
    with input_hooks(linears, fn):
        run_block(block, i, inputs)
