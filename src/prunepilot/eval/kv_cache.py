"""The KV-cache argument of a causal LM's forward, across transformers versions: `cache` since 5.x (which still
takes the old `past_key_values` with a FutureWarning, until its removal in 5.40), `past_key_values` before."""
from __future__ import annotations

import inspect


def cache_kwarg(model, cache) -> dict:
    """{name: cache} under the name `model.forward` takes."""
    params = inspect.signature(model.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


def returned_cache(out):
    """The cache a forward with use_cache=True returned (`cache` in 5.x outputs, `past_key_values` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values
