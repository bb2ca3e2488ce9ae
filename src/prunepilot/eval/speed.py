"""Prefill and decode throughput of a causal LM (the point of structured pruning: a faster model).

    prefill: one forward over (batch, seq_len) random tokens with the KV cache on   -> batch*seq_len / s
             logits of the last position only (logits_to_keep=1, as a serving stack computes them) when the
             model's forward accepts it: all positions' logits would add batch*seq_len*vocab head work that
             structured pruning does not touch (eval/flops.py)
    decode:  new_tokens greedy single-token steps reusing that cache               -> batch*new_tokens / s
Warm-up runs first; the reported numbers are medians over `repeats` runs.
"""
from __future__ import annotations

import inspect
import statistics
import time

import torch

from .kv_cache import cache_name, returned_cache


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _last_logits_only(model) -> dict:
    """{"logits_to_keep": 1} when the model's forward takes it (transformers' causal LMs), else {}."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


@torch.inference_mode()
def _run_once(model, ids: torch.Tensor, new_tokens: int, prefill_kwargs: dict) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of one generation of new_tokens after the prompt ids (batch, seq)."""
    device, kv = ids.device, cache_name(model)
    _sync(device)
    t0 = time.perf_counter()
    out = model(ids, use_cache=True, **prefill_kwargs)
    _sync(device)
    t1 = time.perf_counter()
    cache = returned_cache(out)
    nxt = out.logits[:, -1:].argmax(-1)  # (batch, 1)
    for _ in range(new_tokens):
        out = model(nxt, use_cache=True, **{kv: cache})
        cache = returned_cache(out)
        nxt = out.logits[:, -1:].argmax(-1)
    _sync(device)
    return t1 - t0, time.perf_counter() - t1


def measure_speed(model, seq_len: int = 128, batch: int = 1, new_tokens: int = 32, repeats: int = 3,
                  warmup: int = 1, seed: int = 0) -> dict:
    """Median prefill and decode throughput in tokens per second (plus the protocol used)."""
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=gen).to(device)  # (batch, seq_len)
    prefill_kwargs = _last_logits_only(model)  # looked up once, outside the timed forwards
    was_training = model.training
    model.eval()
    for _ in range(warmup):
        _run_once(model, ids, min(new_tokens, 4), prefill_kwargs)
    runs = [_run_once(model, ids, new_tokens, prefill_kwargs) for _ in range(repeats)]
    model.train(was_training)
    prefill = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    return {"prefill_tok_s": batch * seq_len / prefill,
            "decode_tok_s": batch * new_tokens / decode if new_tokens else 0.0,
            "seq_len": seq_len, "batch": batch, "new_tokens": new_tokens, "repeats": repeats,
            "prefill_logits": "last" if prefill_kwargs else "all"}
