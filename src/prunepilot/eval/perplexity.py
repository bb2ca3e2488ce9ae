"""Perplexity with the SparseGPT/Wanda protocol.

Rows are joined with "\\n\\n" and tokenized once (with the tokenizer's special tokens, as the reference
code does); the stream is cut into non-overlapping windows of `seqlen` tokens (the tail shorter than a
window is dropped) and every window is scored independently. PPL = exp(total NLL / predicted tokens).
Every result records the dataset, seqlen, number of windows and tokens scored.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import distributed
from ..data import TextSource, load_documents, tokenize_stream
from ..engine import ModelAdapter, blocks, blocks_bypassed, keeps_placement
from ..engine.offload import is_offloaded
from ..errors import PrunepilotError
from ..engine.model_config import context_length, default_eval_seqlen


def _windows(tokens: torch.Tensor, seqlen: int, max_windows: int | None, model=None) -> torch.Tensor:
    """The first non-overlapping windows of `seqlen` tokens (the tail shorter than a window is dropped)."""
    if seqlen < 2:
        raise PrunepilotError(f"perplexity seqlen must be >= 2, got {seqlen}")
    if model is not None and seqlen > context_length(model, default=seqlen):
        raise PrunepilotError(f"perplexity seqlen {seqlen} exceeds the model's context of {context_length(model)} "
                              f"tokens; choose a shorter window")
    n_windows = tokens.numel() // seqlen
    if max_windows is not None:
        if max_windows < 1:
            raise PrunepilotError(f"max_windows must be >= 1 (or unset for the whole set), got {max_windows}")
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise PrunepilotError(f"text has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    return tokens[: n_windows * seqlen].view(n_windows, seqlen)  # (windows, seqlen)


def _window_nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Summed next-token NLL of a batch of windows. logits (b, seqlen, vocab), ids (b, seqlen)."""
    logits = logits.float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                           reduction="sum").item()


def _result(total_nll: float, counted: int, seqlen: int, n_windows: int, t0: float) -> dict:
    nll = total_nll / counted
    return {"ppl": math.exp(nll) if nll < 700 else math.inf, "nll": nll, "seqlen": seqlen,
            "windows": n_windows, "tokens": counted, "seconds": round(time.time() - t0, 2)}


@torch.no_grad()
def perplexity_of_tokens(model, tokens: torch.Tensor, seqlen: int, batch_size: int = 1,
                         max_windows: int | None = None, device=None, desc: str = "ppl") -> dict:
    """tokens: (n_tokens,) long. Returns {"ppl", "nll", "seqlen", "windows", "tokens", "seconds"}."""
    windows = _windows(tokens, seqlen, max_windows, model)
    mine = distributed.shard(windows)  # torchrun: this rank's windows; the sums are all-reduced
    device = device or next(model.parameters()).device
    total_nll, counted = 0.0, 0
    t0 = time.time()
    for i in tqdm(range(0, mine.shape[0], batch_size), desc=desc, leave=False):
        ids = mine[i:i + batch_size].to(device)
        total_nll += _window_nll(model(ids, use_cache=False).logits, ids)
        counted += ids[:, 1:].numel()
    return _result(distributed.total(total_nll), int(distributed.total(counted)), seqlen, windows.shape[0], t0)


@torch.no_grad()
@keeps_placement
def perplexity_sequential(model, tokens: torch.Tensor, seqlen: int, device, batch_size: int = 1,
                          max_windows: int | None = None, desc: str = "ppl") -> dict:
    """perplexity_of_tokens computed with the sequential engine: one decoder block on `device` at a time
    (the rest stays where it is, normally the CPU), so models larger than the device can be scored.
    Same windows, same result (up to float rounding)."""
    windows = _windows(tokens, seqlen, max_windows, model)  # (n, seqlen)
    t0 = time.time()
    adapter = ModelAdapter(model)
    mine = distributed.shard(windows)  # torchrun: this rank's windows; the sums are all-reduced
    run = blocks(adapter, mine, device, batch_size=batch_size, desc=desc, shard=False)
    for _ in run:  # the iterator moves every block's outputs on; nothing to do per block
        pass
    total_nll, counted = 0.0, 0
    with blocks_bypassed(adapter, run.inputs.block_returns_tuple) as injected:
        for b, hidden in enumerate(run.hidden):
            ids = mine[b * batch_size:(b + 1) * batch_size].to(device)
            injected["h"] = hidden.to(device)
            total_nll += _window_nll(model(ids, use_cache=False).logits, ids)
            counted += ids[:, 1:].numel()
    return _result(distributed.total(total_nll), int(distributed.total(counted)), seqlen, windows.shape[0], t0)


def perplexity(model, tokenizer, source: str | TextSource, seqlen: int | None = 2048, batch_size: int = 1,
               max_windows: int | None = None, device=None) -> dict:
    """Perplexity of `model` on a text source (a preset such as ``wikitext2``, a file, a folder ...).

    seqlen None: 2048, or the model's context when that is shorter."""
    src = TextSource.parse(source) if isinstance(source, str) else source
    seqlen = default_eval_seqlen(model) if seqlen is None else seqlen  # 0 is an error below, not "unset"
    tokens = tokenize_stream(tokenizer, load_documents(src), add_special_tokens=True)
    if is_offloaded(model):  # blocks on disk: one at a time through the sequential engine
        result = perplexity_sequential(model, tokens, seqlen, device or "cpu", batch_size, max_windows,
                                       desc=f"ppl {src.domain}")
    else:
        result = perplexity_of_tokens(model, tokens, seqlen, batch_size, max_windows, device, desc=f"ppl {src.domain}")
    return {"dataset": src.domain, "source": str(src), **result}
