"""Issue 24 benchmark: Wanda, RIA and SparseGPT at unstructured sparsities and N:M patterns, each without and with
the DSnoT refinement (--refine dsnot, its default options), optionally under OWL / evo allocation, with perplexity on
WikiText-2 and code, GSM8K and a zero-shot average, and the prune time of every row.

Calibration: C4 docs 0-149 ("web"), N x L tokens, seed 0, the same windows for every row. Evaluation: WikiText-2
test perplexity (paper protocol) and CodeParrot test perplexity, the first W windows of --eval-seqlen tokens;
GSM8K (8-shot, greedy, exact match, the first --gsm8k-limit test items) and the zero-shot tasks (--zeroshot, the
first --limit items each) when asked. A GGUF --model is dequantized once into ~/.cache/prunepilot/float.

Resumable: every finished row is one GridRow line of OUT.jsonl with the protocol it ran under; a rerun with the same
protocol skips the rows already there (so a long grid is built by several runs, e.g. --settings 0.6 then 2:4), and
the markdown table is rewritten from all of them after each row.

    python bench/refine_compare.py --out docs/bench/refine_compare_smollm2.md                # SmolLM2-135M
    python bench/refine_compare.py --model ~/.cache/prunepilot/models/qwen2.5-coder-0.5b-instruct \\
        --settings 0.5,0.6,0.7,2:4 --n-samples 8 --max-windows 4 --out docs/bench/refine_compare_qwen05.md
"""
from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from common import (Snapshot, float_folder, machine, md_table, method_with_options, publish, settings_fingerprint,
                    smollm2_path, task_scores)

from prunepilot.api import prune
from prunepilot.eval.perplexity import perplexity
from prunepilot.io import JsonLines
from prunepilot.modeling import load_model_and_tokenizer


@dataclass(frozen=True)
class Setting:
    """One row's pruning: method, target (a sparsity, or an N:M pattern at 50%), refinement, allocation."""
    method: str                   # a method name, optionally with options: "ria@permute=greedy"
    target: str                   # "0.6" or "2:4"
    refine: str = "none"
    allocation: str = "uniform"

    @property
    def key(self) -> str:
        return f"{self.method}/{self.target}/{self.refine}/{self.allocation}"

    def recipe(self, args) -> dict:
        nm = ":" in self.target
        name, options = method_with_options(self.method)
        return {"method": name, "method_options": options, "sparsity": 0.5 if nm else float(self.target),
                "pattern": self.target if nm else "unstructured", "device": "cpu", "refine": self.refine,
                "calibration": {"sources": ["web"], "n_samples": args.n_samples, "seqlen": args.seqlen, "seed": 0},
                "allocation": {"kind": self.allocation}}


@dataclass
class GridRow:
    """One finished row, as OUT.jsonl keeps it."""
    key: str
    protocol: str
    method: str
    target: str
    refine: str
    allocation: str
    global_sparsity: float
    metrics: dict                 # "ppl", "code ppl", "gsm8k", zero-shot tasks and "zero-shot avg", in %
    prune_s: float
    eval_s: float
    n: dict = field(default_factory=dict)  # items per task, scored tokens per perplexity set


def settings(args) -> list[Setting]:
    """Every combination asked, in the order they run (target first, so one --settings value finishes first)."""
    out = []
    for target in args.settings.split(","):
        for alloc in args.allocations.split(","):
            if alloc != "uniform" and ":" in target:
                continue  # N:M fixes every row's sparsity: no allocation to choose
            out += [Setting(m, target, r, alloc) for m in args.methods.split(";") for r in args.refines.split(",")]
    return out


def protocol_key(args) -> str:
    """The settings every row's numbers depend on (not which rows run, nor where they go)."""
    return settings_fingerprint(args, ("settings", "methods", "refines", "allocations", "out"))


def evaluate(model, tok, args) -> tuple[dict, dict, float]:
    t0 = time.time()
    metrics, n = {}, {}
    for name, dataset in (("ppl", "wikitext2"), ("code ppl", args.code_ppl)):
        if dataset:
            res = perplexity(model, tok, dataset, args.eval_seqlen, max_windows=args.max_windows or None)
            metrics[name], n[name] = round(res["ppl"], 3), res["tokens"]
    if args.gsm8k_limit:
        scores, counts = task_scores(model, tok, ["gsm8k"], args.gsm8k_limit, args.batch_size)
        metrics.update(scores)
        n.update(counts)
    tasks = [t for t in args.zeroshot.split(",") if t]
    if tasks:
        scores, counts = task_scores(model, tok, tasks, args.limit, args.batch_size)
        metrics.update(scores)
        n.update(counts)
        metrics["zero-shot avg"] = sum(metrics[t] for t in tasks) / len(tasks)
    return metrics, n, round(time.time() - t0, 1)


def run_row(model, tok, args, protocol: str, s: Setting) -> GridRow:
    t0 = time.time()
    rep = prune(model, s.recipe(args), tok)
    prune_s = round(time.time() - t0, 1)
    metrics, n, eval_s = evaluate(model, tok, args)
    return GridRow(s.key, protocol, s.method, s.target, s.refine, s.allocation, round(rep.global_sparsity, 4),
                   metrics, prune_s, eval_s, n)


def columns(args) -> list[str]:
    cols = ["ppl"] + (["code ppl"] if args.code_ppl else []) + (["gsm8k"] if args.gsm8k_limit else [])
    return cols + (["zero-shot avg"] if args.zeroshot else [])


def write_table(rows: dict[str, GridRow], order: list[str], args) -> None:
    cols = columns(args)
    shown = [rows["dense"]] + [rows[k] for k in order if k in rows and k != "dense"]
    table = [[r.method, r.target, r.refine, r.allocation, r.global_sparsity,
              *[r.metrics.get(c, "-") for c in cols], r.prune_s, r.eval_s] for r in shown]
    d = rows["dense"]
    protocol = (f"model {args.model}; calibration C4 docs 0-149 ('web'), {args.n_samples} x {args.seqlen} tokens, "
                f"seed 0; WikiText-2 test and {args.code_ppl or 'no'} code perplexity, seqlen {args.eval_seqlen}, "
                f"the first {args.max_windows or 'all'} windows ({d.n.get('ppl')} / {d.n.get('code ppl', '-')} scored "
                f"tokens)" + (f"; GSM8K 8-shot greedy exact match, {d.n.get('gsm8k')} items" if args.gsm8k_limit else "")
                + (f"; zero-shot average over {args.zeroshot} ({args.limit or 'all'} items each; acc_norm for "
                   f"arc_challenge / hellaswag / openbookqa, else acc)" if args.zeroshot else "")
                + f"; DSnoT defaults (50 cycles, threshold 0.1, MLP skipped); scores in %; {len(shown) - 1} rows; "
                f"{machine()}; protocol {d.protocol}")
    headers = ["method", "target", "refine", "allocation", "global sparsity", *cols, "prune s", "eval s"]
    publish(md_table(headers, table), protocol, args.out)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=smollm2_path())
    ap.add_argument("--settings", default="0.6,2:4,0.5", help="sparsities and N:M patterns, in the order they run")
    ap.add_argument("--methods", default="wanda;ria;sparsegpt",
                    help="';'-separated, each NAME or NAME@key=value,... (method options, e.g. ria@permute=greedy,a=0.5)")
    ap.add_argument("--refines", default="none,dsnot")
    ap.add_argument("--allocations", default="uniform", help="uniform, owl, evo (unstructured targets only)")
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-seqlen", type=int, default=1024)
    ap.add_argument("--max-windows", type=int, default=32, help="perplexity windows per set (0 = all)")
    ap.add_argument("--code-ppl", default="code-test", help="code perplexity set ('' = none)")
    ap.add_argument("--gsm8k-limit", type=int, default=0, help="GSM8K test items (0 = skip)")
    ap.add_argument("--zeroshot", default="", help="zero-shot tasks averaged ('' = none)")
    ap.add_argument("--limit", type=int, default=0, help="items per zero-shot task (0 = all)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", required=True, help="markdown file (+ its .jsonl rows file)")
    args = ap.parse_args(argv)
    for target in args.settings.split(","):
        if ":" not in target and not 0 < float(target) < 1:
            ap.error(f"--settings: {target!r} is neither a sparsity in (0, 1) nor an N:M pattern")
    return args


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    protocol = protocol_key(args)
    store = JsonLines(Path(args.out).with_suffix(".jsonl"), "bench rows")
    rows = {d["key"]: GridRow(**d) for _, d in (store.read() if store.exists() else [])
            if d.get("protocol") == protocol}
    model, tok = load_model_and_tokenizer(float_folder(args.model))
    snap = Snapshot(model)
    if "dense" not in rows:
        metrics, n, eval_s = evaluate(model, tok, args)
        rows["dense"] = GridRow("dense", protocol, "dense", "-", "-", "-", 0.0, metrics, 0.0, eval_s, n)
        store.append(asdict(rows["dense"]))
    order = [s.key for s in settings(args)]
    for s in settings(args):
        if s.key in rows:
            print(f"{s.key}: already in {store.path} (same protocol), skipped", flush=True)
            continue
        snap.restore(model)
        rows[s.key] = run_row(model, tok, args, protocol, s)
        store.append(asdict(rows[s.key]))
        print(f"{s.key}: {rows[s.key].metrics} prune {rows[s.key].prune_s}s", flush=True)
        write_table(rows, order + [k for k in rows if k not in order], args)
    write_table(rows, order + [k for k in rows if k not in order], args)


if __name__ == "__main__":
    main()
