"""Coverage matrix: for every architecture in prunepilot.testing.tiny_models (incl. the MoE ones) and every pruning
path, which block weights were pruned, the sparsity they reached, or the one-line refusal.

    python bench/coverage.py [--out docs/bench/coverage.md]

A cell reads `OK <covered>% @ <sparsity>`: <covered> is the share of the decoder blocks' weight-matrix parameters
(every parameter with 2+ dimensions inside the blocks, counted here independently of prunepilot's adapter) that
the run's report.json coverage counts as eligible for pruning, the rest being named there as excluded (MoE
routers, kept dense by design, listed below the table); <sparsity> is the achieved sparsity of the eligible
weights (structured: the fraction of them removed, as zeros or sliced away). `refused` cells give the error a
user sees. A run whose coverage does not add up to the independent count would read `PARTIAL`.
Models are tiny and random-initialised (no real MoE checkpoint can be fetched here); calibration: 8 x 32 random
token ids. Agent: built-in policy, target 0.3, 6 iterations.
"""
from __future__ import annotations

import argparse
import sys
import tempfile

import torch

from common import md_table, publish

from prunepilot.agent import run_agent
from prunepilot.api import prune
from prunepilot.engine import ModelAdapter
from prunepilot.errors import PrunepilotError
from prunepilot.testing.tiny_models import CONFIGS, tiny_model

PATHS = {
    "magnitude": {"method": "magnitude", "sparsity": 0.5},
    "wanda": {"method": "wanda", "sparsity": 0.5},
    "sparsegpt": {"method": "sparsegpt", "sparsity": 0.5},
    "wanda 2:4": {"method": "wanda", "pattern": "2:4"},
    "flap": {"method": "flap", "sparsity": 0.3},
    "flap_iterative": {"method": "flap_iterative", "sparsity": 0.3, "structured": {"steps": 2}},
    "agent": None,
}
G = torch.Generator().manual_seed(0)
IDS = torch.randint(3, 128, (8, 32), generator=G)
HELD = torch.randint(3, 128, (256,), generator=G)


def block_matrices(model) -> dict[str, torch.Tensor]:
    """Every parameter with 2+ dims inside the decoder blocks, by name (independent of the adapter's scan)."""
    ad = ModelAdapter(model)
    return {f"{ad.block_name(i)}.{n}": p for i, b in enumerate(ad.blocks) for n, p in b.named_parameters()
            if p.dim() >= 2}


def run_path(arch: str, path: str) -> tuple[str, dict]:
    """(cell text, the weights the run excluded with their reasons)."""
    model = tiny_model(arch)
    before = {n: p.detach().clone() for n, p in block_matrices(model).items()}
    try:
        if PATHS[path] is None:
            with tempfile.TemporaryDirectory() as d:
                res = run_agent(model, None, {"target_sparsity": 0.3, "max_iterations": 6, "device": "cpu",
                                              "save_model": False, "eval_seqlen": 32, "grad_samples": 1}, d,
                                calibration=IDS, held_out=HELD)
            coverage = res.report.get("coverage")
        else:
            rep = prune(model, {**PATHS[path], "device": "cpu", "calibration": {"min_expert_tokens": 0}},
                        calibration=IDS)
            coverage = rep.coverage
    except PrunepilotError as e:
        return f"refused: {e}", {}
    if not coverage:
        return "PARTIAL? the run reports no coverage", {}
    return describe(before, block_matrices(model), coverage), coverage["excluded"]


def describe(before: dict, after: dict, coverage: dict) -> str:
    """Check the run's own accounting against an independent count of the block weight matrices."""
    total = sum(p.numel() for p in before.values())
    if coverage["eligible_params"] + coverage["excluded_params"] != total:
        return (f"PARTIAL: {total - coverage['eligible_params'] - coverage['excluded_params']} block weight "
                f"parameters neither pruned nor named as excluded")
    excluded = set(coverage["excluded"])
    eligible = [n for n in before if not any(n == x or n.startswith(x + ".") for x in excluded)]
    removed = sum(before[n].numel() - after[n].numel() + int((after[n] == 0).sum()) for n in eligible)
    return f"OK {100 * coverage['eligible_params'] / total:.0f}% @ {removed / coverage['eligible_params']:.3f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="also write the table here")
    ap.add_argument("--archs", help="comma-separated subset of " + ",".join(CONFIGS))
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    archs = args.archs.split(",") if args.archs else list(CONFIGS)
    rows, refusals, by_design = [], {}, set()
    for arch in archs:
        row = [arch]
        for path in PATHS:
            cell, excl = run_path(arch, path)
            by_design |= {f"{arch}: {n.split('.', 3)[-1]} ({why})" for n, why in excl.items()}
            if cell.startswith("refused"):
                refusals.setdefault(cell, []).append(f"{arch}/{path}")
                cell = f"refused ({list(refusals).index(cell) + 1})"
            row.append(cell)
        rows.append(row)
        print(" | ".join(row), flush=True)
    notes = [f"({k + 1}) {msg}  [{', '.join(where)}]" for k, (msg, where) in enumerate(refusals.items())]
    text = md_table(["arch", *PATHS], rows) + "\n\n" + "\n".join(notes)
    if by_design:
        text += "\n\nExcluded by design (kept dense, named in report.json coverage): " + ", ".join(sorted(by_design))
    publish(text, "tiny random-initialised models (prunepilot.testing.tiny_models), 8 x 32 random calibration ids, "
                  "one CPU thread; `OK c% @ s`: c = share of block weight-matrix parameters pruned, s = their sparsity",
            args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
