"""The GPU bench scripts run end to end on a tiny model on the CPU (their GPU runs need a lent machine)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_gpu_scale_smoke_run(tmp_path):
    out = tmp_path / "scale.jsonl"
    run = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_scale.py"), "--shape", "tiny", "--big-shape", "tiny",
                          "--device", "cpu", "--n-samples", "2", "--seqlen", "32", "--prefill-batch", "1",
                          "--prefill-seq", "16", "--out", str(out)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "TQDM_DISABLE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    parts = {r["part"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(parts) == {"environment", "sparsegpt_50", "agent_8b", "structured_prefill", "wanda_big_on_cpu"}
    st = parts["structured_prefill"]
    assert st["prefill_speedup"] > 0 and st["ideal_flops_speedup"] > st["ideal_flops_speedup_all_logits"] > 1
    assert parts["sparsegpt_50"]["global_sparsity"] == 0.5 and parts["wanda_big_on_cpu"]["global_sparsity"] == 0.5
    assert parts["agent_8b"]["iterations"] == 1 and parts["agent_8b"]["phase_s"][0]["prune_profile"] > 0


def test_agent_paper_without_the_controller_model_stops_instead_of_falling_back(tmp_path):
    """No cached Qwen2.5-Coder-1.5B and no --server-gguf: the agent_llm row must not run with another controller
    (it once fell back to SmolLM2-135M-Instruct and changed every row's protocol)."""
    run = subprocess.run([sys.executable, str(REPO / "bench" / "agent_paper.py"), "--model", str(tmp_path / "absent"),
                          "--rows", "dense,agent_llm", "--out", str(tmp_path / "t.md")],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PRUNEPILOT_MODELS": str(tmp_path / "empty-cache")})
    assert run.returncode != 0
    assert run.stderr.strip().splitlines()[-1] == ("no controller GGUF: run `prunepilot fetch-model "
                                                   "qwen2.5-coder-1.5b-instruct` or pass --server-gguf PATH")
    assert not (tmp_path / "t.md.rows.jsonl").exists()


def test_agent_paper_self_row_without_a_gguf_stops_before_loading(tmp_path):
    """--rows agent_self needs --model's own GGUF to serve; a folder without one stops at once, not at the row."""
    run = subprocess.run([sys.executable, str(REPO / "bench" / "agent_paper.py"), "--model", str(tmp_path),
                          "--rows", "dense,agent_self", "--out", str(tmp_path / "t.md")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert run.stderr.strip().splitlines()[-1] == (f"--rows agent_self: --model {tmp_path} has no GGUF to serve as "
                                                   "its own controller")
    assert "loaded" not in run.stdout and not (tmp_path / "t.md.rows.jsonl").exists()


def test_bench_method_entries_carry_options_after_at():
    sys.path.insert(0, str(REPO / "bench"))
    from common import method_with_options

    assert method_with_options("wanda") == ("wanda", {})
    assert method_with_options("ria@permute=greedy,a=0.5") == ("ria", {"permute": "greedy", "a": "0.5"})
    assert method_with_options("sparsegpt@sink_weight=512") == ("sparsegpt", {"sink_weight": "512"})
    with pytest.raises(SystemExit, match="key=value pairs"):
        method_with_options("ria@greedy")


def test_agent_paper_keeps_each_agent_run_and_resumes_it(tmp_path):
    """An agent row keeps its journal under OUT.runs; when the row is not recorded (the run was cut off before its
    evaluation), a rerun replays that journal instead of starting over, and reaches the same model."""
    from conftest import shared_path

    out = tmp_path / "t.md"
    cmd = [sys.executable, str(REPO / "bench" / "agent_paper.py"), "--model", str(shared_path("models", "stories260K")),
           "--out", str(out), "--rows", "agent", "--sparsities", "0.3", "--n-samples", "2", "--seqlen", "64",
           "--eval-seqlen", "64", "--max-windows", "1", "--agent-eval-tokens", "128", "--agent-grad-samples", "1",
           "--max-iterations", "3", "--qa", "", "--mmlu-limit", "-1", "--zeroshot", "", "--code-ppl", ""]
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    journals = list(Path(f"{out}.runs").glob("*/agent@0.3/agent_built-in/journal.jsonl"))
    assert len(journals) == 1
    rows = Path(f"{out}.rows.jsonl")
    row = json.loads(rows.read_text())
    rows.unlink()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming the agent run in" in again.stdout
    replayed = json.loads(rows.read_text())
    assert replayed["sparsity"] == row["sparsity"] and replayed["metrics"]["ppl"] == row["metrics"]["ppl"]
