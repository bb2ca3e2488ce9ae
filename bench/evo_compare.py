"""Issue 24: Wanda with uniform vs OWL vs evolutionary (evo) allocation at several sparsities: perplexity and
search time. Resumable: every finished row is one line of --state (a JSON-lines file), and each evo search logs its
generations under --work, so a rerun of the same command skips what is done and continues a cut search.

Default protocol (issue 24): SmolLM2-135M-Instruct (../shared GGUF), calibration C4 docs 0-149 ('web'), 32 x 512
tokens, seed 0; WikiText-2 test perplexity, windows of 1024 tokens, the first 32.

    python bench/evo_compare.py --out docs/bench/evo_compare.md
    python bench/evo_compare.py --model ../shared/models/stories260K --calib 'tinystories#0:600' \\
        --eval 'tinystories#600:900' --eval-seqlen 512 --out docs/bench/evo_compare_stories260k.md
"""
from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from common import REPO, Snapshot, machine, md_table, publish, smollm2_path

from prunepilot.api import prune
from prunepilot.eval.perplexity import perplexity
from prunepilot.io import JsonLines
from prunepilot.modeling import load_model_and_tokenizer


@dataclass
class BenchRow:
    model: str
    sparsity: float
    allocation: str
    global_sparsity: float
    ppl: float
    allocation_s: float           # OWL's statistics pass, or the evo search (levels + generations)
    prune_s: float
    kl_found: float | None = None  # evo: held-out KL of the found allocation and of uniform
    kl_uniform: float | None = None


def recipe_for(args, sparsity: float, allocation: str) -> dict:
    evo = {"generations": args.evo_generations, "offspring": args.evo_offspring, "tokens": args.evo_tokens,
           "seqlen": args.evo_seqlen, "log": str(Path(args.work) / f"evo_{sparsity:.2f}.jsonl")}
    return {"method": "wanda", "sparsity": sparsity, "device": "cpu",
            "calibration": {"sources": [args.calib], "n_samples": args.n_samples, "seqlen": args.seqlen, "seed": 0},
            "allocation": {"kind": allocation, **({"evo": evo} if allocation == "evo" else {})}}


def run_row(args, model, tok, sparsity: float, allocation: str) -> BenchRow:
    rep = prune(model, recipe_for(args, sparsity, allocation), tok)
    res = perplexity(model, tok, args.eval, args.eval_seqlen, max_windows=args.max_windows)
    evo = rep.extra.get("evo") or {}
    return BenchRow(Path(args.model).name, sparsity, allocation, round(rep.global_sparsity, 4), res["ppl"],
                    round(rep.timings["allocation_s"], 1), round(rep.timings["prune_s"], 1),
                    evo.get("fitness_kl"), evo.get("uniform_kl"))


def table(rows: list[BenchRow], dense_ppl: float) -> str:
    owl = {r.sparsity: r.ppl for r in rows if r.allocation == "owl"}
    out = []
    for r in sorted(rows, key=lambda r: (r.sparsity, ["uniform", "owl", "evo"].index(r.allocation))):
        vs_owl = f"{100 * (r.ppl - owl[r.sparsity]) / owl[r.sparsity]:+.1f}%" if r.sparsity in owl else "-"
        kl = f"{r.kl_found:.4f} / {r.kl_uniform:.4f}" if r.kl_found is not None else "-"
        out.append([r.sparsity, r.allocation, r.global_sparsity, r.ppl, vs_owl, r.allocation_s, r.prune_s, kl])
    return md_table(["sparsity", "allocation", "global sparsity", f"ppl (dense {dense_ppl:.3f})", "ppl vs OWL",
                     "allocation s", "prune s", "held-out KL found / uniform"], out)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=smollm2_path())
    ap.add_argument("--sparsities", default="0.5,0.6,0.7")
    ap.add_argument("--allocations", default="uniform,owl,evo")
    ap.add_argument("--calib", default="web")
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval", default="wikitext2")
    ap.add_argument("--eval-seqlen", type=int, default=1024)
    ap.add_argument("--max-windows", type=int, default=32)
    ap.add_argument("--evo-generations", type=int, default=20)
    ap.add_argument("--evo-offspring", type=int, default=8)
    ap.add_argument("--evo-tokens", type=lambda t: [int(x) for x in t.split(",")], default=[256, 1024])
    ap.add_argument("--evo-seqlen", type=int, default=256)
    ap.add_argument("--work", default=str(REPO / "runs" / "evo_compare"), help="evo search logs")
    ap.add_argument("--state", help="finished rows (JSON lines; default: --out with .jsonl)")
    ap.add_argument("--out")
    return ap.parse_args()


def main():
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.manual_seed(0)
    state = JsonLines(args.state or (Path(args.out).with_suffix(".jsonl") if args.out else
                                     Path(args.work) / "rows.jsonl"), what="bench state")
    done = [r for _, r in state.read()] if state.exists() else []
    model, tok = load_model_and_tokenizer(args.model)
    dense = next((r for r in done if r.get("allocation") == "dense"), None)
    if dense is None:
        dense = {"allocation": "dense", "ppl": perplexity(model, tok, args.eval, args.eval_seqlen,
                                                         max_windows=args.max_windows)["ppl"]}
        state.append(dense)
    rows = [BenchRow(**r) for r in done if r.get("allocation") != "dense"]
    snap = Snapshot(model)
    for s in (float(x) for x in args.sparsities.split(",")):
        for a in args.allocations.split(","):
            if any(r.sparsity == s and r.allocation == a for r in rows):
                continue
            snap.restore(model)
            t0 = time.time()
            rows.append(run_row(args, model, tok, s, a))
            state.append(asdict(rows[-1]))
            print(f"{s} {a}: ppl {rows[-1].ppl:.3f} ({time.time() - t0:.0f}s)", flush=True)
    protocol = (f"model {args.model}; Wanda; calibration {args.calib}, {args.n_samples} x {args.seqlen} tokens, "
                f"seed 0; evo: {args.evo_generations} generations x {args.evo_offspring} offspring, fitness tokens "
                f"{args.evo_tokens} in windows of {args.evo_seqlen} (held-out tail of the calibration source); "
                f"OWL lambda 0.08, M 5; perplexity {args.eval}, seqlen {args.eval_seqlen}, first {args.max_windows} "
                f"windows; {machine()}")
    publish(table(rows, dense["ppl"]), protocol, args.out)


if __name__ == "__main__":
    main()
