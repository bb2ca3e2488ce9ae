"""Where the caller's tensors live is the caller's business: the engine moves the embedding stage and one
block at a time to the compute device while it works, and the public entry points (prune, structured
pruning, the agent loop, sequential perplexity) put every parameter and buffer back on the device it had on
entry. A model that lives on the GPU stays there; a model on the CPU pruned with device="cuda" comes back
whole on the CPU, instead of split between the two."""
from __future__ import annotations

import functools
import logging
from contextlib import contextmanager

import torch
import torch.nn as nn

from ..errors import PrunepilotError

log = logging.getLogger(__name__)


def resolve_device(name: str | None) -> torch.device:
    """'auto' / None: cuda when available, else cpu; anything else must name an available device."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise PrunepilotError(f"unknown device {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PrunepilotError(f"device {name} requested but CUDA is not available")
    return dev


def tensor_devices(model: nn.Module) -> dict[str, object]:
    """{qualified parameter / buffer name: device}."""
    where = {f"p:{n}": p.device for n, p in model.named_parameters(remove_duplicate=False)}
    where.update({f"b:{n}": b.device for n, b in model.named_buffers(remove_duplicate=False) if b is not None})
    return where


def restore_devices(model: nn.Module, where: dict[str, object]) -> None:
    """Move every parameter / buffer recorded in `where` back to its device (parameters keep their identity;
    tensors created since, e.g. by structured slicing under the same name, follow the recorded device too)."""
    for mod_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        for name, p in list(module.named_parameters(recurse=False)):
            dev = where.get(f"p:{prefix}{name}")
            if dev is not None and p.device != dev:
                p.data = p.data.to(dev)
        for name, b in list(module.named_buffers(recurse=False)):
            dev = where.get(f"b:{prefix}{name}")
            if b is not None and dev is not None and b.device != dev:
                module._buffers[name] = b.to(dev)


@contextmanager
def kept_placement(model: nn.Module):
    where = tensor_devices(model)
    try:
        yield
    except BaseException:
        try:  # put things back, but never let a failure here hide the error that got us here
            restore_devices(model, where)
        except Exception as e:  # noqa: BLE001
            log.warning("could not move the model back where it was after an error: %s", e)
        raise
    restore_devices(model, where)


def keeps_placement(fn):
    """Decorator for entry points whose first argument is the model."""
    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        with kept_placement(model):
            return fn(model, *args, **kwargs)
    return wrapper
