"""Agent-guided pruning: profile math, validator, controllers, rollback, journal resume, OpenAI round trip."""
import dataclasses
import json
import logging
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from prunepilot.agent import AgentConfig, parse_decision, percentile, run_agent
from prunepilot.agent.controllers import BuiltinPolicy, ControllerUnavailable, GuardedController, HFController
from prunepilot.agent.config import ControllerConfig
from prunepilot.agent.decision import Observation
from prunepilot.agent.journal import IterationRecord, Journal, JournalHeader
from prunepilot.agent.profile import Profile, extra_rowwise_mask, gradient_importance, prune_and_profile
from prunepilot.agent.validate import DecisionError
from prunepilot.engine import ModelAdapter, blocks, weight_2d
from prunepilot.errors import PrunepilotError
from prunepilot.stats import zscore_list as zscore
from prunepilot.methods.base import InputNormState
from prunepilot.methods.wanda import wanda_scores
from conftest import shared_path
from tiny_models import tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


class Killed(BaseException):
    """Simulates the process being killed (not an Exception: the guard must not swallow it)."""


class Scripted:
    """Controller replaying scripted outputs (dicts, strings, or callables of the observation)."""
    name = "scripted"

    def __init__(self, outputs=(), then=None, kill_at=None):
        self.outputs, self.then, self.kill_at = list(outputs), then, kill_at
        self.observations, self.errors = [], []

    def propose(self, obs, errors=None):
        self.observations.append(obs)
        self.errors.append(list(errors or []))
        if self.kill_at is not None and len(self.observations) > self.kill_at:
            raise Killed
        if self.outputs:
            out = self.outputs.pop(0)
        elif self.then is not None:
            out = self.then
        else:
            out = {"reasoning": "done", "stop_pruning": True, "layer_decisions": []}
        return out(obs) if callable(out) else out


def send_json(handler, status: int, data: bytes) -> None:
    """A complete JSON response from a test server's request handler."""
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def all_layers(extra):
    return lambda obs: {"reasoning": f"all at {extra}", "stop_pruning": False,
                        "layer_decisions": [{"layer": n, "extra_sparsity": extra} for n in obs.layer_names]}


def tiny_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (4, 32), generator=g), torch.randint(3, 128, (128,), generator=g)


def tiny_cfg(**kw):
    base = dict(target_sparsity=0.5, eval_seqlen=32, eval_tokens=128, save_model=False, device="cpu",
                grad_samples=2, max_iterations=10)
    base.update(kw)
    return AgentConfig(**base)


def masks_of(model):
    return {n: weight_2d(m) == 0 for n, m in ModelAdapter(model).all_linears().items()}


def obs_for(names, target=0.5, current=0.0):
    rows = [{"layer": n, "numel": 100, "alive": 100, "sparsity": 0.0, "s": 1.0 + k, "g": 1.0, "z_s": 0.0,
             "z_g": 0.0} for k, n in enumerate(names)]
    return Observation(0, 10, target, current, rows, 10.0, 10.0, 0.15)


# ------------------------------------------------------------------------------------ profile math

def test_zscore_is_exact():
    z = zscore([1.0, 2.0, 3.0])  # mean 2, population std sqrt(2/3)
    assert z == pytest.approx([-math.sqrt(1.5), 0.0, math.sqrt(1.5)], abs=1e-8)
    assert zscore([5.0, 5.0]) == [0.0, 0.0]  # std 0: the 1e-9 keeps it finite
    assert sum(zscore([0.3, 7.0, -2.0, 11.0])) == pytest.approx(0.0, abs=1e-12)


def test_wanda_percentile_hand_checked_on_a_tiny_layer():
    W = torch.tensor([[1.0, -2.0, 0.0, 4.0],
                      [0.5, 0.0, -3.0, 6.0]])
    sq_mean = torch.tensor([1.0, 4.0, 9.0, 0.25])  # ||X_j|| ∝ 1, 2, 3, 0.5
    scores = wanda_scores(W, sq_mean)               # [[1, 4, 0, 2], [0.5, 0, 9, 3]]
    alive = scores[W != 0]                          # sorted: 0.5 1 2 3 4 9
    # 10th percentile, linear interpolation: position 0.1 * (6 - 1) = 0.5 -> 0.5 + 0.5 * (1 - 0.5)
    assert percentile(alive, 0.10) == pytest.approx(0.75)
    assert percentile(alive, 0.10) == pytest.approx(torch.quantile(alive, 0.10).item())
    assert percentile(alive, 0.0) == 0.5 and percentile(alive, 1.0) == 9.0
    assert percentile(torch.tensor([]), 0.1) == 0.0
    for by_sort in (True, False):  # the sort path (default on CUDA) and the selection path agree exactly
        assert percentile(alive, 0.10, by_sort=by_sort) == pytest.approx(0.75)
        assert percentile(alive, 1.0, by_sort=by_sort) == 9.0
    x = torch.randint(0, 50, (10_001,)).float()  # many ties
    for q in (0.0, 0.1, 0.37, 0.5, 1.0):
        assert percentile(x, q, by_sort=True) == percentile(x, q, by_sort=False) == \
            pytest.approx(torch.quantile(x, q).item())


def test_extra_rowwise_mask_prunes_lowest_alive_per_row_exactly():
    scores = torch.tensor([[5.0, 1.0, 3.0, 2.0, 4.0],
                           [1.0, 2.0, 3.0, 4.0, 5.0]])
    alive = torch.tensor([[True, False, True, True, True],
                          [True, True, True, True, True]])
    m = extra_rowwise_mask(scores, alive, 0.5)
    # 9 alive x 0.5 = 4.5 -> 4 (round half to even); rows: floor(2.0)=2, floor(2.5)=2
    assert m.tolist() == [[False, False, True, True, False], [True, True, False, False, False]]
    assert not (m & ~alive).any()
    m = extra_rowwise_mask(scores, alive, 0.3)  # 2.7 -> 3: rows 1.2 + 1.5 -> 1 + 1, then +1 to row 1
    assert m.sum(1).tolist() == [1, 2]


def test_profile_pass_measures_the_current_model():
    """s = 10th pct of |W|·||X|| over the non-zero weights, norms taken from the (pruned) model's pass."""
    model = tiny_model("llama")
    ad = ModelAdapter(model, ignore=["lm_head"])
    ids, _ = tiny_data()
    s = prune_and_profile(ad, ids, "cpu", {}, 0.1)
    first = next(iter(blocks(ad, ids, "cpu", states=lambda n, m: InputNormState(weight_2d(m).shape[1], "cpu"))))
    lin, states = first.linears, first.states
    for n, m in lin.items():
        sc = wanda_scores(weight_2d(m), states[n].sq_mean)
        assert s[n] == pytest.approx(torch.quantile(sc.flatten(), 0.1).item(), rel=1e-5)
    # prune 30% more of one layer: its new s is over the surviving weights only, so it rises
    name = "model.layers.1.mlp.down_proj"
    s2 = prune_and_profile(ad, ids, "cpu", {name: 0.3}, 0.1)
    w = weight_2d(ad.all_linears()[name])
    assert (w == 0).float().mean().item() == pytest.approx(0.3, abs=1e-3)
    assert s2[name] > s[name]
    prof = Profile(list(s2), *_counts(ad), s2, {n: 1.0 for n in s2})
    rows = prof.rows()
    assert [r["z_s"] for r in rows] == sorted(r["z_s"] for r in rows)
    assert all(r["z_g"] == 0.0 for r in rows)


def _counts(ad):
    from prunepilot.agent.profile import zero_counts
    return zero_counts(ad)


def test_blockwise_gradients_equal_full_backward():
    model = tiny_model("llama")
    ad = ModelAdapter(model, ignore=["lm_head"])
    ids, _ = tiny_data()
    full = gradient_importance(model, ad, ids[:2], "cpu", "full")
    block = gradient_importance(model, ad, ids[:2], "cpu", "blockwise")
    assert set(full) == set(ad.all_linears()) and all(v > 0 for v in full.values())
    for n in full:
        assert block[n] == pytest.approx(full[n], rel=1e-4)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # flags restored


# --------------------------------------------------------------------------------------- validator

NAMES = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
GOOD = {"reasoning": "ok", "stop_pruning": False,
        "layer_decisions": [{"layer": NAMES[0], "extra_sparsity": 0.05}]}


def _with(**kw):
    return json.dumps({**GOOD, **kw})


BAD = {
    "not json": "I think we should prune more",
    "truncated json": '{"reasoning": "x", "stop_pruning": false, "layer_decisions": [',
    "array": json.dumps([GOOD]),
    "missing key": json.dumps({"reasoning": "x", "stop_pruning": False}),
    "extra key": _with(exec="import os"),
    "reasoning type": _with(reasoning=3),
    "stop as string": _with(stop_pruning="false"),
    "stop as int": _with(stop_pruning=0),
    "decisions not list": _with(layer_decisions={"layer": NAMES[0], "extra_sparsity": 0.05}),
    "item not object": _with(layer_decisions=[NAMES[0]]),
    "item extra key": _with(layer_decisions=[{"layer": NAMES[0], "extra_sparsity": 0.05, "x": 1}]),
    "unknown layer": _with(layer_decisions=[{"layer": "model.layers.9.mlp.down_proj", "extra_sparsity": 0.05}]),
    "layer not string": _with(layer_decisions=[{"layer": 0, "extra_sparsity": 0.05}]),
    "duplicate layer": _with(layer_decisions=[{"layer": NAMES[0], "extra_sparsity": 0.05}] * 2),
    "too large": _with(layer_decisions=[{"layer": NAMES[0], "extra_sparsity": 0.5}]),
    "too small": _with(layer_decisions=[{"layer": NAMES[0], "extra_sparsity": 0.001}]),
    "negative": _with(layer_decisions=[{"layer": NAMES[0], "extra_sparsity": -0.05}]),
    "string number": _with(layer_decisions=[{"layer": NAMES[0], "extra_sparsity": "0.05"}]),
    "bool number": _with(layer_decisions=[{"layer": NAMES[0], "extra_sparsity": True}]),
    "nan": _with(layer_decisions=[{"layer": NAMES[0], "extra_sparsity": float("nan")}]),
    "nothing to do": _with(layer_decisions=[]),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_validator_rejects_bad_output(kind):
    with pytest.raises(DecisionError):
        parse_decision(BAD[kind], NAMES)


def test_validator_bounds_hostile_output():
    layer = json.dumps(NAMES[0])
    hostile = {
        "huge value": json.dumps(_with(stop_pruning="x" * 2_000_000)),
        "deep nesting": '{"reasoning": ' + "[" * 100_000 + "]" * 100_000 + "}",
        "huge int": '{"reasoning": "", "stop_pruning": false, "layer_decisions": [{"layer": ' + layer
                    + ', "extra_sparsity": 1' + "0" * 400 + "}]}",
        "duplicate key": '{"reasoning": "a", "reasoning": "b", "stop_pruning": true, "layer_decisions": []}',
        "too long": json.dumps(_with(reasoning="y" * 600_000)),
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


# ------------------------------------------------------------------------------- loop and journal

def test_rollback_restores_weights_exactly_and_tells_the_controller(stories, tmp_path, monkeypatch):
    import prunepilot.agent.loop as loop

    make, tok = stories
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def destructive(adapter, ids, device, extras, q=0.1, **kw):  # the step wipes its layers out
        s = real(adapter, ids, device, extras, q, **kw)
        with torch.no_grad():
            for name in extras:
                weight_2d(adapter.all_linears()[name]).mul_(0.0)
        return s

    real = loop.prune_and_profile
    monkeypatch.setattr(loop, "prune_and_profile", destructive)
    ctl = Scripted([all_layers(0.15)])  # then stops
    cfg = AgentConfig(target_sparsity=0.5, eval_seqlen=256, eval_tokens=1024,  # default threshold 15%
                      grad_samples=1, save_model=False, device="cpu", pace=False, allow_short=True,
                      calibration={"sources": ["tinystories"], "n_samples": 4, "seqlen": 128})
    res = run_agent(model, tok, cfg, tmp_path, controller=ctl)
    assert res.rollbacks == 1 and res.accepted == 0 and res.stop_reason == "controller_stop"
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    fb = ctl.observations[1].last
    assert fb.label == "poor-rolled-back" and not fb.accepted and fb.ppl_change > 1.0 and fb.gain > 0.9
    assert fb.reasoning == "all at 0.15"
    traj = res.report["trajectory"]
    assert traj[1]["rolled_back"] and traj[1]["ppl"] > traj[0]["ppl"] * 2
    assert (tmp_path / "trajectory.png").stat().st_size > 0
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["rollbacks"] == 1 and rep["iterations"] == 2


def test_resume_after_kill_equals_uninterrupted_run(stories, tmp_path, monkeypatch):
    import prunepilot.agent.loop as loop

    real = loop.prune_and_profile

    def pass_(adapter, ids, device, extras, q=0.1, **kw):  # a step with extras of 0.0123 is ruinous
        s = real(adapter, ids, device, extras, q, **kw)
        if 0.0123 in extras.values():
            with torch.no_grad():
                for name in extras:
                    weight_2d(adapter.all_linears()[name]).mul_(0.0)
        return s

    monkeypatch.setattr(loop, "prune_and_profile", pass_)
    make, tok = stories
    cfg = AgentConfig(target_sparsity=0.3, grad_refresh_every=2, max_iterations=12, eval_seqlen=256,
                      eval_tokens=1024, grad_samples=1, save_model=False, device="cpu", pace=False,
                      calibration={"sources": ["tinystories"], "n_samples": 4, "seqlen": 128})
    delegate = BuiltinPolicy(cfg.policy, cfg.max_layer_sparsity, cfg.target_tolerance).propose
    script = lambda **k: Scripted([delegate, all_layers(0.0123)], then=delegate, **k)  # noqa: E731

    ref_model = make()
    ref = run_agent(ref_model, tok, cfg, tmp_path / "ref", controller=script())
    labels = [t["label"] for t in ref.report["trajectory"][1:]]
    assert labels[1] == "poor-rolled-back" and ref.accepted >= 4 and ref.stop_reason == "target_reached"

    with pytest.raises(Killed):
        run_agent(make(), tok, cfg, tmp_path / "run", controller=script(kill_at=3))
    _, recs = Journal(tmp_path / "run" / "journal.jsonl").read()
    assert len(recs) == 3 and [r.accepted for r in recs] == [True, False, True]
    with pytest.raises(PrunepilotError, match="--resume"):
        run_agent(make(), tok, cfg, tmp_path / "run")
    with pytest.raises(PrunepilotError, match="different starting model"):
        other = make()
        with torch.no_grad():
            other.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
        run_agent(other, tok, cfg, tmp_path / "run", resume=True)

    model = make()  # a fresh process would reload the original model
    res = run_agent(model, tok, cfg, tmp_path / "run", controller=Scripted(then=delegate), resume=True)
    a, b = masks_of(ref_model), masks_of(model)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert all(torch.equal(x, y) for x, y in zip(ref_model.state_dict().values(), model.state_dict().values()))
    strip = lambda recs: [dataclasses.replace(r, seconds=0.0, controller_s=0.0, phases={}) for r in recs]  # noqa: E731
    assert strip(Journal(tmp_path / "ref" / "journal.jsonl").read()[1]) == strip(
        Journal(tmp_path / "run" / "journal.jsonl").read()[1])
    assert (res.iterations, res.rollbacks, res.global_sparsity) == (ref.iterations, ref.rollbacks, ref.global_sparsity)


def _header():
    return JournalHeader("fp", "data", {}, ["a"], 0.5, 10.0, 64, {}, {}, "now")


def _record(i):
    return IterationRecord(i, "builtin", {"reasoning": "r"}, [], 0.1, 10.0, True, {"a": 0.1}, 1.0, 0.05, 10.5,
                           0.05, "excellent", 0.15, 30, mask_hash="h", seconds=1.5)


def test_journal_survives_a_truncated_last_line(tmp_path):
    j = Journal(tmp_path / "j.jsonl")
    j.write_header(_header())
    j.append(_record(0))
    with open(j.path, "ab") as f:
        f.write(b'{"type": "iteration", "iter')
    header, recs = j.read()
    assert header == _header() and recs == [_record(0)]
    j.drop_partial_tail()  # what a resume does before appending: the next record starts on a fresh line
    j.append(_record(1))
    assert [r.iteration for r in j.read()[1]] == [0, 1]
    cut = Journal(tmp_path / "cut.jsonl")
    cut.path.write_bytes(b'{"type": "hea')  # killed during the very first write
    assert cut.exists() and not cut.has_header() and j.has_header()


def test_journal_lines_are_the_records_and_damage_names_the_line(tmp_path):
    j = Journal(tmp_path / "j.jsonl")
    j.write_header(_header())
    j.append(_record(0))
    lines = [json.loads(x) for x in j.path.read_text().splitlines()]
    assert lines[0]["type"] == "header" and lines[0]["version"] == 2 and lines[1]["type"] == "iteration"
    assert "stopped" not in lines[1] and "grad" not in lines[1]  # optional fields only when they say something
    assert lines[1]["applied"] == {"a": 0.1} and lines[1]["mask_hash"] == "h"
    for damage, what in ((lambda r: r.pop("gain"), "gain"), (lambda r: r.update(accepted="maybe"), "accepted")):
        bad = dict(lines[1])
        damage(bad)
        j.path.write_text("\n".join(json.dumps(x) for x in (lines[0], bad, lines[1])) + "\n")
        with pytest.raises(PrunepilotError, match=f"j.jsonl:2: damaged journal record: {what}"):
            j.read()
    j.path.write_text(json.dumps(lines[0]) + "\n{not json\n" + json.dumps(lines[1]) + "\n")
    with pytest.raises(PrunepilotError, match="j.jsonl:2: journal line is not valid JSON"):
        j.read()
    j.path.write_text(json.dumps({**lines[0], "version": 1}) + "\n")
    with pytest.raises(PrunepilotError, match="version 1, expected 2"):
        j.read()


def test_nan_or_inf_perplexity_is_rolled_back_and_labelled_so():
    from prunepilot.agent.loop import _accepted, _label

    for bad in (float("nan"), float("inf")):
        assert not _accepted(bad, 0.15) and _label(bad, 0.15, 0.1) == "poor-rolled-back"
    assert _accepted(0.15, 0.15) and _label(0.01, 0.15, 0.1) == "excellent" and _label(0.1, 0.15, 0.1) == "good"


def test_mask_fingerprint_sees_masks_not_counts():
    from prunepilot.fingerprint import mask_fingerprint

    model = tiny_model("llama")
    ad = ModelAdapter(model)
    weights = {n: weight_2d(m) for n, m in ad.all_linears().items()}
    w = weights["model.layers.0.mlp.up_proj"]
    with torch.no_grad():
        w[0, 0] = 0.0
        a = mask_fingerprint(weights)
        w[0, 0], w[0, 1] = 1.0, 0.0  # same number of zeros, another position
    assert mask_fingerprint(weights) != a


def test_config_is_strict_and_round_trips_yaml(tmp_path):
    with pytest.raises(PrunepilotError, match="invalid agent config: colour"):
        AgentConfig.from_dict({"colour": "red"})
    with pytest.raises(PrunepilotError, match="controller.kind"):
        AgentConfig.from_dict({"controller": {"kind": "gpt"}})
    for bad in ("ftp://x", "http://", "localhost:8000/v1"):
        with pytest.raises(PrunepilotError, match="base_url"):
            AgentConfig.from_dict({"controller": {"base_url": bad}})
    cfg = AgentConfig(target_sparsity=0.4, controller={"kind": "openai", "base_url": "http://127.0.0.1:1/v1"})
    p = tmp_path / "agent.yaml"
    p.write_text(cfg.to_yaml())
    assert AgentConfig.from_yaml(p) == cfg


# ------------------------------------------------------------------------ OpenAI-compatible server

class _Server:
    """A local OpenAI-compatible endpoint in a thread, answering at most `limit` requests."""

    def __init__(self, reply, limit=20):
        self.requests, self.reply, self.limit = [], reply, limit
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                if len(outer.requests) > outer.limit:
                    self.send_error(503)
                    return
                content = outer.reply(body)
                if isinstance(content, int):  # an HTTP error status
                    self.send_error(content)
                    return
                data = content if isinstance(content, bytes) else json.dumps(
                    {"id": "x", "object": "chat.completion", "model": body.get("model"),
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                  "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}}).encode()
                send_json(self, 200, data)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _canned_decision(body):
    """Pick the first two layers of the schema's enum, as a well-behaved LLM would."""
    names = body["response_format"]["json_schema"]["schema"]["properties"]["layer_decisions"]["items"][
        "properties"]["layer"]["enum"]
    return json.dumps({"reasoning": "prune the first two", "stop_pruning": False,
                       "layer_decisions": [{"layer": n, "extra_sparsity": 0.1} for n in names[:2]]})


def _openai_cfg(url, **kw):
    # pace=False: these tests count the controller's requests over two iterations (pacing would finish in one)
    return tiny_cfg(max_iterations=2, pace=False, controller={"kind": "openai", "base_url": url, "model_name": "canned",
                                                  "api_key_env": "PP_TEST_KEY", "retries": 1,
                                                  "retry_backoff_s": 0.0, "timeout_s": 10, **kw})


def test_openai_round_trip_over_http(tmp_path, monkeypatch):
    monkeypatch.setenv("PP_TEST_KEY", "sk-test")
    calib, held = tiny_data()
    with _Server(_canned_decision, limit=5) as srv:
        res = run_agent(tiny_model("llama"), None, _openai_cfg(srv.url), tmp_path, calibration=calib, held_out=held)
    assert len(srv.requests) == 2 and res.iterations == 2
    req = srv.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    assert req["body"]["model"] == "canned" and req["body"]["response_format"]["type"] == "json_schema"
    assert "Layer profile" in req["body"]["messages"][1]["content"]
    assert "prune the first two" in srv.requests[1]["body"]["messages"][1]["content"]  # own reasoning fed back
    _, recs = Journal(tmp_path / "journal.jsonl").read()
    assert [r.source for r in recs] == ["openai", "openai"] and len(recs[0].applied) == 2
    # per iteration: prompt size (characters always, tokens when the server reports usage) and controller time
    assert all(r.replies == 1 and r.prompt_tokens == 11 and r.completion_tokens == 5 and r.controller_s > 0
               and r.prompt_chars == sum(len(m["content"]) for m in q["body"]["messages"])
               for r, q in zip(recs, srv.requests))
    stats = res.report["controller_stats"]
    assert (stats["replies"], stats["valid_replies"], stats["fallbacks"], stats["prompt_tokens"]) == (2, 2, 0, 22)
    assert res.report["trajectory"][1]["prompt_tokens"] == 11 and res.report["trajectory"][1]["controller_s"] > 0


def test_openai_garbage_falls_back_to_builtin(tmp_path, caplog):
    calib, held = tiny_data()
    replies = iter([b"<html>not json</html>", "Sure, prune everything!", '{"reasoning": 1}'] * 4)
    with _Server(lambda body: next(replies), limit=12) as srv, caplog.at_level(logging.WARNING):
        res = run_agent(tiny_model("llama"), None, _openai_cfg(srv.url, invalid_retries=2), tmp_path,
                        calibration=calib, held_out=held)
    assert len(srv.requests) == 6  # 3 attempts per iteration, 2 iterations
    assert res.report["fallbacks"] == 2 and res.global_sparsity > 0.1
    assert "gave no valid decision in 3 attempt(s)" in caplog.text


def test_endpoint_without_json_schema_support_is_asked_again_without_it(tmp_path):
    calib, held = tiny_data()
    names = list(ModelAdapter(tiny_model("llama")).all_linears())
    answer = json.dumps({"reasoning": "r", "stop_pruning": False,
                         "layer_decisions": [{"layer": names[0], "extra_sparsity": 0.1}]})
    with _Server(lambda body: 400 if "response_format" in body else answer) as srv:
        res = run_agent(tiny_model("llama"), None, _openai_cfg(srv.url), tmp_path, calibration=calib, held_out=held)
    # json_schema refused -> json_object (+ schema, for llama.cpp-style servers) refused -> plain text, and the
    # refused formats are not sent again
    kinds = [r["body"].get("response_format", {}).get("type") for r in srv.requests]
    assert kinds == ["json_schema", "json_object", None, None]
    assert srv.requests[1]["body"]["response_format"]["schema"]["required"] == ["reasoning", "stop_pruning",
                                                                                "layer_decisions"]
    assert res.report["fallbacks"] == 0 and res.iterations == 2


def test_auth_failure_disables_the_endpoint_bad_request_fails_one_answer(tmp_path):
    calib, held = tiny_data()
    with _Server(lambda body: 401) as srv:
        res = run_agent(tiny_model("llama"), None, _openai_cfg(srv.url), tmp_path / "a", calibration=calib,
                        held_out=held)
    assert len(srv.requests) == 1 and res.report["fallbacks"] == 2  # not asked again after a 401
    with _Server(lambda body: 422) as srv:
        res = run_agent(tiny_model("llama"), None, _openai_cfg(srv.url, invalid_retries=1, json_schema=False),
                        tmp_path / "b", calibration=calib, held_out=held)
    assert len(srv.requests) == 4 and res.report["fallbacks"] == 2  # re-asked every iteration, never retried blind


def test_unreachable_endpoint_warns_once_and_falls_back_or_fails_strict(tmp_path, caplog):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    calib, held = tiny_data()
    with caplog.at_level(logging.WARNING):
        res = run_agent(tiny_model("llama"), None, _openai_cfg(url), tmp_path / "a", calibration=calib, held_out=held)
    warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "unreachable after 2 attempt(s)" in warnings[0].getMessage()
    assert res.report["fallbacks"] == 2
    with pytest.raises(PrunepilotError, match="unreachable"):
        run_agent(tiny_model("llama"), None, _openai_cfg(url, strict=True), tmp_path / "b", calibration=calib,
                  held_out=held)


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
    assert model.model_validate(json.loads(_with(reasoning="r"))).layer_decisions[0].layer == NAMES[0]
    assert parse_decision(_with(layer_decisions=[{"layer": NAMES[0], "extra_sparsity": 0.0734}]), NAMES).extras() == {
        NAMES[0]: 0.0734}  # validation accepts any number in range (the built-in policy's), the schema offers steps


class _RawServer:
    """A TCP server that reads one request per connection and answers with `respond(sock, request_bytes)`."""

    def __init__(self, respond):
        import socket

        self.respond, self.requests = respond, []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self):
        import socket

        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn):
        with conn:
            conn.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(next((h.split(b":")[1] for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")),
                              b"0"))
            while len(body) < length:
                body += conn.recv(65536)
            self.requests.append(head + b"\r\n\r\n" + body)
            try:
                self.respond(conn, self.stop)
            except OSError:  # the client went away
                pass

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(2)
        self.sock.close()


def _trickle(first: bytes, then: bytes):
    """Send `first`, then `then` one byte every 0.1 s (until the client hangs up or the test ends)."""
    import time

    def respond(conn, stop):
        conn.sendall(first)
        for b in then:
            if stop.is_set():
                return
            conn.sendall(bytes([b]))
            time.sleep(0.1)
    return respond


TRICKLES = {
    "headers": _trickle(b"HTTP/1.1 200 OK\r\n", b"X-Slow: " + b"x" * 10_000 + b"\r\n"),
    "body": _trickle(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n",
                     b'{"choices": [' + b" " * 99_000),
}


@pytest.mark.parametrize("where", sorted(TRICKLES))
def test_trickling_server_cannot_hold_a_decision_past_the_deadline(where, tmp_path, caplog):
    """--timeout is one wall-clock deadline per decision: a server sending a byte every 0.1 s (each socket read
    returns in time, so per-read timeouts never fire) is cut off at the deadline, retries included."""
    import time

    calib, held = tiny_data()
    cfg = _openai_cfg("http://x/v1", timeout_s=1.5, retries=2, retry_backoff_s=0.2)
    with _RawServer(TRICKLES[where]) as srv, caplog.at_level(logging.WARNING):
        cfg.controller.base_url = srv.url
        t0 = time.monotonic()
        res = run_agent(tiny_model("llama"), None, cfg, tmp_path, calibration=calib, held_out=held)
        elapsed = time.monotonic() - t0
    _, recs = Journal(tmp_path / "journal.jsonl").read()
    assert recs[0].controller_s < 1.5 + 0.5 and elapsed < 10  # not 1000 s of trickle
    assert "deadline of one decision" in recs[0].warnings[0]
    assert res.report["fallbacks"] == 2 and len(srv.requests) >= 1
    # the endpoint is then considered unavailable: not asked again, the run is not held any longer
    assert recs[1].replies == 0 and recs[1].controller_s < 0.5


def test_a_reask_that_runs_out_of_time_falls_back_for_this_iteration_only(tmp_path):
    """An invalid first answer, then a re-ask that trickles: the deadline ends the decision (fallback now) without
    declaring the endpoint unavailable; the next iteration asks again with a fresh deadline."""
    replies = iter([json.dumps({"reasoning": 1})] + [None] * 10)

    def respond(conn, stop):
        reply = next(replies)
        if reply is None:
            return TRICKLES["body"](conn, stop)
        body = json.dumps({"choices": [{"message": {"content": reply}}]}).encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)

    calib, held = tiny_data()
    cfg = _openai_cfg("http://x/v1", timeout_s=1.5, retries=0, invalid_retries=2)
    with _RawServer(respond) as srv:
        cfg.controller.base_url = srv.url
        run_agent(tiny_model("llama"), None, cfg, tmp_path, calibration=calib, held_out=held)
    _, recs = Journal(tmp_path / "journal.jsonl").read()
    assert recs[0].source == "builtin-fallback" and "re-ask" in recs[0].warnings[0] and recs[0].replies == 2
    assert recs[0].controller_s < 2.0
    assert recs[1].replies >= 1  # asked again next iteration


def test_oversized_or_compressed_replies_are_refused(tmp_path):
    import gzip

    def big(conn, stop):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (9 << 20))
        chunk = b" " * (1 << 20)
        for _ in range(9):
            conn.sendall(chunk)

    def zipped(conn, stop):
        body = gzip.compress(json.dumps({"choices": [{"message": {"content": json.dumps(GOOD)}}]}).encode())
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(body) + body)

    for respond, what in ((big, "larger than"), (zipped, "gzip")):
        ctl = _openai_controller("http://x/v1", invalid_retries=0)
        with _RawServer(respond) as srv:
            ctl.cfg.base_url = srv.url
            d = GuardedController(ctl, BuiltinPolicy(), invalid_retries=0).decide(obs_for(NAMES))
        assert d.source == "builtin-fallback" and what in d.warnings[0], d.warnings


def _openai_controller(url, **kw):
    from prunepilot.agent.controllers import OpenAIController

    return OpenAIController(ControllerConfig(kind="openai", base_url=url, model_name="m", api_key_env="PP_TEST_KEY",
                                             retries=0, timeout_s=10, **kw))


SECRET = "sk-test-9f8e7d6c5b4a39281706f5e4d3c2b1a0"


def test_an_echoed_key_never_reaches_stderr_logs_journal_or_outputs(tmp_path, monkeypatch, capsys, caplog):
    from prunepilot.cli import main

    monkeypatch.setenv("PP_TEST_KEY", SECRET)
    seen = []

    class Echo(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            auth = self.headers.get("Authorization", "")
            seen.append(auth)
            n = len(seen)
            if n in (1, 3):  # a retried 500 and a 422, their bodies echoing the key
                status, data = (500 if n == 1 else 422), json.dumps({"error": {"message": f"bad token {auth}"}})
            elif n == 2:  # a valid decision whose reasoning quotes the key
                names = body["response_format"]["json_schema"]["schema"]["properties"]["layer_decisions"][
                    "items"]["properties"]["layer"]["enum"]
                content = json.dumps({"reasoning": f"authorized with {auth}", "stop_pruning": False,
                                      "layer_decisions": [{"layer": names[0], "extra_sparsity": 0.1}]})
                status, data = 200, json.dumps({"choices": [{"message": {"content": content}}]})
            else:  # then the key is refused, echoed once more
                status, data = 401, json.dumps({"error": {"message": f"invalid key {auth[7:]}"}})
            send_json(self, status, data.encode())

        def log_message(self, *a):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    out = tmp_path / "run"
    try:
        with caplog.at_level(logging.DEBUG):
            code = main(["agent", str(shared_path("models", "stories260K")), "--target", "0.3", "--max-iterations",
                         "3", "--controller", "openai", "--base-url",
                         f"http://127.0.0.1:{httpd.server_address[1]}/v1",
                         "--model-name", "m", "--api-key-env", "PP_TEST_KEY", "--retries", "1", "--timeout", "30",
                         "--calib", "tinystories", "--n-samples", "2", "--seqlen", "64", "--eval-tokens", "256",
                         "--eval-seqlen", "128", "--grad-samples", "0", "--device", "cpu", "--out", str(out),
                         "--no-pace", "--allow-short"])  # the key is what this test is about
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert code == 0 and seen[0] == f"Bearer {SECRET}" and len(seen) == 4
    err = capsys.readouterr()
    texts = {"stderr": err.err, "stdout": err.out, "logs": caplog.text}
    for f in out.rglob("*"):
        if f.is_file():
            texts[str(f.relative_to(out))] = f.read_bytes().decode("utf-8", errors="replace")
    assert {"journal.jsonl", "agent.yaml", "report.json"} <= set(texts)
    for where, text in texts.items():
        assert SECRET not in text, f"the key is in {where}"
    journal = texts["journal.jsonl"]
    assert "authorized with Bearer [REDACTED]" in journal  # the reply was used, the key cut out of it
    assert "invalid key [REDACTED]" in journal  # the 401 body, in the fallback warning
    assert "PP_TEST_KEY" in texts["agent.yaml"]  # the variable's name is saved, never its value


def test_credentials_in_the_base_url_are_used_but_never_saved(tmp_path):
    import base64

    calib, held = tiny_data()
    with _Server(_canned_decision, limit=5) as srv:
        url = srv.url.replace("http://", "http://alice:s3cr%40t@")
        cfg = _openai_cfg(url)
        assert cfg.controller.base_url == srv.url and "s3cr" not in cfg.to_yaml()
        res = run_agent(tiny_model("llama"), None, cfg, tmp_path, calibration=calib, held_out=held)
    assert srv.requests[0]["auth"] == "Basic " + base64.b64encode(b"alice:s3cr@t").decode()
    assert res.report["controller_stats"]["valid_replies"] == 2
    for name in ("agent.yaml", "report.json", "journal.jsonl"):
        text = (tmp_path / name).read_text()
        assert "s3cr" not in text and "alice" not in text, name
    from prunepilot.agent.openai_controller import Redactor

    redact = Redactor("s3cr@t", "alice")
    assert redact('{"user": "alice", "pw": "s3cr@t"}') == '{"user": "[REDACTED]", "pw": "[REDACTED]"}'
    ctl = _openai_controller(url)  # the password and the basic-auth header are redacted from server text
    assert ctl.redact(f"echo: {srv.requests[0]['auth']} s3cr@t") == "echo: Basic [REDACTED] [REDACTED]"


def test_a_key_given_as_api_key_env_is_refused_without_echoing_it(tmp_path, capsys):
    from prunepilot.cli import main

    for value in (SECRET, "hf_" + "a1B2c3D4e5" * 3, "Zx9Qw8Er7Ty6Ui5Op4As3Df2"):
        code = main(["agent", "some/model", "--controller", "openai", "--base-url", "http://127.0.0.1:1/v1",
                     "--model-name", "m", "--api-key-env", value, "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2 and "NAME of an environment variable" in err and value not in err
    assert not (tmp_path / "o").exists()


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


def test_total_degradation_cap_rolls_back_and_is_reported(tmp_path, monkeypatch):
    """max_total_ppl_rise: a step within the step rule but above (1 + cap) x baseline is rolled back ('total')."""
    import prunepilot.agent.loop as loop

    ppls = iter([10.0, 10.5, 11.0, 10.7])  # baseline, +5% (kept), +4.8% (step ok, +10% in all: undone), +1.9%

    monkeypatch.setattr(loop, "perplexity_sequential", lambda *a, **k: {"ppl": next(ppls)})
    calib, held = tiny_data()
    ctl = Scripted([all_layers(0.05)] * 3)
    cfg = tiny_cfg(max_total_ppl_rise=0.08, max_iterations=3, controller={"history_chars": 2000})
    res = run_agent(tiny_model("llama"), None, cfg, tmp_path, controller=ctl, calibration=calib, held_out=held)
    _, recs = Journal(tmp_path / "journal.jsonl").read()
    assert [(r.accepted, r.rollback_reason) for r in recs] == [(True, ""), (False, "total"), (True, "")]
    assert recs[1].label == "poor-rolled-back" and res.rollbacks == 1
    assert res.report["trajectory"][2]["rollback_reason"] == "total"
    from prunepilot.agent.prompts import render_user_prompt

    prompt = render_user_prompt(ctl.observations[2], history_chars=2000)
    assert "or ends more than 8% above the baseline" in prompt
    assert "#1 [scripted]" in prompt and "ROLLED BACK (above the total perplexity cap)" in prompt
    assert ctl.observations[2].history[0].applied == recs[0].applied  # the controller sees what was applied


def test_validator_accepts_a_raw_newline_inside_the_reasoning():
    """llama.cpp's JSON grammar lets a model put a raw control character in a string (seen with SmolLM2)."""
    text = '{"reasoning": "prune\nthe first\tone", "stop_pruning": false, "layer_decisions": [{"layer": "%s", ' \
           '"extra_sparsity": 0.1}]}' % NAMES[0]
    assert parse_decision(text, NAMES).reasoning == "prune\nthe first\tone"


def test_prompt_states_the_pace_that_reaches_the_target():
    """remaining 0.25 over 8 iterations left at current 0.25: 0.25 / 8 / 0.75 = 0.0417 extra on every layer."""
    from prunepilot.agent.prompts import render_user_prompt

    obs = Observation(2, 10, 0.5, 0.25, obs_for(NAMES).rows, 10.0, 10.0, 0.15)
    prompt = render_user_prompt(obs)
    assert "about 0.042 extra_sparsity on every layer" in prompt and "(e.g. 0.083 on half of them)" in prompt
