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

from ..data import TextSource, load_documents, tokenize_stream
from ..errors import PrunepilotError
from ..modeling import context_length, default_eval_seqlen


@torch.no_grad()
def perplexity_of_tokens(model, tokens: torch.Tensor, seqlen: int, batch_size: int = 1,
                         max_windows: int | None = None, device=None, desc: str = "ppl") -> dict:
    """tokens: (n_tokens,) long. Returns {"ppl", "nll", "seqlen", "windows", "tokens"}."""
    if seqlen < 2:
        raise PrunepilotError(f"perplexity seqlen must be >= 2, got {seqlen}")
    if seqlen > context_length(model, default=seqlen):
        raise PrunepilotError(f"perplexity seqlen {seqlen} exceeds the model's context of {context_length(model)} "
                              f"tokens; choose a shorter window")
    n_windows = tokens.numel() // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise PrunepilotError(f"text has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    device = device or next(model.parameters()).device
    windows = tokens[: n_windows * seqlen].view(n_windows, seqlen)  # (windows, seqlen)
    total_nll, counted = 0.0, 0
    t0 = time.time()
    for i in tqdm(range(0, n_windows, batch_size), desc=desc, leave=False):
        ids = windows[i:i + batch_size].to(device)
        logits = model(ids, use_cache=False).logits.float()  # (b, seqlen, vocab)
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                              reduction="sum")
        total_nll += nll.item()
        counted += ids[:, 1:].numel()
    nll = total_nll / counted
    return {"ppl": math.exp(nll) if nll < 700 else math.inf, "nll": nll, "seqlen": seqlen,
            "windows": n_windows, "tokens": counted, "seconds": round(time.time() - t0, 2)}


def perplexity(model, tokenizer, source: str | TextSource, seqlen: int | None = 2048, batch_size: int = 1,
               max_windows: int | None = None, device=None) -> dict:
    """Perplexity of `model` on a text source (a preset such as ``wikitext2``, a file, a folder ...).

    seqlen None: 2048, or the model's context when that is shorter."""
    src = TextSource.parse(source) if isinstance(source, str) else source
    seqlen = seqlen or default_eval_seqlen(model)
    tokens = tokenize_stream(tokenizer, load_documents(src), add_special_tokens=True)
    result = perplexity_of_tokens(model, tokens, seqlen, batch_size, max_windows, device, desc=f"ppl {src.domain}")
    return {"dataset": src.domain, "source": str(src), **result}
