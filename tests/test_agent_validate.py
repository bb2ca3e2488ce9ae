"""The decision validator: bad and hostile replies, fenced JSON, key counts, the schema from the same model."""
import json

import pytest

from prunepilot.agent import parse_decision
from prunepilot.agent.validate import DecisionError

from agent_helpers import BAD, GOOD, NAMES, reply_with


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


# --------------------------------------------------------------------------------------- validator

@pytest.mark.parametrize("kind", sorted(BAD))
def test_validator_rejects_bad_output(kind):
    with pytest.raises(DecisionError):
        parse_decision(BAD[kind], NAMES)


def test_validator_bounds_hostile_output():
    layer = json.dumps(NAMES[0])
    hostile = {
        "huge value": json.dumps(reply_with(stop_pruning="x" * 2_000_000)),
        "deep nesting": '{"reasoning": ' + "[" * 100_000 + "]" * 100_000 + "}",
        "huge int": '{"reasoning": "", "stop_pruning": false, "layer_decisions": [{"layer": ' + layer
                    + ', "extra_sparsity": 1' + "0" * 400 + "}]}",
        "duplicate key": '{"reasoning": "a", "reasoning": "b", "stop_pruning": true, "layer_decisions": []}',
        "too long": json.dumps(reply_with(reasoning="y" * 600_000)),
    }
    for kind, text in hostile.items():
        with pytest.raises(DecisionError) as err:
            parse_decision(text, NAMES)
        assert len(str(err.value)) < 300, kind  # messages go into the retry prompt and the journal


def test_validator_accepts_fenced_or_wrapped_json_and_stop():
    d = parse_decision("Sure!\n```json\n" + json.dumps(GOOD) + "\n```\nGood luck.", NAMES)
    assert d.extras() == {NAMES[0]: 0.05} and not d.stop_pruning
    d = parse_decision("Here: " + json.dumps({**GOOD, "stop_pruning": True, "layer_decisions": []}), NAMES)
    assert d.stop_pruning and d.layer_decisions == []
    assert parse_decision(GOOD, NAMES).extras() == {NAMES[0]: 0.05}  # dicts pass through the same checks


# ------------------------------------------------------------------------ hostile replies and secrets

def _b36(i):
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        out, i = digits[i % 36] + out, i // 36
        if not i:
            return out


def test_validator_rejects_a_huge_key_count_fast():
    """60K keys in a reply just under the size cap: rejected in linear time (63K keys took 56 s when the
    duplicate-key check was quadratic), with a short message."""
    import time

    from prunepilot.agent.validate import MAX_RAW

    keys = [_b36(i) for i in range(60_000)]
    flat = "{" + ",".join(f'"{k}":0' for k in keys) + "}"
    cases = {
        "top-level keys": flat,
        "item keys": '{"reasoning":"","stop_pruning":false,"layer_decisions":[' + flat[:-30].rsplit(",", 1)[0] + "}]}",
        "one key repeated": "{" + ",".join(f'"k":{i % 10}' for i in range(60_000)) + "}",
        "duplicate at the end": flat[:-1] + ',"0":1}',
    }
    for kind, text in cases.items():
        assert 300_000 < len(text) <= MAX_RAW, kind
        t0 = time.perf_counter()
        with pytest.raises(DecisionError) as err:
            parse_decision(text, NAMES)
        assert time.perf_counter() - t0 < 2.0, kind
        assert len(str(err.value)) < 300, kind


def test_schema_comes_from_the_validator_model():
    """One pydantic model: its schema offers the layer enum and the sparsity steps; it validates the same fields."""
    from prunepilot.agent.validate import decision_model, decision_schema, extra_steps

    schema = decision_schema(NAMES, max_items=3, reasoning_chars=50)
    assert list(schema["properties"]) == ["reasoning", "stop_pruning", "layer_decisions"]
    assert schema["required"] == ["reasoning", "stop_pruning", "layer_decisions"]
    item = schema["properties"]["layer_decisions"]["items"]
    assert item["properties"]["layer"]["enum"] == sorted(NAMES) and item["additionalProperties"] is False
    assert item["properties"]["extra_sparsity"]["enum"] == extra_steps() == [round(0.01 * k, 2) for k in range(1, 16)]
    assert schema["properties"]["layer_decisions"]["maxItems"] == 3
    assert schema["properties"]["reasoning"]["maxLength"] == 50
    assert "$ref" not in json.dumps(schema) and "$defs" not in schema
    model = decision_model(NAMES)
    assert model.model_validate(json.loads(reply_with(reasoning="r"))).layer_decisions[0].layer == NAMES[0]
    assert parse_decision(reply_with(layer_decisions=[{"layer": NAMES[0], "extra_sparsity": 0.0734}]), NAMES).extras() == {
        NAMES[0]: 0.0734}  # validation accepts any number in range (the built-in policy's), the schema offers steps


def test_validator_accepts_a_raw_newline_inside_the_reasoning():
    """llama.cpp's JSON grammar lets a model put a raw control character in a string (seen with SmolLM2)."""
    text = '{"reasoning": "prune\nthe first\tone", "stop_pruning": false, "layer_decisions": [{"layer": "%s", ' \
           '"extra_sparsity": 0.1}]}' % NAMES[0]
    assert parse_decision(text, NAMES).reasoning == "prune\nthe first\tone"
