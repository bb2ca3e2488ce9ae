"""Data-parallel calibration: `prunepilot prune` as one process versus `torchrun --nproc-per-node N`, one thread
per process, same command. Reports the pruning time (report.json timings.prune_s, model loading excluded) of each,
their ratio, and how many mask entries differ between the two saved models (float sums over N shards).

    python bench/distributed_speed.py --methods wanda,sparsegpt --out docs/bench/distributed_speed.md

Meaningful only on a machine with at least N idle cores (or N GPUs with --device cuda).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from common import machine, md_table, publish, smollm2_path


def prune(model: str, method: str, out: Path, n: int, seqlen: int, procs: int, device: str) -> dict:
    args = ["prune", model, "--method", method, "--sparsity", "0.5", "--calib", "web", "--n-samples", str(n),
            "--seqlen", str(seqlen), "--eval", "none", "--device", device, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    if procs == 1:
        cmd = [sys.executable, "-m", "prunepilot", *args]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node", str(procs), "--master-addr",
               "127.0.0.1", "--master-port", str(port), "-m", "prunepilot", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed:\n{res.stderr[-3000:]}")
    return json.loads((out / "report.json").read_text())


def mask_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = (load_file(next((d / "model").glob("*.safetensors"))) for d in (a, b))
    keys = [k for k in x if x[k].dim() == 2 and "layers" in k]
    return sum(int(((x[k] == 0) != (y[k] == 0)).sum()) for k in keys) / sum(x[k].numel() for k in keys)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=smollm2_path())
    ap.add_argument("--methods", default="wanda,sparsegpt")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out")
    args = ap.parse_args()
    rows = []
    for method in args.methods.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            one = prune(args.model, method, Path(tmp) / "one", args.n_samples, args.seqlen, 1, args.device)
            many = prune(args.model, method, Path(tmp) / "many", args.n_samples, args.seqlen, args.procs, args.device)
            diff = mask_difference(Path(tmp) / "one", Path(tmp) / "many")
        t1, tn = one["timings"]["prune_s"], many["timings"]["prune_s"]
        rows.append([method, f"{t1:.1f}", f"{tn:.1f}", f"{t1 / tn:.2f}x",
                     "/".join(map(str, many["distributed"]["samples_per_rank"])), f"{100 * diff:.3f}%"])
        print(rows[-1], flush=True)
    publish(md_table(["method", "1 process: prune s", f"{args.procs} processes: prune s", "speed-up",
                      "samples per rank", "mask entries differing"], rows),
            f"{Path(args.model).name}, 50%, calibration {args.n_samples} x {args.seqlen} web tokens, one thread per "
            f"process, device {args.device}, pruning time from report.json (loading excluded); {machine()}", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
