"""Issue 2 benchmark: dense vs magnitude / Wanda / SparseGPT at 50% unstructured, 4:8 and 2:4.

Model: SmolLM2-135M-Instruct (../shared, GGUF dequantized to fp32). Calibration: C4 docs 0-149
("web" preset), N samples x L tokens. Evaluation: WikiText-2 test perplexity, paper protocol
(rows joined with "\\n\\n", non-overlapping windows), the first W windows (--max-windows; 0 = all).

    python bench/unstructured_compare.py --out docs/bench/unstructured.md
"""
from __future__ import annotations

import argparse
import logging
import time

import torch

from common import Snapshot, machine, md_table, publish, smollm2_path

from prunepilot.api import prune
from prunepilot.eval.perplexity import perplexity
from prunepilot.modeling import load_model_and_tokenizer

CONFIGS = [(m, p) for p in ("unstructured", "4:8", "2:4") for m in ("magnitude", "wanda", "sparsegpt")]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=smollm2_path())
    ap.add_argument("--n-samples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=48, help="0 = whole WikiText-2 test set")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--configs", help="comma-separated METHOD:PATTERN rows to run (default: all 9), "
                    "e.g. wanda:2:4,sparsegpt:unstructured")
    ap.add_argument("--out")
    args = ap.parse_args()
    configs = CONFIGS
    if args.configs:
        configs = [tuple(c.split(":", 1)) for c in args.configs.split(",")]
        unknown = [c for c in configs if c not in CONFIGS]
        if unknown:
            ap.error(f"unknown configs {unknown}; choose from {[m + ':' + p for m, p in CONFIGS]}")
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer(args.model)
    snap = Snapshot(model)
    mw = args.max_windows or None

    def ppl():
        return perplexity(model, tok, "wikitext2", args.eval_seqlen, max_windows=mw)

    t0 = time.time()
    dense = ppl()
    rows = [["dense", "-", 0.0, dense["ppl"], "-", round(time.time() - t0, 1)]]
    print(f"dense: {dense['ppl']:.3f}", flush=True)
    for method, pattern in configs:
        snap.restore(model)
        recipe = {"method": method, "sparsity": args.sparsity, "pattern": pattern, "device": "cpu",
                  "calibration": {"sources": ["web"], "n_samples": args.n_samples, "seqlen": args.seqlen}}
        t0 = time.time()
        rep = prune(model, recipe, tok)
        prune_s = time.time() - t0
        res = ppl()
        rows.append([method, pattern, round(rep.global_sparsity, 4), res["ppl"], round(prune_s, 1), res["seconds"]])
        print(f"{method} {pattern}: {res['ppl']:.3f} ({prune_s:.1f}s)", flush=True)
    table = md_table(["method", "pattern", "sparsity", "wikitext2 ppl", "prune wall s", "eval wall s"], rows)
    protocol = (f"model {args.model}; calibration C4 docs 0-149 ('web'), {args.n_samples} x {args.seqlen} tokens, "
                f"seed 0; WikiText-2 test, seqlen {dense['seqlen']}, {dense['windows']} windows = {dense['tokens']} "
                f"scored tokens; {machine()}")
    publish(table, protocol, args.out)


if __name__ == "__main__":
    main()
