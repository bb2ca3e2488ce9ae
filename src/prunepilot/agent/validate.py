"""Strict validation of a controller's (untrusted) output. Nothing in it is ever executed.

Accepted: one JSON object (optionally inside a ```json fence or surrounded by prose, as small chat
models like to write) with exactly the keys reasoning (string), stop_pruning (boolean) and
layer_decisions (list of {layer: known layer name, extra_sparsity: number in [0.01, 0.15]}), no
duplicate layers or keys, and at least one layer unless stop_pruning is true. Anything else raises
DecisionError with a short message (quoted values are cut) that is fed back to the controller on the
retry. Outputs longer than MAX_RAW characters are refused before parsing.
"""
from __future__ import annotations

import json
import math
import re

from .decision import MAX_EXTRA, MIN_EXTRA, Decision, LayerDecision

MAX_REASONING = 4000  # characters kept in the journal
MAX_RAW = 500_000     # characters of controller output parsed at all (a decision over 1000 layers is ~80K)


class DecisionError(ValueError):
    """The controller's output is not a valid decision."""


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)


def _short(value, n: int = 80) -> str:
    """repr of a value from the controller, cut to n characters (it goes into logs and the next prompt)."""
    text = repr(value)
    return text if len(text) <= n else text[:n] + f"... ({len(text)} chars)"


def _no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    dup = next((k for k in keys if keys.count(k) > 1), None)
    if dup is not None:
        raise DecisionError(f"key {_short(dup)} appears twice in one object")
    return dict(pairs)


def _loads(text: str):
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except (RecursionError, OverflowError, ValueError) as e:  # JSONDecodeError is a ValueError
        if isinstance(e, json.JSONDecodeError) or isinstance(e, DecisionError):
            raise
        raise DecisionError(f"output cannot be parsed ({type(e).__name__})") from None


def _extract_json(text: str):
    text = text.strip()
    if len(text) > MAX_RAW:
        raise DecisionError(f"output is {len(text)} characters long; the limit is {MAX_RAW}")
    try:
        return _loads(text)
    except json.JSONDecodeError:
        pass
    m = _FENCE.search(text)
    if m:
        try:
            return _loads(m.group(1))
        except json.JSONDecodeError:
            pass
    a, b = text.find("{"), text.rfind("}")
    if a >= 0 and b > a:
        try:
            return _loads(text[a:b + 1])
        except json.JSONDecodeError as e:
            raise DecisionError(f"output is not valid JSON ({e.msg} at char {e.pos})") from None
    raise DecisionError("output holds no JSON object")


def _finite(x: int | float) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an int too large for a float
        return False


def parse_decision(raw, known_layers, source: str = "") -> Decision:
    """raw: str (model text) or an already-parsed dict. known_layers: the names the controller may use."""
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace")
    data = _extract_json(raw) if isinstance(raw, str) else raw
    if not isinstance(data, dict):
        raise DecisionError(f"expected a JSON object, got {type(data).__name__}")
    keys = {"reasoning", "stop_pruning", "layer_decisions"}
    missing, unknown = keys - data.keys(), data.keys() - keys
    if missing:
        raise DecisionError(f"missing key(s): {', '.join(sorted(missing))}")
    if unknown:
        raise DecisionError(f"unknown key(s): {_short(', '.join(sorted(map(str, unknown))), 200)}")
    reasoning, stop, items = data["reasoning"], data["stop_pruning"], data["layer_decisions"]
    if not isinstance(reasoning, str):
        raise DecisionError("reasoning must be a string")
    if not isinstance(stop, bool):
        raise DecisionError(f"stop_pruning must be true or false, got {_short(stop)}")
    if not isinstance(items, list):
        raise DecisionError("layer_decisions must be a list")
    known = set(known_layers)
    decisions, seen = [], set()
    for k, item in enumerate(items):
        if not isinstance(item, dict):
            raise DecisionError(f"layer_decisions[{k}] must be an object")
        if set(item) != {"layer", "extra_sparsity"}:
            raise DecisionError(f"layer_decisions[{k}] must have exactly the keys layer and extra_sparsity")
        layer, extra = item["layer"], item["extra_sparsity"]
        if not isinstance(layer, str) or layer not in known:
            raise DecisionError(f"layer_decisions[{k}]: unknown layer {_short(layer)}")
        if layer in seen:
            raise DecisionError(f"layer_decisions[{k}]: layer {layer} appears twice")
        if isinstance(extra, bool) or not isinstance(extra, (int, float)) or not _finite(extra):
            raise DecisionError(f"layer_decisions[{k}]: extra_sparsity must be a number, got {_short(extra)}")
        if not (MIN_EXTRA <= extra <= MAX_EXTRA):
            raise DecisionError(f"layer_decisions[{k}]: extra_sparsity {_short(extra)} outside [{MIN_EXTRA}, {MAX_EXTRA}]")
        seen.add(layer)
        decisions.append(LayerDecision(layer, float(extra)))
    if not decisions and not stop:
        raise DecisionError("no layer chosen and stop_pruning is false")
    return Decision(reasoning[:MAX_REASONING], stop, decisions, source=source)
