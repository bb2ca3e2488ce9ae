"""Issue 16's GPU measurements in one call (<= 8 minutes on an H100/H200): SparseGPT 50% on an 8B-shaped Qwen3,
one agent iteration at 8B split into its phases, FLAP 50% prefill speed against its FLOP ratio, and Wanda on a 32B-shaped Qwen3 whose weights stay in CPU
memory (one block on the GPU at a time): peak GPU memory and host RSS. Random weights (quality is measured on
real models on the CPU by the other bench scripts); every part prints one JSON line as soon as it ends, so a run
cut short still reports what finished.

    python bench/gpu_scale.py --out docs/bench/gpu_scale.jsonl                  # on the GPU machine
    python bench/gpu_scale.py --shape tiny --big-shape tiny --device cpu        # smoke run (tests/test_bench.py)

Agent phases (one iteration after the start): controller decision, prune + re-profile pass, held-out
perplexity, gradients (when refreshed), checkpoint and mask hash: the loop's own timers, read from the journal.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from gpu_agent import timed_agent_run  # noqa: E402
from gpu_engine import SHAPES, build, n_params  # noqa: E402

from prunepilot.api import prune  # noqa: E402
from prunepilot.eval.flops import ideal_speedup  # noqa: E402
from prunepilot.eval.speed import measure_speed  # noqa: E402


def emit(record: dict, out: Path | None) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def gpu_peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def ids(shape: str, n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, SHAPES[shape]["vocab_size"], (n, seqlen), generator=g)


def sparsegpt(args) -> dict:
    model = build(args.shape, getattr(torch, args.dtype), args.device)
    reset_peak(args.device)
    t0 = time.time()
    rep = prune(model, {"method": "sparsegpt", "sparsity": 0.5, "device": args.device},
                calibration=ids(args.shape, args.n_samples, args.seqlen))
    return {"part": "sparsegpt_50", "shape": args.shape, "params": n_params(model), "seconds": round(time.time() - t0, 1),
            "prune_s": round(rep.timings["prune_s"], 1), "global_sparsity": round(rep.global_sparsity, 4),
            "peak_gpu_gib": gpu_peak_gib(args.device)}


def agent(args) -> dict:
    model = build(args.shape, getattr(torch, args.dtype), args.device)
    cfg = {"target_sparsity": 0.5, "max_iterations": 1, "device": args.device, "grad_samples": args.grad_samples,
           "grad_refresh_every": 1, "save_model": False, "eval_tokens": 4 * args.seqlen, "eval_seqlen": args.seqlen,
           "calibration": {"n_samples": args.n_samples, "seqlen": args.seqlen}}
    calib = ids(args.shape, args.n_samples, args.seqlen)
    held = ids(args.shape, 1, 4 * args.seqlen, seed=1).flatten()
    res, wall, iteration = timed_agent_run(model, cfg, calib, held)
    return {"part": "agent_8b", "shape": args.shape, "wall_s": round(wall, 1),
            "iteration_s": [r.seconds for r in iteration],
            "phase_s": [r.phases for r in iteration],  # the loop's own timers, from the journal
            "start_s": round(wall - sum(r.seconds for r in iteration), 1),
            "iterations": res.iterations, "peak_gpu_gib": gpu_peak_gib(args.device)}


def structured(args) -> dict:
    """FLAP 50% (widths x128) against the dense model: prefill speed-up (median of alternating pairs, last-position
    logits) next to the FLOP ratio it would reach if every kernel ran equally fast (eval/flops.py)."""
    dense = build(args.shape, getattr(torch, args.dtype), args.device)
    pruned = build(args.shape, getattr(torch, args.dtype), args.device)
    multiple = min(128, SHAPES[args.shape]["intermediate_size"] // 16)  # 128 at 8B; smaller for the smoke shape
    prune(pruned, {"method": "flap", "sparsity": 0.5, "device": args.device,
                   "structured": {"channel_multiple": multiple}}, calibration=ids(args.shape, args.n_samples, args.seqlen))
    run = lambda m: measure_speed(m, args.prefill_seq, args.prefill_batch, 0, repeats=1, warmup=0)  # noqa: E731
    warm = run(dense), run(pruned)
    pairs = [(run(dense)["prefill_tok_s"], run(pruned)["prefill_tok_s"]) for _ in range(3)]
    return {"part": "structured_prefill", "shape": args.shape, "params_after": n_params(pruned), "channel_multiple": multiple,
            "prefill": f"{args.prefill_batch} x {args.prefill_seq}", "prefill_logits": warm[0]["prefill_logits"],
            "prefill_speedup": round(statistics.median(p / d for d, p in pairs), 3),
            "ideal_flops_speedup": round(ideal_speedup(dense, pruned, args.prefill_seq), 3),
            "ideal_flops_speedup_all_logits": round(ideal_speedup(dense, pruned, args.prefill_seq, False), 3)}


def big_wanda(args) -> dict:
    """The model stays in CPU memory; the engine moves one block at a time to the GPU."""
    model = build(args.big_shape, getattr(torch, args.dtype), "cpu")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    reset_peak(args.device)
    t0 = time.time()
    rep = prune(model, {"method": "wanda", "sparsity": 0.5, "device": args.device},
                calibration=ids(args.big_shape, args.n_samples, args.seqlen))
    return {"part": "wanda_big_on_cpu", "shape": args.big_shape, "params": n_params(model),
            "seconds": round(time.time() - t0, 1), "global_sparsity": round(rep.global_sparsity, 4),
            "peak_gpu_gib": gpu_peak_gib(args.device),
            "host_rss_gib_max": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "host_rss_gib_after_build": round(rss_before, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="8b")
    ap.add_argument("--big-shape", choices=SHAPES, default="32b")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--grad-samples", type=int, default=4)
    ap.add_argument("--prefill-batch", type=int, default=8)
    ap.add_argument("--prefill-seq", type=int, default=1024)
    ap.add_argument("--parts", default="sparsegpt,agent,structured,big", help="comma-separated subset")
    ap.add_argument("--out", type=Path, help="append the JSON lines here too")
    args = ap.parse_args()
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    emit({"part": "environment", "gpu": gpu, "torch": torch.__version__}, args.out)
    for part in args.parts.split(","):
        record = {"sparsegpt": sparsegpt, "agent": agent, "structured": structured, "big": big_wanda}[part](args)
        emit(record, args.out)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
