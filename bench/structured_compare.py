"""Structured pruning benchmark: Wanda-sp vs FLAP (one shot) vs iterative multi-domain FLAP.

Model: SmolLM2-135M-Instruct (../shared, GGUF dequantized to fp32), 20% and 50% of the decoder blocks'
linear parameters removed (whole MLP channels and KV head groups; the model gets physically smaller).

    wanda_sp        sum|W|*||X|| scores, uniform per-layer ratios, no bias compensation; "web" calibration
    flap            fluctuation metric, global ranking, bias compensation; single-domain "web" calibration
                    (C4 docs 0-149)
    flap_iterative  FLAP in --steps steps (geometric schedule), statistics re-measured on the partly pruned
                    model; calibration mixed from wiki + web + code + math (equal weights)

All methods use N samples x 128 calibration tokens (FLAP-style seqlen, DESIGN.md). Evaluation: perplexity
with the paper protocol (rows joined with "\\n\\n", non-overlapping windows) on WikiText-2 test, C4 held-out
docs 150-199 and CodeParrot test, the first W windows of L tokens each; speed: prefill / decode tokens per
second relative to the dense model on the same machine, measured in alternating dense/pruned pairs (the
median of the per-pair ratios), so load from other processes on a shared machine cancels out.

    python bench/structured_compare.py --out docs/bench/structured.md
    python bench/structured_compare.py --quick
"""
from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time

import torch

from common import machine, md_table, publish, smollm2_path

from prunepilot.api import prune
from prunepilot.data import TextSource, load_documents, tokenize_stream
from prunepilot.eval.perplexity import perplexity_of_tokens
from prunepilot.modeling import load_model_and_tokenizer
from prunepilot.eval.speed import measure_speed

EVALS = [("wikitext2", "wikitext2"), ("c4", "c4"), ("code", "code-test")]
METHODS = "wanda_sp:web,flap:web,flap_iterative:wiki+web+code+math"
# ablations that separate the two changes of the iterative multi-domain variant:
#   --methods flap:wiki+web+code+math,flap_iterative:web


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=smollm2_path())
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.5])
    ap.add_argument("--n-samples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=128, help="calibration tokens per sample")
    ap.add_argument("--steps", type=int, default=5, help="flap_iterative steps")
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=16, help="windows per evaluation set (0 = all)")
    ap.add_argument("--speed-seq", type=int, default=128)
    ap.add_argument("--speed-new", type=int, default=16)
    ap.add_argument("--speed-repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is far faster than oversubscribing a busy 2-core machine)")
    ap.add_argument("--methods", default=METHODS, help="comma-separated METHOD:SOURCE+SOURCE... rows to run")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense row's perplexity (ablation runs)")
    ap.add_argument("--skip-ppl", action="store_true", help="speed and sizes only (perplexity columns left empty)")
    ap.add_argument("--quick", action="store_true", help="small smoke run: 8 samples, 2 windows of 256, 2 steps")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.quick:
        args.n_samples, args.max_windows, args.steps, args.speed_repeats = 8, 2, 2, 2
        args.eval_seqlen, args.speed_new = 256, 8
    methods = [(m, src.split("+")) for m, _, src in (entry.partition(":") for entry in args.methods.split(","))]
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense_model, tok = load_model_and_tokenizer(args.model)
    streams = {} if args.skip_ppl else {
        name: tokenize_stream(tok, load_documents(TextSource.parse(src)), add_special_tokens=True)
        for name, src in EVALS}
    mw = args.max_windows or None
    proto = {}

    def evaluate(model) -> dict:
        if args.skip_ppl:
            return {name: float("nan") for name, _ in EVALS}
        out = {}
        for name, _ in EVALS:
            r = perplexity_of_tokens(model, streams[name], args.eval_seqlen, max_windows=mw)
            out[name] = r["ppl"]
            proto[name] = (r["seqlen"], r["windows"], r["tokens"])
        return out

    def speed(model) -> dict:
        return measure_speed(model, args.speed_seq, 1, args.speed_new, repeats=1, warmup=0)

    def speed_ratios(model) -> dict:
        """Median over alternating (dense, pruned) measurements of pruned / dense throughput."""
        speed(dense_model), speed(model)  # warm-up
        pairs = [(speed(dense_model), speed(model)) for _ in range(args.speed_repeats)]
        return {k: statistics.median(p[k] / d[k] for d, p in pairs) for k in ("prefill_tok_s", "decode_tok_s")}

    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    t0 = time.time()
    dense_ppl = None if args.no_dense else evaluate(dense_model)
    speed(dense_model)
    dense_speed = {k: statistics.median(r[k] for r in (speed(dense_model) for _ in range(3)))
                   for k in ("prefill_tok_s", "decode_tok_s")}
    print(f"dense: {dense_ppl} {dense_speed} ({time.time() - t0:.0f}s)", flush=True)
    headers = ["removed", "method", "calibration", "params (M)", "block sparsity", "KV groups kept", "MLP channels kept",
               "wikitext2 ppl", "c4 ppl", "code ppl", "prefill x", "decode x", "prune s"]
    cfg = dense_model.config
    dense_units = (cfg.num_key_value_heads * cfg.num_hidden_layers, cfg.intermediate_size * cfg.num_hidden_layers)
    rows = [] if dense_ppl is None else [["0%", "dense", "-", n_params(dense_model) / 1e6, 0.0, 1.0, 1.0,
                                          *(dense_ppl[n] for n, _ in EVALS), 1.0, 1.0, "-"]]
    for s in args.sparsities:
        for method, sources in methods:
            model = copy.deepcopy(dense_model)
            recipe = {"method": method, "sparsity": s, "device": "cpu",
                      "calibration": {"sources": sources, "n_samples": args.n_samples, "seqlen": args.seqlen,
                                      "batch_size": 8},
                      "structured": {"steps": args.steps} if method == "flap_iterative" else {}}
            t0 = time.time()
            rep = prune(model, recipe, tok)
            prune_s = time.time() - t0
            ppl = evaluate(model)
            sp = speed_ratios(model)
            kept = (sum(w["num_kv_heads"] for w in rep.extra["layers"]) / dense_units[0],
                    sum(w["intermediate_size"] for w in rep.extra["layers"]) / dense_units[1])
            rows.append([f"{s:.0%}", method, "+".join(sources), n_params(model) / 1e6, rep.extra["achieved_sparsity"],
                         *kept, *(ppl[n] for n, _ in EVALS), sp["prefill_tok_s"], sp["decode_tok_s"],
                         round(prune_s, 1)])
            print(f"{s:.0%} {method}: {ppl} prefill x{rows[-1][-3]:.2f} decode x{rows[-1][-2]:.2f} "
                  f"({prune_s:.0f}s prune)", flush=True)
            del model
    table = md_table(headers, rows)
    evals = "; ".join(f"{n}: seqlen {p[0]}, {p[1]} windows = {p[2]} scored tokens" for n, p in proto.items())
    evals = "not measured (--skip-ppl)" if args.skip_ppl else evals
    protocol = (f"model {args.model}; calibration {args.n_samples} x {args.seqlen} tokens, seed 0 (web = C4 docs "
                f"0-149; wiki = WikiText-2 validation, code = CodeParrot validation, math = GSM8K train); "
                f"flap_iterative {args.steps} steps, geometric schedule. Perplexity: {evals} (c4 = docs 150-199, "
                f"code = CodeParrot test). Speed: batch 1, prefill {args.speed_seq} tokens, decode "
                f"{args.speed_new} tokens, median of {args.speed_repeats} alternating dense/pruned pairs; dense about "
                f"{dense_speed['prefill_tok_s']:.0f} "
                f"prefill / {dense_speed['decode_tok_s']:.1f} decode tok/s. 'block sparsity' = fraction of the decoder "
                f"blocks' linear parameters removed (compensation biases counted). {machine()}")
    publish(table, protocol, args.out)


if __name__ == "__main__":
    main()
