"""Pacing: a controller chooses where to prune, the loop makes each step large enough to reach the target."""
import json
import subprocess
import sys

import pytest

from prunepilot.agent import run_agent
from prunepilot.agent.journal import Journal
from prunepilot.agent.pacing import Budget, pace_gain, plan_step
from prunepilot.testing.tiny_models import tiny_model
from agent_helpers import Scripted, tiny_cfg, tiny_data

pytestmark = pytest.mark.usefixtures("one_thread")


def _budget(target=0.5, max_layer=0.9, max_step=1.0):
    # a: 100 weights, 20 pruned (80 alive); b: 100 weights, none pruned; c: 200 weights, none pruned
    return Budget({"a": 100, "b": 100, "c": 200}, {"a": 20, "b": 0, "c": 0}, target, max_layer, max_step)


def test_pace_gain_keeps_a_reserve_and_asks_everything_at_the_end():
    assert pace_gain(0.40, 10, 0.2) == pytest.approx(0.40 / 8)
    assert pace_gain(0.40, 1, 0.2) == pytest.approx(0.40)   # last iteration: the whole remainder
    assert pace_gain(0.40, 3, 0.5) == pytest.approx(0.40)   # floor(1.5) = 1 usable iteration
    assert pace_gain(-0.01, 5, 0.2) == 0.0


def test_a_timid_step_is_scaled_up_with_its_ratios_kept():
    # asked: a 0.01 of its 80 alive (0.8 weights), b 0.02 of 100 (2 weights): 2.8 of the 400; need 0.07 -> 28 weights
    step = plan_step({"a": 0.01, "b": 0.02}, _budget(), need=0.07)
    assert step.scale == pytest.approx(10.0, rel=1e-6)  # 80 * 0.1 + 100 * 0.2 = 28
    assert step.applied == pytest.approx({"a": 0.1, "b": 0.2}, rel=1e-6)
    assert step.spread_layers == [] and step.need == 0.07


def test_named_layers_without_room_leave_the_rest_spread_over_the_others():
    # b may lose at most 0.3 of its remaining weights per step: 30 weights; need 0.2 -> 80 weights; the other 50
    # go to a (80 alive) and c (200 alive) with the same extra u: 280 u = 50
    step = plan_step({"b": 0.05}, _budget(max_step=0.3), need=0.2)
    assert step.applied["b"] == pytest.approx(0.3)
    assert step.applied["a"] == pytest.approx(50 / 280, rel=1e-6)
    assert step.applied["c"] == pytest.approx(50 / 280, rel=1e-6)
    assert sorted(step.spread_layers) == ["a", "c"] and step.spread == pytest.approx(50 / 280, rel=1e-6)


def test_a_step_past_the_target_is_scaled_down_and_caps_hold():
    # target 0.1 of 400 = 40 zeros, 20 there: 20 to go; asked 0.5 on c (100 weights) -> scale 0.2
    step = plan_step({"c": 0.5}, _budget(target=0.1), need=0.05)
    assert step.scale == pytest.approx(0.2, rel=1e-6) and step.applied == pytest.approx({"c": 0.1}, rel=1e-6)
    # a is at 20% with max_layer 0.25: room (25 - 20) / 80
    step = plan_step({"a": 0.15}, _budget(max_layer=0.25), need=0.0)
    assert step.applied == pytest.approx({"a": 5 / 80}) and step.scale == 1.0


def test_without_pacing_the_step_is_as_asked():
    step = plan_step({"a": 0.01, "b": 0.02}, _budget(), need=0.0)
    assert step.applied == pytest.approx({"a": 0.01, "b": 0.02}) and step.scale == 1.0 and step.need == 0.0


def _two_layers(obs):
    """A timid controller: the same two linears, +0.01 each, every iteration."""
    names = obs.layer_names[:2]
    return {"reasoning": "tiny step", "stop_pruning": False,
            "layer_decisions": [{"layer": n, "extra_sparsity": 0.01} for n in names]}


def test_a_controller_that_always_proposes_tiny_steps_still_ends_at_the_target(tmp_path):
    calib, held = tiny_data()
    cfg = tiny_cfg(target_sparsity=0.45, max_iterations=5, rollback_threshold=10.0)
    res = run_agent(tiny_model("llama"), None, cfg, tmp_path / "run", controller=Scripted(then=_two_layers),
                    calibration=calib, held_out=held)
    assert res.target_reached and res.stop_reason == "target_reached"
    assert res.global_sparsity == pytest.approx(0.45, abs=0.005) and res.iterations <= 5
    _, records = Journal(tmp_path / "run" / "journal.jsonl").read()
    first = records[0]
    asked = {d["layer"]: d["extra_sparsity"] for d in first.decision["layer_decisions"]}
    assert set(asked) <= set(first.applied) and all(first.applied[n] > asked[n] for n in asked)  # asked vs applied
    assert first.scale > 1 and first.pace_gain == pytest.approx(0.45 / 4, rel=1e-6)  # floor(5 * 0.8) = 4


def test_without_pacing_the_timid_run_ends_short_and_says_so(tmp_path):
    calib, held = tiny_data()
    cfg = tiny_cfg(target_sparsity=0.45, max_iterations=3, rollback_threshold=10.0, pace=False, allow_short=True)
    res = run_agent(tiny_model("llama"), None, cfg, tmp_path / "run", controller=Scripted(then=_two_layers),
                    calibration=calib, held_out=held)
    assert not res.target_reached and res.stop_reason == "max_iterations" and res.global_sparsity < 0.05
    assert json.loads((tmp_path / "run" / "report.json").read_text())["target_reached"] is False


def test_an_early_stop_is_overruled_unless_short_runs_are_allowed(tmp_path):
    calib, held = tiny_data()
    stop = {"reasoning": "enough", "stop_pruning": True, "layer_decisions": []}
    res = run_agent(tiny_model("llama"), None, tiny_cfg(target_sparsity=0.3, rollback_threshold=10.0),
                    tmp_path / "a", controller=Scripted(then=stop), calibration=calib, held_out=held)
    assert res.target_reached and all(r.source == "builtin-fallback" for r in
                                      Journal(tmp_path / "a" / "journal.jsonl").read()[1])
    res = run_agent(tiny_model("llama"), None, tiny_cfg(target_sparsity=0.3, allow_short=True), tmp_path / "b",
                    controller=Scripted(then=stop), calibration=calib, held_out=held)
    assert res.stop_reason == "controller_stop" and not res.target_reached


def test_cli_exits_3_with_one_line_when_the_run_ends_short(stories, tmp_path):
    from conftest import shared_path

    model = shared_path("models", "stories260K")
    base = [sys.executable, "-m", "prunepilot", "agent", str(model), "--target", "0.6", "--max-iterations", "1",
            "--calib", str(shared_path("data", "tinystories", "tinystories_val_head.txt")), "--n-samples", "2",
            "--seqlen", "64", "--eval-tokens", "256", "--eval-seqlen", "64", "--grad-samples", "0",
            "--rollback-threshold", "0.0001", "--no-save-model"]
    r = subprocess.run(base + ["--out", str(tmp_path / "short")], capture_output=True, text=True)
    assert r.returncode == 3, r.stderr[-2000:]
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("prunepilot: error:")]
    assert len(err) == 1 and "short of the target 0.6000" in err[0] and "Traceback" not in r.stderr
    r = subprocess.run(base + ["--out", str(tmp_path / "allowed"), "--allow-short"], capture_output=True, text=True)
    assert r.returncode == 0 and json.loads(r.stdout.strip().splitlines()[-1])["target_reached"] is False


# ------------------------------------------------------------------------------------ fixed plans as controllers

def test_plan_controller_asks_in_proportion_to_what_each_linear_still_has_to_lose():
    from prunepilot.agent.decision import Observation
    from prunepilot.agent.plan_controller import PlanController, block_plan

    rows = [{"layer": "a", "numel": 10, "alive": 8, "sparsity": 0.2, "s": 1.0, "g": 1.0, "z_s": 0.0, "z_g": 0.0},
            {"layer": "b", "numel": 10, "alive": 10, "sparsity": 0.0, "s": 1.0, "g": 1.0, "z_s": 0.0, "z_g": 0.0},
            {"layer": "c", "numel": 10, "alive": 7, "sparsity": 0.3, "s": 1.0, "g": 1.0, "z_s": 0.0, "z_g": 0.0}]
    obs = Observation(0, 5, 0.3, 0.17, rows, 10.0, 10.0, 0.15)
    # a: (0.5 - 0.2) / 0.8 = 0.375 (the largest -> 0.15); b: 0.3 -> 0.12; c is at its plan: not asked
    out = PlanController({"a": 0.5, "b": 0.3, "c": 0.3}, "test").propose(obs)
    assert {d["layer"]: d["extra_sparsity"] for d in out["layer_decisions"]} == pytest.approx({"a": 0.15, "b": 0.12})
    assert block_plan(["m.layers.0.q", "m.layers.0.k", "m.layers.1.q"], [0.4, 0.6]) == {
        "m.layers.0.q": 0.4, "m.layers.0.k": 0.4, "m.layers.1.q": 0.6}


@pytest.mark.parametrize("plan", ["uniform", "owl"])
def test_a_fixed_plan_runs_through_the_same_loop_and_ends_at_its_allocation(plan, tmp_path):
    from prunepilot.agent.granularity import block_of
    from prunepilot.allocation import owl
    from prunepilot.engine import ModelAdapter
    from prunepilot.unstructured import owl_outlier_ratios

    calib, held = tiny_data()
    model = tiny_model("llama")
    cfg = tiny_cfg(target_sparsity=0.4, max_iterations=4, rollback_threshold=10.0,
                   controller={"kind": "plan", "plan": plan})
    expected = owl(owl_outlier_ratios(ModelAdapter(model), calib, "cpu", 5.0), 0.4, 0.08) if plan == "owl" else None
    res = run_agent(model, None, cfg, tmp_path / plan, calibration=calib, held_out=held)
    assert res.target_reached and res.global_sparsity == pytest.approx(0.4, abs=0.005)
    by_block = {}
    for name, s in res.layer_sparsity.items():
        by_block.setdefault(block_of(name), []).append(s)
    got = [sum(v) / len(v) for _, v in sorted(by_block.items())]
    want = expected if expected is not None else [0.4] * len(got)
    assert got == pytest.approx(want, abs=0.02)
    assert {r.source for r in Journal(tmp_path / plan / "journal.jsonl").read()[1]} == {f"plan-{plan}"}


def test_the_searched_plan_runs_through_the_loop_and_keeps_its_log(tmp_path):
    import torch

    calib, _ = tiny_data()
    held = torch.randint(3, 128, (512,), generator=torch.Generator().manual_seed(1))
    cfg = tiny_cfg(target_sparsity=0.4, max_iterations=4, rollback_threshold=10.0, eval_tokens=512,
                   controller={"kind": "plan", "plan": "evo"})
    res = run_agent(tiny_model("llama"), None, cfg, tmp_path / "evo", calibration=calib, held_out=held)
    assert res.target_reached and (tmp_path / "evo" / "evo_search.jsonl").stat().st_size > 0
    spread = set(round(s, 2) for s in res.layer_sparsity.values())
    assert len(spread) > 1  # the search moved sparsity between linears: not the uniform plan
