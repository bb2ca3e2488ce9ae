"""Strict validation of a controller's (untrusted) output. Nothing in it is ever executed.

One pydantic model per set of layer names (``decision_model``) is both the validator and the source of the
JSON schema sent to structured-output servers (``decision_schema``), so the two cannot drift apart:

- ``reasoning`` (string), ``stop_pruning`` (boolean), ``layer_decisions`` (list of {``layer``: one of the known
  names, ``extra_sparsity``: number in [0.01, 0.15]}), no other key, strict types (no "0.05", no true for a
  number, no NaN), no layer twice, at least one layer unless stop_pruning is true.
- The schema is a little tighter than the validator where that helps a constrained decoder: extra_sparsity is
  offered as an enum of steps 0.01, 0.02, ... 0.15 (llama.cpp's grammar ignores numeric minimum/maximum), and
  optional generation limits (reasoning maxLength, layer_decisions maxItems) bound what a small model writes.
  The validator accepts any number in range (the built-in policy's 0.0734 too) and cuts long reasoning.

Accepted text: one JSON object, optionally in a ```json fence or surrounded by prose (as small chat models
like to write). Anything else raises DecisionError with a short message (quoted values are cut) that is fed
back to the controller on the retry. Cost is linear in the reply: outputs longer than MAX_RAW characters are
refused before parsing, duplicate keys are found with a set, and fences are found with str.find (each
character is looked at a bounded number of times: no regex backtracking, which made an unclosed fence followed
by whitespace quadratic). At most three candidate texts are parsed (the whole reply, the first closed fence, the
outermost braces), and a reply whose parse runs past PARSE_TIME_LIMIT_S is refused as invalid, never a hang.
"""
from __future__ import annotations

import functools
import json
import time
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, create_model, model_validator

from .decision import MAX_EXTRA, MIN_EXTRA, Decision, LayerDecision

MAX_REASONING = 4000  # characters kept in the journal
MAX_RAW = 500_000     # characters of controller output parsed at all (a decision over 1000 layers is ~80K)
STEP = 0.01           # the schema offers extra_sparsity in steps of STEP from MIN_EXTRA to MAX_EXTRA
KEYS = ("reasoning", "stop_pruning", "layer_decisions")
PARSE_TIME_LIMIT_S = 2.0  # wall-clock budget of parsing one reply (linear: a MAX_RAW reply takes milliseconds)
FENCE = "```"


class DecisionError(ValueError):
    """The controller's output is not a valid decision."""


def _short(value, n: int = 80) -> str:
    """repr of a value from the controller, cut to n characters (it goes into logs and the next prompt)."""
    text = repr(value)
    return text if len(text) <= n else text[:n] + f"... ({len(text)} chars)"


def extra_steps() -> list[float]:
    """The extra_sparsity values the schema offers: MIN_EXTRA, MIN_EXTRA + STEP, ..., MAX_EXTRA."""
    n = round((MAX_EXTRA - MIN_EXTRA) / STEP)
    return [round(MIN_EXTRA + k * STEP, 4) for k in range(n + 1)]


# ------------------------------------------------------------------------------------------ the model

class _DecisionBase(BaseModel):
    """Checks no JSON schema can state: distinct layers, and something to do unless stopping."""
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="after")
    def _consistent(self):
        seen = set()
        for k, item in enumerate(self.layer_decisions):
            if item.layer in seen:
                raise ValueError(f"layer_decisions[{k}]: layer {item.layer} appears twice")
            seen.add(item.layer)
        if not self.layer_decisions and not self.stop_pruning:
            raise ValueError("no layer chosen and stop_pruning is false")
        return self


@functools.lru_cache(maxsize=16)
def _model(names: tuple[str, ...], max_items: int | None, reasoning_chars: int | None) -> type[BaseModel]:
    extra = Annotated[float, Field(ge=MIN_EXTRA, le=MAX_EXTRA, allow_inf_nan=False),
                      WithJsonSchema({"type": "number", "enum": extra_steps()})]
    layer = Literal[names] if names else str
    item = create_model("LayerChoice", __config__=ConfigDict(extra="forbid", strict=True),
                        layer=(layer, ...), extra_sparsity=(extra, ...))
    return create_model(
        "PruningDecision", __base__=_DecisionBase,
        reasoning=(str, Field(json_schema_extra={"maxLength": reasoning_chars} if reasoning_chars else None)),
        stop_pruning=(bool, ...),
        layer_decisions=(list[item], Field(json_schema_extra={"maxItems": max_items} if max_items else None)))


def decision_model(layer_names=None, max_items: int | None = None,
                   reasoning_chars: int | None = None) -> type[BaseModel]:
    """The pydantic model of a decision over `layer_names` (any string when None); cached per name set.
    max_items / reasoning_chars only tighten the generated schema (generation limits), not validation."""
    names = tuple(sorted(set(layer_names))) if layer_names else ()
    return _model(names, max_items, reasoning_chars)


def _inline_refs(node, defs: dict):
    """The schema with every local $ref replaced by its definition (some servers do not follow $ref)."""
    if isinstance(node, dict):
        if "$ref" in node:
            return _inline_refs(defs[node["$ref"].rsplit("/", 1)[-1]], defs)
        return {k: _inline_refs(v, defs) for k, v in node.items() if k not in ("title", "$defs")}
    if isinstance(node, list):
        return [_inline_refs(v, defs) for v in node]
    return node


def decision_schema(layer_names=None, max_items: int | None = None, reasoning_chars: int | None = None) -> dict:
    """JSON schema of a decision (from decision_model), self-contained, properties in the order to write them."""
    schema = decision_model(layer_names, max_items, reasoning_chars).model_json_schema()
    return _inline_refs(schema, schema.get("$defs", {}))


# ------------------------------------------------------------------------------------------ parsing

def _no_duplicate_keys(pairs):
    """object_pairs_hook: refuse an object that names a key twice (linear: one set)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise DecisionError(f"key {_short(k)} appears twice in one object")
            seen.add(k)
    return out


def _loads(text: str):
    try:
        # strict=False: control characters (a raw newline) inside strings are accepted; llama.cpp's JSON grammar
        # lets a model write them in the reasoning, and they are harmless there
        return json.loads(text, object_pairs_hook=_no_duplicate_keys, strict=False)
    except (RecursionError, OverflowError, ValueError) as e:  # JSONDecodeError is a ValueError
        if isinstance(e, (json.JSONDecodeError, DecisionError)):
            raise
        raise DecisionError(f"output cannot be parsed ({type(e).__name__})") from None


def _fenced(text: str) -> str | None:
    """The body of the first closed ``` fence (an optional `json` tag after the opening cut), or None. Linear:
    two str.find calls, no backtracking."""
    start = text.find(FENCE)
    if start < 0:
        return None
    end = text.find(FENCE, start + len(FENCE))
    if end < 0:
        return None
    body = text[start + len(FENCE):end]
    return body[4:] if body.startswith("json") else body


def _check_time(started: float, limit_s: float) -> None:
    if time.monotonic() - started > limit_s:
        raise DecisionError(f"output could not be parsed within {limit_s:g} s")


def _extract_json(text: str, limit_s: float = PARSE_TIME_LIMIT_S):
    if len(text) > MAX_RAW:  # before any scan
        raise DecisionError(f"output is {len(text)} characters long; the limit is {MAX_RAW}")
    started = time.monotonic()
    text = text.strip()
    try:
        return _loads(text)
    except json.JSONDecodeError:
        pass
    _check_time(started, limit_s)
    body = _fenced(text)
    if body is not None:
        try:
            return _loads(body)
        except json.JSONDecodeError:
            pass
        _check_time(started, limit_s)
    a, b = text.find("{"), text.rfind("}")
    if a >= 0 and b > a:
        try:
            return _loads(text[a:b + 1])
        except json.JSONDecodeError as e:
            raise DecisionError(f"output is not valid JSON ({e.msg} at char {e.pos})") from None
    raise DecisionError("output holds no JSON object")


def _where(loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _message(err: ValidationError) -> str:
    """One short line for the first problem (what a model needs to fix its next answer)."""
    errors = err.errors(include_url=False)
    first = errors[0]
    where, kind = _where(first["loc"]), first["type"]
    if kind == "value_error":
        return str(first.get("ctx", {}).get("error", first["msg"]))
    if kind == "literal_error" and where.endswith(".layer"):
        return f"{where.rsplit('.', 1)[0]}: unknown layer {_short(first['input'])}"
    if kind == "extra_forbidden":
        keys = [str(e["loc"][-1]) for e in errors if e["type"] == "extra_forbidden" and e["loc"][:-1] == first["loc"][:-1]]
        return f"{where.rsplit('.', 1)[0] if '.' in where else 'decision'}: unknown key(s): {_short(', '.join(keys), 120)}"
    if kind == "missing":
        return f"missing key: {where}"
    if kind in ("greater_than_equal", "less_than_equal"):
        return f"{where} {_short(first['input'])} outside [{MIN_EXTRA}, {MAX_EXTRA}]"
    return f"{where}: {first['msg'].lower()}, got {_short(first.get('input'))}"


def parse_decision(raw, known_layers, source: str = "") -> Decision:
    """raw: str (model text) or an already-parsed dict. known_layers: the names the controller may use."""
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace")
    data = _extract_json(raw) if isinstance(raw, str) else raw
    if not isinstance(data, dict):
        raise DecisionError(f"expected a JSON object, got {type(data).__name__}")
    missing, unknown = [k for k in KEYS if k not in data], data.keys() - set(KEYS)
    if missing:
        raise DecisionError(f"missing key(s): {', '.join(missing)}")
    if unknown:
        raise DecisionError(f"unknown key(s): {_short(', '.join(sorted(map(str, unknown))), 200)}")
    try:
        reply = decision_model(known_layers).model_validate(data)
    except ValidationError as e:
        raise DecisionError(_message(e)) from None
    decisions = [LayerDecision(d.layer, float(d.extra_sparsity)) for d in reply.layer_decisions]
    return Decision(reply.reasoning[:MAX_REASONING], reply.stop_pruning, decisions, source=source)
