"""Who decides: the guard (re-ask, fallback), the built-in policy, the local HF controller, the prompt and its
reflection history."""
import json
import logging

import pytest
import torch

from prunepilot.agent import parse_decision
from prunepilot.agent.controllers import BuiltinPolicy, ControllerUnavailable, GuardedController, HFController
from prunepilot.agent.config import ControllerConfig
from prunepilot.agent.decision import Observation
from prunepilot.errors import PrunepilotError

from agent_helpers import BAD, GOOD, NAMES, Scripted, obs_for


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def test_guard_retries_then_falls_back_to_builtin(caplog):
    obs = obs_for(NAMES)
    ctl = Scripted([BAD["unknown layer"], BAD["too large"], BAD["not json"]])
    guard = GuardedController(ctl, BuiltinPolicy(), invalid_retries=2)
    with caplog.at_level(logging.WARNING):
        d = guard.decide(obs)
    assert d.source == "builtin-fallback" and d.warnings and "no valid decision in 3 attempt" in d.warnings[0]
    assert "built-in policy" in caplog.text
    assert ctl.errors[0] == [] and "unknown layer" in ctl.errors[1][0]  # the rejection is fed back
    # a valid answer on the retry is used as is
    ctl = Scripted([BAD["nan"], GOOD])
    d = GuardedController(ctl, BuiltinPolicy(), invalid_retries=2).decide(obs)
    assert d.source == "scripted" and d.extras() == {NAMES[0]: 0.05}
    # a controller that raises is treated like a bad answer; strict mode turns failure into an error
    boom = Scripted([lambda o: 1 / 0] * 3)
    assert GuardedController(boom, BuiltinPolicy()).decide(obs).source == "builtin-fallback"
    with pytest.raises(PrunepilotError, match="no valid decision"):
        GuardedController(Scripted([BAD["array"]] * 3), BuiltinPolicy(), strict=True).decide(obs)


def test_builtin_policy_tilts_towards_insensitive_layers_and_backs_off():
    names = [f"model.layers.{i}.mlp.down_proj" for i in range(4)]
    obs = obs_for(names)
    for k, r in enumerate(obs.rows):  # layer 0 least sensitive, layer 3 most
        r["s"], r["g"] = 1.0 * 10 ** k, 1.0 * 10 ** k
    pol = BuiltinPolicy()
    d = parse_decision(pol.propose(obs), names)
    e = [d.extras()[n] for n in names]
    assert e == sorted(e, reverse=True) and e[0] > e[-1]
    assert sum(e) * 100 == pytest.approx(0.10 * 400, rel=1e-3)  # step 0.10 of all weights
    from prunepilot.agent.decision import Feedback
    obs.history = [Feedback(0, 0.1, 10, 13, 0.3, "poor-rolled-back", False)]
    d2 = parse_decision(pol.propose(obs), names)
    assert sum(d2.extras().values()) < sum(d.extras().values())  # halved step after a rollback
    obs.current_sparsity = 0.4995
    assert pol.propose(obs)["stop_pruning"] is True


# ------------------------------------------------------------------------------- local HF controller

class _FakeChatTokenizer:
    chat_template = "{{ messages }}"
    pad_token_id = 0

    def __init__(self, reply):
        self.reply, self.messages = reply, None

    def apply_chat_template(self, messages, add_generation_prompt, return_tensors, return_dict):
        self.messages = messages
        assert add_generation_prompt and return_dict and return_tensors == "pt"
        return {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}

    def decode(self, ids, skip_special_tokens=True):
        assert ids.tolist() == [7, 8]  # only the generated tokens are decoded
        return self.reply


class _FakeChatModel:
    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, pad_token_id):
        return torch.cat([input_ids, torch.tensor([[7, 8]])], dim=1)


def test_hf_controller_parses_generated_json():
    reply = "Decision:\n```json\n" + json.dumps(GOOD) + "\n```"
    tok = _FakeChatTokenizer(reply)
    ctl = HFController(ControllerConfig(kind="hf", json_schema=False), model=_FakeChatModel(), tokenizer=tok)
    d = GuardedController(ctl, BuiltinPolicy()).decide(obs_for(NAMES))
    assert d.source == "hf" and d.extras() == {NAMES[0]: 0.05}
    assert tok.messages[0]["role"] == "system" and NAMES[1] in tok.messages[1]["content"]
    bad = HFController(ControllerConfig(kind="hf", json_schema=False), model=_FakeChatModel(),
                       tokenizer=_FakeChatTokenizer("no idea"))
    assert GuardedController(bad, BuiltinPolicy(), invalid_retries=0).decide(obs_for(NAMES)).source == "builtin-fallback"
    missing = HFController(ControllerConfig(kind="hf", model_name="/nonexistent/chat-model"))
    with pytest.raises(ControllerUnavailable):
        missing.propose(obs_for(NAMES))


# ------------------------------------------------------------------------------ reflection and total cap

def _fb(i, accepted=True, reason="", source="openai"):
    from prunepilot.agent.decision import Feedback

    applied = {f"model.layers.{k}.mlp.down_proj": 0.01 * (k + 1) for k in range(i % 5 + 1)}
    return Feedback(i, 0.01 * accepted, 10 + i, 10.2 + i, 0.02 if accepted else 0.3,
                    "good" if accepted else "poor-rolled-back", accepted, f"reasoning of iteration {i} " + "z" * 400,
                    source, len(applied), applied, "" if accepted else reason or "step")


def test_reflection_history_fits_its_budget_newest_first():
    from prunepilot.agent.prompts import render_history

    history = [_fb(i, accepted=i % 4 != 3, reason="total" if i == 27 else "") for i in range(30)]
    history[28].source = "builtin-fallback"
    text = render_history(history, budget=1500)
    lines = text.splitlines()
    assert len(text) <= 1500
    assert lines[0].startswith("#29 [openai] 5 layers, extra 0.010-0.050") and "perplexity 39.000 -> 39.200" in lines[0]
    assert lines[1].startswith("   reasoning: reasoning of iteration 29") and len(lines[1]) < 330  # cut
    assert lines[2].startswith("#28 [fallback]")
    assert any(line.startswith("#27") and "ROLLED BACK (above the total perplexity cap)" in line for line in lines)
    assert "reasoning of iteration 20" not in text  # older iterations: one line each, then one summary
    assert lines[-1].startswith("#0-#") and "earlier iterations" in lines[-1]
    assert render_history(history, budget=20_000).count("reasoning:") == 3  # three full entries at most
    assert render_history([], 500).startswith("(first iteration")


def test_prompt_states_the_pace_that_reaches_the_target():
    """remaining 0.25 over 8 iterations left at current 0.25: 0.25 / 8 / 0.75 = 0.0417 extra on every layer."""
    from prunepilot.agent.prompts import render_user_prompt

    obs = Observation(2, 10, 0.5, 0.25, obs_for(NAMES).rows, 10.0, 10.0, 0.15)
    prompt = render_user_prompt(obs)
    assert "about 0.042 extra_sparsity on every layer" in prompt and "(e.g. 0.083 on half of them)" in prompt
