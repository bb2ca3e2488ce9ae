"""torchrun data-parallel calibration: 2 CPU processes (gloo) on the real stories260K give the single-process result,
each rank seeing half the samples; only rank 0 writes; a failing run writes nothing."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import shared_path
from prunepilot.cli import main

ARGS = ["--calib", "tinystories", "--n-samples", "8", "--seqlen", "128", "--eval", "tinystories", "--eval-seqlen",
        "128", "--eval-max-windows", "4", "--device", "cpu"]


def torchrun(argv: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    with socket.socket() as s:  # a free port for the rendezvous, on this machine only
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), "-m", "prunepilot", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def masks(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v == 0 for k, v in load_file(folder / "model" / "model.safetensors").items() if v.dim() == 2}


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "flap"])
def test_two_processes_equal_one(method, tmp_path, one_thread):
    model = str(shared_path("models", "stories260K"))
    sparsity = "0.3" if method == "flap" else "0.5"
    assert main(["prune", model, "--method", method, "--sparsity", sparsity, "--out", str(tmp_path / "one"), *ARGS]) == 0
    run = torchrun(["prune", model, "--method", method, "--sparsity", sparsity, "--out", str(tmp_path / "two"), *ARGS])
    assert run.returncode == 0, run.stderr[-2000:]
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert two["distributed"] == {"world_size": 2, "samples_per_rank": [4, 4]}
    assert one["distributed"] == {"world_size": 1, "samples_per_rank": [8]}
    if method == "flap":  # the same channels and heads: the same shapes everywhere
        assert [(w["intermediate_size"], w["num_kv_heads"]) for w in two["extra"]["layers"]] == \
            [(w["intermediate_size"], w["num_kv_heads"]) for w in one["extra"]["layers"]]
    else:  # float sums over two halves: at most a near-tie or two may flip
        a, b = masks(tmp_path / "one"), masks(tmp_path / "two")
        differ = sum(int((a[k] != b[k]).sum()) for k in a)
        assert differ <= 1e-3 * sum(v.numel() for v in a.values())
    ppl_one, ppl_two = one["perplexity_after"]["tinystories"]["ppl"], two["perplexity_after"]["tinystories"]["ppl"]
    assert ppl_two == pytest.approx(ppl_one, rel=1e-3)


def test_a_failing_distributed_run_stops_and_writes_nothing(tmp_path):
    model = str(shared_path("models", "stories260K"))
    run = torchrun(["prune", model, "--method", "wanda", "--out", str(tmp_path / "x"),
                    *[a if a != "8" else "1" for a in ARGS]], timeout=120)  # one sample cannot be split over two
    assert run.returncode != 0
    assert "prunepilot: error: [rank 0] 1 calibration samples cannot be split over 2 processes" in run.stderr
    assert not (tmp_path / "x").exists()


AGENT = ["--target", "0.4", "--max-iterations", "3", "--calib", "tinystories", "--n-samples", "8", "--seqlen", "128",
         "--eval-tokens", "1024", "--eval-seqlen", "128", "--grad-samples", "2", "--device", "cpu",
         "--allow-short"]  # 2 processes equal to 1 is the point, not reaching the target in 3 iterations


def test_agent_two_processes_equal_one(tmp_path, one_thread):
    """`torchrun ... agent`: profile norms, gradients and held-out perplexity are all-reduced, rank 0 decides and
    broadcasts, so both ranks apply the same steps; only rank 0 writes the journal, report and model."""
    model = str(shared_path("models", "stories260K"))
    assert main(["agent", model, *AGENT, "--out", str(tmp_path / "one")]) == 0
    run = torchrun(["agent", model, *AGENT, "--out", str(tmp_path / "two")])
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count('"stop_reason"') == 1  # one summary line: rank 0's
    one, two = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert two["distributed"] == {"world_size": 2, "samples_per_rank": [4, 4]}
    assert one["distributed"] == {"world_size": 1, "samples_per_rank": [8]}
    lines = lambda d: (tmp_path / d / "journal.jsonl").read_text().splitlines()  # noqa: E731
    assert len(lines("two")) == len(lines("one")) == 1 + one["iterations"]  # one writer: no doubled lines
    steps = lambda r: [(t["accepted"], round(t["sparsity"], 3)) for t in r["trajectory"]]  # noqa: E731
    assert steps(one) == steps(two)
    assert two["final_ppl"] == pytest.approx(one["final_ppl"], rel=1e-3)
    a, b = masks(tmp_path / "one"), masks(tmp_path / "two")
    assert sum(int((a[k] != b[k]).sum()) for k in a) <= 1e-3 * sum(v.numel() for v in a.values())


def test_agent_resume_under_torchrun_continues_rank_0s_journal(tmp_path, one_thread):
    """A 2-process run cut after 1 iteration and resumed with 2 processes ends where an uninterrupted 2-process
    run ends: rank 0 reads the journal and broadcasts it, every rank replays the same steps."""
    model = str(shared_path("models", "stories260K"))
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    # --no-pace: the pace depends on --max-iterations, which this test changes between the cut run and its resume
    agent = [*AGENT, "--no-pace"]
    assert torchrun(["agent", model, *agent, "--out", full]).returncode == 0
    short = [a if a != "3" else "1" for a in agent]  # --max-iterations 1
    assert torchrun(["agent", model, *short, "--out", cut]).returncode == 0
    run = torchrun(["agent", model, *agent, "--out", cut, "--resume"])
    assert run.returncode == 0, run.stderr[-2000:]
    a, b = (json.loads((Path(d) / "report.json").read_text()) for d in (full, cut))
    assert a["iterations"] == 3 and [t["sparsity"] for t in a["trajectory"]] == [t["sparsity"] for t in b["trajectory"]]
    assert masks(Path(full)).keys() == masks(Path(cut)).keys()
    assert all(torch.equal(x, y) for x, y in zip(masks(Path(full)).values(), masks(Path(cut)).values()))
