"""Wall time of the agent loop at full scale: an 8B-shaped Qwen3 (random weights) on a GPU, built-in policy.

Quality needs real weights (bench/agent_compare.py on SmolLM2-135M, CPU); this script answers how long the
loop takes on an 8B model: the start (Wanda profile, held-out perplexity, gradient importance) and each
iteration (controller, pruning + re-profiling, held-out perplexity, the touched layers' checkpoint for a
rollback, the mask hash written to the journal, gradients every few accepted steps). Random weights give
a meaningless perplexity trajectory, so accept / roll back decisions here are not a quality result.

    python bench/gpu_agent.py --out docs/bench/gpu_agent.md
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from gpu_engine import SHAPES, build, n_params  # noqa: E402

from prunepilot.agent.journal import Journal  # noqa: E402
from prunepilot.agent.loop import run_agent  # noqa: E402
from prunepilot.io import atomic_write_text  # noqa: E402


def timed_agent_run(model, cfg: dict, calib, held):
    """run_agent in a scratch folder: (AgentResult, wall seconds, the journal's IterationRecords)."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        res = run_agent(model, None, cfg, tmp, calibration=calib, held_out=held)
        wall = time.time() - t0
        _, records = Journal(Path(tmp) / "journal.jsonl").read()
    return res, wall, records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="8b")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--max-iterations", type=int, default=6)
    ap.add_argument("--grad-samples", type=int, default=8)
    ap.add_argument("--grad-mode", default="full", choices=["full", "blockwise"])
    ap.add_argument("--out", help="markdown summary (atomic write)")
    args = ap.parse_args()
    # the loop's own per-iteration log lines, timestamped: a run cut off by a time limit still shows its progress
    logging.basicConfig(level=logging.INFO, format="%(relativeCreated)8.0f ms %(name)s: %(message)s",
                        stream=sys.stdout)
    vocab = SHAPES[args.shape]["vocab_size"]
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, vocab, (args.n_samples, args.seqlen), generator=gen)
    held = torch.randint(0, vocab, (args.eval_tokens,), generator=gen)
    model = build(args.shape, getattr(torch, args.dtype), args.device)
    cfg = {"target_sparsity": 0.5, "max_iterations": args.max_iterations, "device": args.device,
           "grad_samples": args.grad_samples, "grad_mode": args.grad_mode, "save_model": False,
           "eval_tokens": args.eval_tokens, "eval_seqlen": args.seqlen,
           "calibration": {"n_samples": args.n_samples, "seqlen": args.seqlen}}
    res, wall, iters = timed_agent_run(model, cfg, calib, held)
    per_iter = [r.seconds for r in iters]
    start_s = wall - sum(per_iter)
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else float("nan")
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    summary = {"shape": args.shape, "params": n_params(model), "dtype": args.dtype, "gpu": gpu,
               "iterations": res.iterations, "rollbacks": res.rollbacks, "global_sparsity": round(res.global_sparsity, 4),
               "wall_s": round(wall, 1), "start_s": round(start_s, 1),
               "iteration_s_median": round(statistics.median(per_iter), 1) if per_iter else None,
               "iteration_s": per_iter, "grad_refreshes": sum(r.grad is not None for r in iters),
               "peak_gpu_gib": round(peak, 2), "stop_reason": res.stop_reason}
    print(json.dumps(summary), flush=True)
    text = (f"| model | iterations | rollbacks | sparsity reached | start (s) | iteration, median (s) | total (s) | "
            f"peak GPU memory (GiB) |\n|---|---|---|---|---|---|---|---|\n"
            f"| {args.shape}-shaped Qwen3, {summary['params'] / 1e9:.2f}B, {args.dtype} | {res.iterations} | "
            f"{res.rollbacks} | {res.global_sparsity:.3f} | {start_s:.1f} | {summary['iteration_s_median']} | "
            f"{wall:.1f} | {peak:.1f} |\n\nProtocol: random weights built on {gpu}, torch {torch.__version__}; "
            f"built-in policy, target 0.5, at most {args.max_iterations} iterations; calibration {args.n_samples} x "
            f"{args.seqlen} random tokens, held-out {args.eval_tokens} tokens in windows of {args.seqlen}; gradients "
            f"({args.grad_mode}) on {args.grad_samples} samples at the start and every 3 accepted steps "
            f"({summary['grad_refreshes']} refreshes). 'start' = profile + baseline perplexity + first gradients. "
            f"Per-iteration seconds: {per_iter}.\n")
    print(text)
    if args.out:
        atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()
