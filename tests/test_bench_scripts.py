"""The GPU bench scripts run end to end on a tiny model on the CPU (their GPU runs need a lent machine)."""
import json
import os
import subprocess
import sys
from pathlib import Path

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
