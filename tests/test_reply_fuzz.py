"""Hostile controller replies are parsed in time linear in their length: random fences, whitespace runs,
nesting and many objects, each bounded per reply (an unclosed fence + 40,000 spaces took 8-10 s before)."""
import json
import random
import time

import pytest

from prunepilot.agent import parse_decision
from prunepilot.agent.validate import MAX_RAW, DecisionError

NAMES = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
GOOD = {"reasoning": "r", "stop_pruning": False, "layer_decisions": [{"layer": NAMES[0], "extra_sparsity": 0.05}]}
LIMIT_S = 2.0  # per reply: a linear parse of MAX_RAW characters takes milliseconds; the old regex, minutes


def _timed(text):
    t0 = time.monotonic()
    try:
        parse_decision(text, NAMES)
    except DecisionError:
        pass
    return time.monotonic() - t0


@pytest.mark.parametrize("text", [
    "```" + " " * (MAX_RAW - 4) + "x",                         # the reported hang: unclosed fence + whitespace
    "```json" + "\n" * (MAX_RAW - 8) + "x",
    "```" * (MAX_RAW // 3),                                    # fences only
    "{" * (MAX_RAW - 1) + "}",                                 # braces without end
    "[" * (MAX_RAW // 2) + "]" * (MAX_RAW // 2),               # nesting far beyond the recursion limit
    '{"a":' * (MAX_RAW // 6) + "1" + "}" * (MAX_RAW // 6),
    ("{}" + " " * 8) * (MAX_RAW // 10),                        # many objects
    " " * (MAX_RAW - 1) + "{",
], ids=["open-fence-spaces", "open-fence-newlines", "fences", "braces", "brackets", "objects-deep", "many-objects",
        "spaces-brace"])
def test_worst_case_replies_are_refused_in_bounded_time(text):
    assert len(text) <= MAX_RAW
    assert _timed(text) < LIMIT_S


def _random_reply(rng: random.Random) -> str:
    pieces = ["```", "```json", " " * rng.randint(0, 20_000), "\n" * rng.randint(0, 5_000), "{", "}", "[", "]",
              '"', ",", ":", json.dumps(GOOD), '{"a": 1}' * rng.randint(0, 2_000), "prose ", "\\"]
    return "".join(rng.choice(pieces) for _ in range(rng.randint(1, 60)))[:MAX_RAW]


def test_random_hostile_replies_each_parse_within_the_bound():
    rng = random.Random(23)
    worst = max(_timed(_random_reply(rng)) for _ in range(150))
    assert worst < LIMIT_S


def test_a_good_decision_after_an_unclosed_fence_and_whitespace_is_still_found():
    d = parse_decision("```" + " " * 40_000 + json.dumps(GOOD), NAMES)  # outermost braces hold the decision
    assert d.extras() == {NAMES[0]: 0.05}
    d = parse_decision("Here:\n```json\n" + json.dumps(GOOD) + "\n``` and ``` more", NAMES)
    assert d.extras() == {NAMES[0]: 0.05}


def test_a_reply_over_the_cap_is_refused_before_any_scan():
    with pytest.raises(DecisionError, match="limit is"):
        parse_decision("```" + " " * MAX_RAW, NAMES)


def test_parsing_past_its_time_limit_is_an_invalid_reply(monkeypatch):
    from prunepilot.agent import validate

    clock = iter([0.0, 100.0, 200.0, 300.0])
    monkeypatch.setattr(validate.time, "monotonic", lambda: next(clock))
    with pytest.raises(DecisionError, match="could not be parsed within"):
        parse_decision("not json ```x``` {", NAMES)
