"""Why SparseGPT loses to Wanda on Qwen2.5-Coder-0.5B (docs/RESULTS.md section 13): where the pruned model's hidden
states leave the dense model's, and whether keeping the linears that write the massive activation dense repairs it.

Qwen2-family models put a "massive activation" (|h| in the hundreds or thousands, against a median near 1) on the first
token of every window, at one early block's output (Sun et al. 2024, "Massive activations in LLMs"). A calibration
set of N windows holds only N such tokens among N x seqlen, so they weigh little in SparseGPT's least-squares weight
update; Wanda does not update weights. This script measures, for each method and each --keep choice (nothing, the massive block's down
projection, its whole MLP, or every block up to it left dense):
  - perplexity on WikiText-2 and CodeParrot test (the refine_compare protocol),
  - per block, the relative drift ||h - h_dense|| / ||h_dense|| of the block output on held-out C4 windows, on the
    first token of each window (where the massive activation sits) and on the other tokens,
  - the massive activation's value in the pruned model.
The massive block is found on the dense model: the first block whose output's largest |h| exceeds --massive-ratio
times the median |h| of that output.

Resumable like refine_compare.py: each finished row is a line of OUT.jsonl under its protocol key.

    python bench/sparsegpt_diagnosis.py --model ~/.cache/prunepilot/models/qwen2.5-coder-0.5b-instruct \\
        --out docs/bench/sparsegpt_diagnosis_qwen05.md
"""
from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from common import (Snapshot, float_folder, machine, md_table, method_with_options, publish, settings_fingerprint,
                    smollm2_path)

from prunepilot.api import prune
from prunepilot.data import calibration_blocks
from prunepilot.engine import ModelAdapter
from prunepilot.eval.perplexity import perplexity
from prunepilot.io import JsonLines
from prunepilot.modeling import load_model_and_tokenizer
from prunepilot.unstructured import layer_stats


@dataclass
class DiagnosisRow:
    """One method with one --keep choice, as OUT.jsonl keeps it."""
    key: str
    protocol: str
    method: str
    kept_dense: str               # the linears left dense (a regex), or "-"
    global_sparsity: float        # over every block linear, those kept dense included
    ppl: float
    code_ppl: float
    drift: list[float]            # per block output: relative distance to the dense model, all held-out tokens
    drift_first: list[float]      # the same on the first token of each window
    massive_value: float          # largest |h| at the massive block's output, first tokens (dense row: the dense value)
    prune_s: float
    drift_rest: list[float] = field(default_factory=list)  # the same on every token but the first


@torch.no_grad()
def block_outputs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Every decoder block's output hidden states, (windows, seqlen, hidden) each (the last one before the final
    norm is not exposed by transformers; it is the normed output there)."""
    return [h.float() for h in model(ids, output_hidden_states=True).hidden_states[1:]]


def massive_block(dense: list[torch.Tensor], ratio: float) -> int:
    """The first block whose output's largest |h| exceeds `ratio` x the median |h| of that output."""
    for i, h in enumerate(dense):
        if h.abs().max() > ratio * h.abs().median():
            return i
    raise SystemExit(f"no block output has max |h| > {ratio} x its median: no massive activation to diagnose")


def block_sparsity(model) -> float:
    stats = layer_stats(ModelAdapter(model)).values()
    return round(sum(s["zeros"] for s in stats) / sum(s["numel"] for s in stats), 4)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(float((a - b).norm() / b.norm()), 4)


def measure(model, tok, held: torch.Tensor, dense: list[torch.Tensor], massive: int, args) -> dict:
    outs = block_outputs(model, held)
    ppl = perplexity(model, tok, "wikitext2", args.eval_seqlen, max_windows=args.max_windows)["ppl"]
    code = perplexity(model, tok, "code-test", args.eval_seqlen, max_windows=args.max_windows)["ppl"]
    return {"ppl": round(ppl, 3), "code_ppl": round(code, 3),
            "drift": [relative(o, d) for o, d in zip(outs, dense)],
            "drift_first": [relative(o[:, 0], d[:, 0]) for o, d in zip(outs, dense)],
            "drift_rest": [relative(o[:, 1:], d[:, 1:]) for o, d in zip(outs, dense)],
            "massive_value": round(float(outs[massive][:, 0].abs().max()), 1)}


def recipe(method: str, kept: str | None, args) -> dict:
    """`method` may carry options after "@": "sparsegpt@sink_weight=64"."""
    name, options = method_with_options(method)
    return {"method": name, "method_options": options, "sparsity": args.sparsity, "device": "cpu",
            "calibration": {"sources": calib_sources(args), "n_samples": args.n_samples, "seqlen": args.seqlen,
                            "seed": 0},
            "ignore": ["lm_head"] + ([kept] if kept else [])}


def calib_sources(args) -> list[str]:
    return args.calib.split(",") if args.calib else ["web"]


def kept_pattern(keep: str, massive: int) -> str | None:
    """The ignore regex of a --keep choice: nothing, the massive block's down projection, its whole MLP, or every
    block up to and including it."""
    upstream = "|".join(str(i) for i in range(massive + 1))
    return {"none": None, "down": rf"^model\.layers\.{massive}\.mlp\.down_proj$",
            "mlp": rf"^model\.layers\.{massive}\.mlp\.", "upstream": rf"^model\.layers\.({upstream})\."}[keep]


def write_table(rows: dict[str, DiagnosisRow], massive: int, args) -> None:
    shown = list(rows.values())
    probe = sorted({0, max(massive - 1, 0), massive, massive + 1, len(shown[0].drift) // 2, len(shown[0].drift) - 1})
    headers = ["method", "kept dense", "global sparsity", "WikiText-2 ppl", "code ppl", "massive |h|",
               *[f"first-token drift b{i}" for i in probe], *[f"other-token drift b{i}" for i in probe], "prune s"]
    rest = lambda r, i: r.drift_rest[i] if r.drift_rest else "-"  # noqa: E731  (rows measured before it existed)
    table = [[r.method, r.kept_dense.replace("|", "\\|"), r.global_sparsity, r.ppl, r.code_ppl, r.massive_value,
              *[r.drift_first[i] for i in probe], *[rest(r, i) for i in probe], r.prune_s] for r in shown]
    source = "C4 docs 0-149" if args.calib is None else f"{args.calib} (prunepilot's default ranges)"
    protocol = (f"model {args.model}; {args.sparsity:g} unstructured; calibration {source}, {args.n_samples} x "
                f"{args.seqlen} tokens, seed 0; perplexity: WikiText-2 and CodeParrot test, the first "
                f"{args.max_windows} windows of {args.eval_seqlen}; drift: relative L2 distance of block outputs to "
                f"the dense model's on {args.held_windows} x {args.seqlen} held-out C4 tokens (docs 150-199), "
                f"on the first token of each window and on the others; massive block {massive} (the first with max "
                f"|h| > {args.massive_ratio:g} x median); {machine()}; protocol {shown[0].protocol}")
    publish(md_table(headers, table), protocol, args.out)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=smollm2_path())
    ap.add_argument("--methods", default="wanda;sparsegpt",
                    help='";"-separated, each NAME or NAME@key=value,... (method options), e.g. '
                         'sparsegpt@sink_weight=64,percdamp=0.1')
    ap.add_argument("--sparsity", type=float, default=0.6)
    ap.add_argument("--n-samples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--held-windows", type=int, default=4)
    ap.add_argument("--eval-seqlen", type=int, default=1024)
    ap.add_argument("--max-windows", type=int, default=4)
    ap.add_argument("--massive-ratio", type=float, default=100.0)
    ap.add_argument("--calib", help="calibration sources, e.g. wiki,web,code,math (default: web, C4 docs 0-149)")
    ap.add_argument("--keep", default="none,down", help="what each method's rows leave dense: none, down (the massive "
                    "block's down projection), mlp (its whole MLP), upstream (every block up to it)")
    ap.add_argument("--out", required=True, help="markdown file (+ its .jsonl rows file)")
    args = ap.parse_args(argv)
    if not 0 < args.sparsity < 1:
        ap.error(f"--sparsity must be in (0, 1), got {args.sparsity}")
    if set(args.keep.split(",")) - {"none", "down", "mlp", "upstream"}:
        ap.error(f"--keep: {args.keep!r} names something other than none, down, mlp, upstream")
    return args


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    # --calib came later: left out of the key when not given, so rows measured before it keep matching
    protocol = settings_fingerprint(args, ("methods", "keep", "out") + (("calib",) if args.calib is None else ()))
    store = JsonLines(Path(args.out).with_suffix(".jsonl"), "bench rows")
    rows = {d["key"]: DiagnosisRow(**d) for _, d in (store.read() if store.exists() else [])
            if d.get("protocol") == protocol}
    model, tok = load_model_and_tokenizer(float_folder(args.model))
    model.eval()
    held, _ = calibration_blocks(tok, ["c4"], args.held_windows, args.seqlen, seed=1)
    dense = block_outputs(model, held)
    massive = massive_block(dense, args.massive_ratio)
    snap = Snapshot(model)
    if "dense" not in rows:
        rows["dense"] = DiagnosisRow("dense", protocol, "dense", "-", block_sparsity(model), prune_s=0.0,
                                     **measure(model, tok, held, dense, massive, args))
        store.append(asdict(rows["dense"]))
    for method in args.methods.split(";"):
        for choice in args.keep.split(","):
            key, keep = f"{method}/{choice}", kept_pattern(choice, massive)
            if key in rows:
                continue
            snap.restore(model)
            t0 = time.time()
            prune(model, recipe(method, keep, args), tok)
            prune_s = round(time.time() - t0, 1)
            rows[key] = DiagnosisRow(key, protocol, method, keep or "-", block_sparsity(model),
                                     prune_s=prune_s, **measure(model, tok, held, dense, massive, args))
            store.append(asdict(rows[key]))
            print(f"{key}: ppl {rows[key].ppl} code {rows[key].code_ppl} massive {rows[key].massive_value}", flush=True)
            write_table(rows, massive, args)
    write_table(rows, massive, args)


if __name__ == "__main__":
    main()
