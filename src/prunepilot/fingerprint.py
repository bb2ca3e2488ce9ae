"""Short hashes that say "same model" and "same masks" (agent journal headers and replays, evaluation checkpoints)."""
from __future__ import annotations

import hashlib

import numpy as np
import torch

PROBE = "The quick brown fox, 1234 — Ünïcödé?\nAnswer: A"


@torch.no_grad()
def model_fingerprint(model, tokenizer=None) -> str:
    """A short hash of the parameter names, shapes and per-parameter sum of |w| (not the path the model was
    loaded from: the same weights loaded from another folder match), and of the tokenizer when given (class,
    size, special ids and the encoding of a probe text)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"{name}{tuple(p.shape)}{float(p.detach().abs().sum(dtype=torch.float64)):.10e}".encode())
    if tokenizer is not None:
        size = len(tokenizer) if hasattr(tokenizer, "__len__") else None
        ids = list(tokenizer.encode(PROBE, add_special_tokens=False))
        h.update(f"{type(tokenizer).__name__}{size}{getattr(tokenizer, 'bos_token_id', None)}"
                 f"{getattr(tokenizer, 'eos_token_id', None)}{ids}".encode())
    return h.hexdigest()[:16]


def mask_fingerprint(weights: dict[str, torch.Tensor]) -> str:
    """sha256 over which entries of each named weight are zero: equal masks, equal hash."""
    h = hashlib.sha256()
    for name, w in weights.items():
        zero = (w.detach() == 0).to("cpu").contiguous().numpy()
        h.update(name.encode())
        h.update(np.packbits(zero).tobytes())
    return h.hexdigest()[:16]
