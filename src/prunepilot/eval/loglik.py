"""Batched log-likelihood scoring of token requests, as lm-eval-harness does it (but faster on CPU).

A request is (context, continuation): its score is sum_i log p(cont_i | context, cont_<i). A request may
instead (or also) ask for the next-token log-probs of a few candidate ids after its context (MMLU letters).

Batching: requests are sorted by length (longest first) and right-padded; log-probs are gathered with
tensor ops. Right padding keeps every real token's position and causal view exactly as in a batch of one.

Only the positions that are scored get logits: the lm-head runs from the first position any row of a batch
predicts a continuation (or candidate) token from, not over the whole padded batch (for MMLU, a few positions
instead of the whole question: about a quarter less compute for a small model with a large vocabulary).

Prefix reuse: requests sharing their first `shared` tokens (a question's context for its choices, the
few-shot prefix of an MMLU subject) run those tokens once. The prefix KV cache is gathered per row and the
remaining tokens run on top of it, with an attention mask hiding the padding inside the cached prefixes and
explicit position ids. Exact up to float rounding for full-causal-attention transformers models; other
modules (and sliding-window models) take the plain path: one forward of context + continuation per row.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import PrunepilotError
from ..engine.model_config import context_length
from .kv_cache import cache_name, returned_cache

log = logging.getLogger(__name__)


@dataclass
class Request:
    context: list[int]                 # tokens conditioned on (non-empty)
    continuation: list[int]            # tokens whose log-probs are summed (may be empty)
    candidates: list[int] | None = None  # next-token log-probs wanted after context (needs empty continuation)
    shared: int | None = None          # leading context tokens other requests may share (default: all but last)


@dataclass
class Score:
    logprob: float                     # sum of continuation log-probs (0.0 for an empty continuation)
    greedy: bool                       # every continuation token is the argmax
    candidates: list[float] | None = None


# ----------------------------------------------------------------------------- tokenization helpers

def encode(tokenizer, text: str, add_bos: bool = False) -> list[int]:
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    bos = getattr(tokenizer, "bos_token_id", None)
    return [bos] + ids if add_bos and bos is not None else ids


def encode_pair(tokenizer, context: str, continuation: str, add_bos: bool = False) -> tuple[list[int], list[int]]:
    """lm-eval's _encode_pair: trailing context spaces move to the continuation; the continuation tokens are
    those of encode(context + continuation) beyond len(encode(context))."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = encode(tokenizer, context + continuation, add_bos)
    ctx = encode(tokenizer, context, add_bos)
    cont = whole[len(ctx):]
    if not cont:  # the tokenizer merged across the boundary: fall back to separate encoding
        cont = encode(tokenizer, continuation)
    if not ctx:  # empty context: condition on EOS/BOS as lm-eval does with its prefix token
        ctx = [getattr(tokenizer, "eos_token_id", None) or getattr(tokenizer, "bos_token_id", None) or 0]
    return ctx, cont


def truncate(req: Request, max_length: int) -> Request:
    """Drop context tokens from the left so that the model input fits in max_length (lm-eval style). A
    continuation that alone does not fit (one context token + all but its last token) is an error: scoring
    only part of it would change what is measured."""
    if len(req.continuation) > max_length:
        raise PrunepilotError(f"a choice of {len(req.continuation)} tokens does not fit the model's context of "
                              f"{max_length} tokens")
    n_input = len(req.context) + max(len(req.continuation) - 1, 0)
    drop = min(max(n_input - max_length, 0), len(req.context) - 1)
    if drop == 0:
        return req
    shared = None if req.shared is None else max(req.shared - drop, 0)
    return Request(req.context[drop:], req.continuation, req.candidates, shared)


def can_reuse_prefix(model) -> bool:
    """Prefix KV reuse needs a transformers model with plain (full) causal attention in every layer."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    if not isinstance(model, PreTrainedModel) or getattr(model.config, "is_encoder_decoder", False):
        return False
    cfg = model.config.get_text_config(decoder=True)
    if getattr(cfg, "sliding_window", None) or getattr(cfg, "attention_chunk_size", None):
        return False
    layer_types = getattr(cfg, "layer_types", None) or []
    return all(t == "full_attention" for t in layer_types)


# ----------------------------------------------------------------------------- batching

def _split(req: Request, reuse: bool) -> tuple[tuple[int, ...], list[int]]:
    """(shared prefix key, remaining input tokens). The remainder always holds >= 1 context token."""
    n = len(req.context) - 1 if req.shared is None else min(req.shared, len(req.context) - 1)
    n = n if reuse else 0
    rest = req.context[n:] + req.continuation[:-1]
    return tuple(req.context[:n]), rest


def _plan_batches(keys: list[tuple], rests: list[list[int]], batch_size: int) -> list[list[int]]:
    """Batches of request indices: rows of one prefix stay together, longest first; a prefix group larger
    than batch_size spans consecutive batches (its prefix is computed once). Rows without a prefix never
    share a batch with rows that have one."""
    groups: dict[tuple, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    for rows in groups.values():
        rows.sort(key=lambda i: -len(rests[i]))
    order = sorted(groups, key=lambda k: (not k, -(len(k) + len(rests[groups[k][0]]))))
    batches, cur = [], []
    for k in order:
        if not k and cur and keys[cur[0]]:  # switching to the no-prefix rows
            batches.append(cur)
            cur = []
        rows = groups[k]
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            if cur and (len(cur) + len(chunk) > batch_size or (start == 0 and len(rows) > batch_size)):
                batches.append(cur)
                cur = []
            cur = cur + chunk
    if cur:
        batches.append(cur)
    return batches


def _pad(seqs: list, device, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists -> ids (b, L) long, mask (b, L) long."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[r, :len(s)] = 1
    return ids.to(device), mask.to(device)


class _PrefixCache:
    """KV of the unique prefixes of a batch, memoised for the next batch when it has the same prefixes."""

    def __init__(self, model, device, stats: dict):
        self.model, self.device, self.stats = model, device, stats
        self.keys: list[tuple] = []
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.mask = self.lens = None

    def get(self, keys: list[tuple]):
        if keys != self.keys:
            self.keys = keys
            ids, self.mask = _pad(keys, self.device)  # (g, P)
            out = _forward(self.model, input_ids=ids, attention_mask=self.mask, use_cache=True, logits_to_keep=1)
            self.kv = [(layer[0], layer[1]) for layer in returned_cache(out)]  # each (g, heads, P, head_dim)
            self.lens = self.mask.sum(1)  # (g,)
            self.stats["prefix_tokens"] = self.stats.get("prefix_tokens", 0) + int(self.lens.sum())
        return self.kv, self.mask, self.lens


def _forward(model, **kwargs):
    try:
        return model(**kwargs)
    except TypeError:  # a model without logits_to_keep
        kwargs.pop("logits_to_keep", None)
        return model(**kwargs)


def _rest_forward(model, rests: list[list[int]], device, prefix_idx: list[int] | None = None,
                  prefix: tuple | None = None, start: int = 0) -> torch.Tensor:
    """Logits (b, R - start, vocab) of the remaining tokens from position `start` on, on top of the gathered
    prefix KV when there is one."""
    from transformers import DynamicCache

    ids, mask = _pad(rests, device)  # (b, R)
    keep = ids.shape[1] - start  # >= 1: the last position always predicts something
    if prefix_idx is None:
        return _last_logits(_forward(model, input_ids=ids, attention_mask=mask, use_cache=False,
                                     logits_to_keep=keep), keep)
    kv, pmask, plens = prefix
    idx = torch.tensor(prefix_idx, device=device)
    b = len(prefix_idx)
    if len(set(prefix_idx)) == 1:  # one prefix for the whole batch: expand instead of gathering copies
        past = [(k[idx[:1]].expand(b, -1, -1, -1), v[idx[:1]].expand(b, -1, -1, -1)) for k, v in kv]
    else:
        past = [(k[idx], v[idx]) for k, v in kv]  # each (b, kv_heads, P, head_dim)
    attn = torch.cat([pmask[idx], mask], dim=1)  # (b, P + R): hides the padding inside shorter prefixes
    pos = plens[idx, None] + torch.arange(ids.shape[1], device=device)  # (b, R) true positions
    out = _forward(model, input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True,
                   logits_to_keep=keep, **{cache_name(model): DynamicCache(past)})
    return _last_logits(out, keep)


def _last_logits(out, keep: int) -> torch.Tensor:
    """The last `keep` positions' logits (a model that ignored logits_to_keep returned all of them)."""
    return out.logits[:, -keep:]


def _first_scored(reqs: list[Request], rests: list[list[int]]) -> list[int]:
    """Per row, the input position whose logits predict the first continuation token (or the candidates)."""
    return [len(rest) - max(len(r.continuation) - 1, 0) - 1 for r, rest in zip(reqs, rests)]


def _gather(logits: torch.Tensor, reqs: list[Request], rests: list[list[int]]) -> list[Score]:
    """Sum the continuation log-probs of each row; pick candidate log-probs at the last input position.
    `logits` (b, R - start, vocab) start at start = min(_first_scored(...)), R = the longest rest."""
    b, R = len(rests), max(len(rest) for rest in rests)
    first = _first_scored(reqs, rests)
    start = min(first)
    assert logits.shape[1] == R - start, (logits.shape, R, start)
    logprobs = F.log_softmax(logits.float(), dim=-1)  # (b, R - start, vocab)
    targets = torch.zeros((b, R - start), dtype=torch.long, device=logits.device)
    tmask = torch.zeros((b, R - start), dtype=torch.bool, device=logits.device)
    for row, (r, f) in enumerate(zip(reqs, first)):
        n = len(r.continuation)
        targets[row, f - start:f - start + n] = torch.tensor(r.continuation, dtype=torch.long)
        tmask[row, f - start:f - start + n] = True
    tok_lp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (b, R - start)
    sums = torch.where(tmask, tok_lp, torch.zeros_like(tok_lp)).sum(1)  # (b,)
    greedy = ((logprobs.argmax(-1) == targets) | ~tmask).all(1)  # (b,)
    scores = []
    for row, (r, rest) in enumerate(zip(reqs, rests)):
        cand = None
        if r.candidates is not None:
            cand = logprobs[row, len(rest) - 1 - start, r.candidates].tolist()
        scores.append(Score(float(sums[row]), bool(greedy[row]), cand))
    return scores


# ----------------------------------------------------------------------------- public entry point

@torch.inference_mode()
def score_requests(model, requests: list[Request], batch_size: int = 8, device=None, reuse_prefix: bool | None = None,
                   max_length: int | None = None, desc: str = "loglik", stats: dict | None = None) -> list[Score]:
    """Score every request (see module docstring); results come back in the order of `requests`.

    reuse_prefix: None = automatic (transformers models with full causal attention), False = plain path.
    max_length: context is truncated from the left to fit (default: the model's max positions).
    stats: if given, receives the number of tokens run: "prefix_tokens" (shared, run once), "rest_tokens".
    """
    stats = {} if stats is None else stats
    if not requests:
        return []
    for r in requests:
        if not r.context:
            raise ValueError("a request needs at least one context token")
        if r.candidates is not None and r.continuation:
            raise ValueError("candidates are scored after the context: give an empty continuation")
    device = device or next(model.parameters()).device
    reuse = can_reuse_prefix(model) if reuse_prefix is None else reuse_prefix
    max_length = max_length or context_length(model)
    requests = [truncate(r, max_length) for r in requests]
    split = [_split(r, reuse) for r in requests]
    keys, rests = [s[0] for s in split], [s[1] for s in split]
    prefixes = _PrefixCache(model, device, stats) if reuse else None
    scores: list[Score | None] = [None] * len(requests)
    for batch in tqdm(_plan_batches(keys, rests, batch_size), desc=desc, leave=False):
        batch_keys = list(dict.fromkeys(keys[i] for i in batch))
        prefix_idx = prefix = None
        if reuse and all(batch_keys):
            prefix = prefixes.get(batch_keys)
            prefix_idx = [batch_keys.index(keys[i]) for i in batch]
        batch_reqs, batch_rests = [requests[i] for i in batch], [rests[i] for i in batch]
        start = min(_first_scored(batch_reqs, batch_rests))
        logits = _rest_forward(model, batch_rests, device, prefix_idx, prefix, start)
        stats["rest_tokens"] = stats.get("rest_tokens", 0) + sum(len(rest) for rest in batch_rests)
        for i, s in zip(batch, _gather(logits, batch_reqs, batch_rests)):
            scores[i] = s
    return scores
