"""Ablation: pooled vs fused multi-domain statistics in iterative FLAP (structured.domain_stats).

    pooled  one running mean / variance of every calibration token (all domains mixed): the variance includes
            the between-domain spread of the channel means
    fused   per-domain running moments, mean = Σ_k w_k μ_k, variance = Σ_k w_k σ²_k (w_k: the --calib weights,
            equal here), the seed's "weighted fusion of per-domain activation statistics"

Model: SmolLM2-135M-Instruct (../shared, GGUF dequantized to fp32); flap_iterative with its defaults (wiki + web +
code + math calibration, 128-token windows, 5 steps, geometric schedule, global ranking, bias compensation) at 20%
and 50% of the decoder blocks' linear parameters. Perplexity (paper protocol, first W windows of L tokens) on
WikiText-2 test, C4 held-out docs 150-199 and CodeParrot test; overlap of the removed MLP channels and KV groups
between the two statistics (Jaccard |A∩B| / |A∪B| over all layers).

    python bench/fusion_ablation.py --out docs/bench/fusion_ablation.md
    # in parallel processes on a busy machine, then one report:
    python bench/fusion_ablation.py --modes pooled --results /tmp/fa.jsonl --no-dense &
    python bench/fusion_ablation.py --modes fused --results /tmp/fa.jsonl
    python bench/fusion_ablation.py --report /tmp/fa.jsonl --out docs/bench/fusion_ablation.md
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import torch

from common import machine, md_table, publish, smollm2_path

from prunepilot.api import prune
from prunepilot.data import TextSource, load_documents, tokenize_stream
from prunepilot.engine import ModelAdapter
from prunepilot.eval.perplexity import perplexity_of_tokens
from prunepilot.modeling import load_model_and_tokenizer

EVALS = [("wikitext2", "wikitext2"), ("c4", "c4"), ("code", "code-test")]


def kept_channels(dense, pruned) -> list[list[int]]:
    """Per layer: the dense indices of the MLP channels kept (down_proj input columns matched exactly; bias
    compensation touches only biases, so kept columns are bit-equal copies)."""
    out = []
    for bd, bp in zip(ModelAdapter(dense).blocks, ModelAdapter(pruned).blocks):
        wd, wp = bd.mlp.down_proj.weight.detach(), bp.mlp.down_proj.weight.detach()
        index = {wd[:, j].numpy().tobytes(): j for j in range(wd.shape[1])}
        out.append(sorted(index[wp[:, k].numpy().tobytes()] for k in range(wp.shape[1])))
    return out


def run_one(args, dense, tok, streams, sparsity: float, mode: str) -> dict:
    model = copy.deepcopy(dense)
    recipe = {"method": "flap_iterative", "sparsity": sparsity, "device": "cpu",
              "calibration": {"n_samples": args.n_samples, "seqlen": args.seqlen, "batch_size": args.batch_size,
                              "seed": args.seed},
              "structured": {"steps": args.steps, "domain_stats": mode}}
    t0 = time.time()
    rep = prune(model, recipe, tok)
    prune_s = time.time() - t0
    ppl = evaluate(args, model, streams)
    return {"sparsity": sparsity, "mode": mode, "seed": args.seed, "ppl": ppl, "prune_s": prune_s,
            "achieved": rep.extra["achieved_sparsity"], "kept_channels": kept_channels(dense, model),
            "kept_groups": [w["kept_kv_groups"] for w in rep.extra["layers"]],
            "sources": rep.calibration["sources"]}


def evaluate(args, model, streams) -> dict:
    out = {}
    for name, _ in EVALS:
        r = perplexity_of_tokens(model, streams[name], args.eval_seqlen, max_windows=args.max_windows)
        out[name] = {"ppl": r["ppl"], "windows": r["windows"], "tokens": r["tokens"]}
    return out


def removed(kept: list[list[int]], dense: int) -> set[tuple[int, int]]:
    return {(i, j) for i, k in enumerate(kept) for j in set(range(dense)) - set(k)}


def overlap(a: dict, b: dict, dense_channels: int, dense_groups: int) -> tuple[float, float]:
    """Jaccard overlap of the removed (layer, channel) and (layer, KV group) sets of two runs."""
    def jac(x, y):
        return len(x & y) / len(x | y) if x | y else 1.0
    return (jac(removed(a["kept_channels"], dense_channels), removed(b["kept_channels"], dense_channels)),
            jac(removed(a["kept_groups"], dense_groups), removed(b["kept_groups"], dense_groups)))


def report(results: list[dict], args) -> None:
    cfg = json.loads(Path(args.model, "config.json").read_text()) if Path(args.model, "config.json").exists() else {}
    dc, dg = cfg.get("intermediate_size", 1536), cfg.get("num_key_value_heads", 3)
    by = {(r["sparsity"], r.get("seed", 0), r["mode"]): r for r in results if r["mode"] != "dense"}
    headers = ["removed", "calibration seed", "statistics", "block sparsity", "wikitext2 ppl", "c4 ppl", "code ppl",
               "removed channels shared with pooled", "removed KV groups shared with pooled", "prune s"]
    rows = [["0%", "-", "dense", 0.0, *(r["ppl"][n]["ppl"] for n, _ in EVALS), "-", "-", "-"]
            for r in results if r["mode"] == "dense"]
    for (s, seed, mode), r in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] != "pooled")):
        ov = overlap(by[(s, seed, "pooled")], r, dc, dg) if (s, seed, "pooled") in by else (float("nan"),) * 2
        ov = ("-", "-") if mode == "pooled" else ov
        rows.append([f"{s:.0%}", seed, mode, r["achieved"], *(r["ppl"][n]["ppl"] for n, _ in EVALS), *ov,
                     round(r["prune_s"], 1)])
    any_r = results[0]["ppl"]
    evals = "; ".join(f"{n}: seqlen {args.eval_seqlen}, {p['windows']} windows = {p['tokens']} scored tokens"
                      for n, p in any_r.items())
    protocol = (f"model {args.model}; flap_iterative, calibration {args.n_samples} x {args.seqlen} tokens "
                f"(calibration seed per row), "
                f"sources wiki+web+code+math (weight 1 each: WikiText-2 validation, C4 docs 0-149, CodeParrot "
                f"validation, GSM8K train), batch {args.batch_size} (fused: batches of one domain), "
                f"{args.steps} steps geometric, global ranking, bias compensation. Perplexity: {evals} (c4 = docs "
                f"150-199, code = CodeParrot test). Shared = Jaccard |pooled ∩ fused| / |pooled ∪ fused| of the "
                f"removed (layer, unit) sets. `python bench/fusion_ablation.py --n-samples {args.n_samples} "
                f"--max-windows {args.max_windows} --eval-seqlen {args.eval_seqlen}`. {machine()}")
    publish(md_table(headers, rows), protocol, args.out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=smollm2_path())
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.5])
    ap.add_argument("--modes", nargs="+", default=["pooled", "fused"], choices=["pooled", "fused"])
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=128, help="calibration tokens per sample")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0, help="calibration seed")
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=16, help="windows per evaluation set")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-dense", action="store_true", help="skip the dense row")
    ap.add_argument("--results", help="append each run as a JSON line here")
    ap.add_argument("--report", help="only write the table from this JSON-lines file")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)  # before the report too: the protocol line states the runs' threads
    if args.report:
        return report([json.loads(line) for line in Path(args.report).read_text().splitlines() if line], args)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    dense, tok = load_model_and_tokenizer(args.model)
    streams = {name: tokenize_stream(tok, load_documents(TextSource.parse(src)), add_special_tokens=True)
               for name, src in EVALS}
    results = []

    def keep(r):
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if not k.startswith("kept")}), flush=True)
        if args.results:
            with open(args.results, "a") as f:
                f.write(json.dumps(r) + "\n")

    if not args.no_dense:
        keep({"sparsity": 0.0, "mode": "dense", "ppl": evaluate(args, dense, streams), "prune_s": 0.0,
              "achieved": 0.0, "kept_channels": [], "kept_groups": []})
    for s in args.sparsities:
        for mode in args.modes:
            keep(run_one(args, dense, tok, streams, s, mode))
    report(results, args)


if __name__ == "__main__":
    main()
