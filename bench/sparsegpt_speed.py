"""SparseGPT prune time of two source trees (e.g. before and after a change), one torch thread, same run.

    git worktree add /tmp/before 765feaf            # the tree to compare against
    python bench/sparsegpt_speed.py --trees /tmp/before/src src --rounds 2 --out docs/bench/sparsegpt_speed.md

Each measurement is a fresh process (PYTHONPATH=<tree>) that loads SmolLM2-135M from ../shared, draws the same
calibration windows and runs prune(method=sparsegpt); the number is the process CPU time of prune() alone, which
other jobs on a shared machine disturb far less than wall time. Trees alternate within each round. The floor
column is what no SparseGPT on this engine can avoid (both block forwards and the Hessian products, measured with
the after tree): before / floor is the largest speed-up any sweep could give on this run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from common import md_table, publish, smollm2_path

CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(1)
from prunepilot.api import prune
from prunepilot.data import calibration_blocks
from prunepilot.modeling import load_model_and_tokenizer
model, tok = load_model_and_tokenizer(sys.argv[1])
ids, _ = calibration_blocks(tok, ["web"], int(sys.argv[3]), int(sys.argv[4]), 0)
c0, t0 = time.process_time(), time.time()
rep = prune(model, {"method": "sparsegpt", "sparsity": 0.5, "pattern": sys.argv[2], "device": "cpu"}, calibration=ids)
print(json.dumps({"cpu_s": time.process_time() - c0, "wall_s": time.time() - t0, "sparsity": rep.global_sparsity}))
"""


# The part no SparseGPT implementation on this engine can avoid: the two forwards per block (statistics, then the
# pruned outputs) and the Hessian products X^T X, with no mask selection, inverse or sweep (the after tree's code).
FLOOR = r"""
import json, sys, time, torch
torch.set_num_threads(1)
from prunepilot.data import calibration_blocks
from prunepilot.engine import ModelAdapter, blocks, weight_2d
from prunepilot.methods.sparsegpt import HessianState
from prunepilot.modeling import load_model_and_tokenizer
model, tok = load_model_and_tokenizer(sys.argv[1])
ids, _ = calibration_blocks(tok, ["web"], int(sys.argv[3]), int(sys.argv[4]), 0)
c0 = time.process_time()
with torch.no_grad():
    for blk in blocks(ModelAdapter(model), ids, "cpu", states=lambda n, m: HessianState(weight_2d(m).shape[1], "cpu")):
        pass
print(json.dumps({"cpu_s": time.process_time() - c0}))
"""


def measure(tree: str, pattern: str, n: int, seqlen: int, child: str = CHILD) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve()), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", child, smollm2_path(), pattern, str(n), str(seqlen)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trees", nargs=2, required=True, metavar=("BEFORE", "AFTER"), help="two src/ folders")
    ap.add_argument("--patterns", default="unstructured,2:4")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--out")
    args = ap.parse_args()
    rows = []
    for pattern in args.patterns.split(","):
        cpu = {t: [] for t in args.trees}
        for _ in range(args.rounds):
            for tree in args.trees:
                cpu[tree].append(measure(tree, pattern, args.n_samples, args.seqlen)["cpu_s"])
                print(pattern, tree, f"{cpu[tree][-1]:.1f}s", flush=True)
        floor = min(measure(args.trees[1], pattern, args.n_samples, args.seqlen, FLOOR)["cpu_s"]
                    for _ in range(args.rounds))
        before, after = (min(cpu[t]) for t in args.trees)
        rows.append([pattern, f"{before:.1f}", f"{after:.1f}", f"{before / after:.2f}x", f"{floor:.1f}",
                     f"{before / floor:.2f}x"])
    publish(md_table(["pattern", "before: CPU s", "after: CPU s", "speed-up", "floor: passes + Hessians CPU s",
                      "before / floor"], rows),
            f"SmolLM2-135M, SparseGPT 50%, calibration {args.n_samples} x {args.seqlen} web tokens, one torch thread, "
            f"process CPU time of prune() (best of {args.rounds}, trees alternating); before = {args.trees[0]}, "
            f"after = {args.trees[1]}; floor = the after tree's engine passes with Hessian accumulation only (no "
            f"selection, inverse or sweep): the most any SparseGPT on this engine could save", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
