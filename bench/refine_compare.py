"""Issue 24 benchmark: Wanda, RIA and SparseGPT at 50% / 60% unstructured and 2:4, each without and with the DSnoT
refinement (--refine dsnot, its default options), on SmolLM2-135M-Instruct.

Calibration: C4 docs 0-149 ("web"), N x L tokens, seed 0. Evaluation: WikiText-2 test perplexity (paper protocol),
the first W windows of --eval-seqlen tokens. Resumable: every finished row is appended to OUT.jsonl and skipped
when the same command runs again; the markdown table is rewritten after each row.

    python bench/refine_compare.py --out docs/bench/refine_compare.md
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from common import Snapshot, machine, md_table, publish, smollm2_path

from prunepilot.api import prune
from prunepilot.eval.perplexity import perplexity
from prunepilot.modeling import load_model_and_tokenizer

SETTINGS = [(0.6, "unstructured"), (0.5, "2:4"), (0.5, "unstructured")]  # in the order they run
CONFIGS = [(m, s, p, r) for s, p in SETTINGS for m in ("wanda", "ria", "sparsegpt") for r in ("none", "dsnot")]
HEADERS = ["method", "sparsity", "pattern", "refine", "global sparsity", "wikitext2 ppl", "prune wall s"]


def key(method, sparsity, pattern, refine) -> str:
    return f"{method}/{sparsity}/{pattern}/{refine}"


def load_done(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["key"]: r for r in rows}


def run_row(model, tok, args, method, sparsity, pattern, refine) -> dict:
    recipe = {"method": method, "sparsity": sparsity, "pattern": pattern, "device": "cpu", "refine": refine,
              "calibration": {"sources": ["web"], "n_samples": args.n_samples, "seqlen": args.seqlen}}
    t0 = time.time()
    rep = prune(model, recipe, tok)
    prune_s = time.time() - t0
    res = perplexity(model, tok, "wikitext2", args.eval_seqlen, max_windows=args.max_windows)
    return {"key": key(method, sparsity, pattern, refine), "row": [method, sparsity, pattern, refine,
            round(rep.global_sparsity, 4), round(res["ppl"], 3), round(prune_s, 1)],
            "tokens": res["tokens"], "seqlen": res["seqlen"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=smollm2_path())
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-seqlen", type=int, default=1024)
    ap.add_argument("--max-windows", type=int, default=32)
    ap.add_argument("--out", default="docs/bench/refine_compare.md")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    store = Path(args.out).with_suffix(".jsonl")
    done = load_done(store)
    model, tok = load_model_and_tokenizer(args.model)
    snap = Snapshot(model)
    if "dense" not in done:
        res = perplexity(model, tok, "wikitext2", args.eval_seqlen, max_windows=args.max_windows)
        done["dense"] = {"key": "dense", "row": ["dense", 0.0, "-", "-", 0.0, round(res["ppl"], 3), 0.0],
                         "tokens": res["tokens"], "seqlen": res["seqlen"]}
        store.parent.mkdir(parents=True, exist_ok=True)
        with store.open("a") as f:
            f.write(json.dumps(done["dense"]) + "\n")
    for config in CONFIGS:
        if key(*config) in done:
            continue
        snap.restore(model)
        done[key(*config)] = run_row(model, tok, args, *config)
        print(done[key(*config)]["row"], flush=True)
        with store.open("a") as f:
            f.write(json.dumps(done[key(*config)]) + "\n")
        write_table(done, args)
    write_table(done, args)


def write_table(done: dict, args) -> None:
    rows = [done["dense"]["row"]] + [done[key(*c)]["row"] for c in CONFIGS if key(*c) in done]
    protocol = (f"model {args.model}; calibration C4 docs 0-149 ('web'), {args.n_samples} x {args.seqlen} tokens, "
                f"seed 0; WikiText-2 test, seqlen {done['dense']['seqlen']}, {args.max_windows} windows = "
                f"{done['dense']['tokens']} scored tokens; DSnoT defaults (50 cycles, threshold 0.1, MLP skipped); "
                f"{len(rows) - 1} of {len(CONFIGS)} rows; {machine()}")
    publish(md_table(HEADERS, rows), protocol, args.out)


if __name__ == "__main__":
    main()
