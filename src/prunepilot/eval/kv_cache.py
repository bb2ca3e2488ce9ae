"""The KV-cache argument of a causal LM's forward, across transformers versions: `cache` since 5.x (which still
takes the old `past_key_values` with a FutureWarning, until its removal in 5.40), `past_key_values` before."""
from __future__ import annotations

import inspect


def cache_name(model) -> str:
    """The keyword `model.forward` takes its KV cache under (look it up once, outside a per-token loop)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(out):
    """The cache a forward with use_cache=True returned (`cache` in 5.x outputs, `past_key_values` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values
