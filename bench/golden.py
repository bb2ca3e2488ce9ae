"""Golden results: what every method does to three small models, recorded so a redesign can prove it changed
nothing (tests/test_golden.py compares the current code against tests/golden/golden.pt).

    python bench/golden.py --write tests/golden/golden.pt     # record (only when a change is *meant* to alter results)
    python bench/golden.py --check tests/golden/golden.pt     # compare, print one line per case

Models: ../shared/models/stories260K (real weights, calibrated on text through its SentencePiece tokenizer) and
two tiny random-initialised architectures from prunepilot.testing.tiny_models (qwen3: GQA with q wider than the
hidden size; opt: plain fc1/fc2 MLP with biases), calibrated on seeded random token ids.
Methods: magnitude, Wanda, SparseGPT (unstructured and 2:4), Wanda 2:4, Wanda + OWL, Wanda-sp, FLAP, iterative
FLAP, and the agent with the built-in policy for 3 iterations.

Recorded per case: the shape and packed zero mask of every parameter inside the decoder blocks, the kept MLP
channels and KV groups of every block (found by matching the pruned weight columns to the dense ones), and the
logits on a fixed token batch. Comparison: masks and kept units exactly equal, except SparseGPT (weights are
reconstructed, so at most 0.1% of mask entries may differ); logits within a tolerance.
"""
from __future__ import annotations

import argparse
import gzip
import io
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

SPARSEGPT_MASK_DISAGREEMENT = 0.001   # fraction of mask entries allowed to differ (reconstruction methods)
LOGITS_ATOL = {"exact": 1e-4, "reconstruct": 1e-2}


@dataclass
class Case:
    model: str          # stories | qwen3 | opt
    name: str           # method label
    recipe: dict | None  # prune() recipe; None for the agent
    reconstructs: bool = False

    @property
    def key(self) -> str:
        return f"{self.model}/{self.name}"


def _recipes() -> dict[str, tuple[dict, bool]]:
    st = {"steps": 3}
    return {
        "magnitude": ({"method": "magnitude", "sparsity": 0.5}, False),
        "wanda": ({"method": "wanda", "sparsity": 0.5}, False),
        "wanda_2:4": ({"method": "wanda", "pattern": "2:4"}, False),
        "wanda_owl": ({"method": "wanda", "sparsity": 0.6, "allocation": {"kind": "owl", "owl_lambda": 0.1}}, False),
        "sparsegpt": ({"method": "sparsegpt", "sparsity": 0.5}, True),
        "sparsegpt_2:4": ({"method": "sparsegpt", "pattern": "2:4"}, True),
        "wanda_sp": ({"method": "wanda_sp", "sparsity": 0.3}, False),
        "flap": ({"method": "flap", "sparsity": 0.3}, False),
        "flap_iterative": ({"method": "flap_iterative", "sparsity": 0.4, "structured": st}, False),
    }


def cases() -> list[Case]:
    out = []
    for model in ("stories", "qwen3", "opt"):
        for name, (recipe, rec) in _recipes().items():
            out.append(Case(model, name, recipe, rec))
        out.append(Case(model, "agent", None))
    return out


# ----------------------------------------------------------------------------------------------- models/data

def load(model: str):
    """(model, tokenizer or None, calibration ids or None, held-out ids or None, fixed logits batch)."""
    g = torch.Generator().manual_seed(1234)
    if model == "stories":
        from prunepilot.modeling import load_model_and_tokenizer

        shared = Path(__import__("os").environ.get("PRUNEPILOT_SHARED", REPO.parent / "shared"))
        m, tok = load_model_and_tokenizer(shared / "models" / "stories260K")
        batch = torch.randint(3, 512, (1, 16), generator=g)
        return m, tok, None, None, batch
    from prunepilot.testing.tiny_models import tiny_model

    m = tiny_model(model)
    calib = torch.randint(3, 128, (8, 32), generator=g)
    held = torch.randint(3, 128, (256,), generator=g)
    batch = torch.randint(3, 128, (1, 16), generator=g)
    return m, None, calib, held, batch


def _calibration(model: str, recipe: dict) -> dict:
    """Small calibration for stories260K (text, through the tokenizer): method defaults stay in force unless
    the recipe states them; the tiny models get token ids instead."""
    if model != "stories":
        return recipe
    cal = {"n_samples": 8, "seqlen": 64} if recipe["method"] in ("magnitude", "wanda", "sparsegpt") else {"n_samples": 8}
    return {**recipe, "calibration": cal, "device": "cpu"}


def agent_config(model: str) -> dict:
    # pace False: the golden file was recorded before pacing existed; it pins the engine and the built-in policy
    cfg = {"target_sparsity": 0.5, "max_iterations": 3, "device": "cpu", "save_model": False,
           "grad_samples": 2, "grad_refresh_every": 1, "pace": False}
    if model == "stories":
        cfg.update(calibration={"sources": ["web"], "n_samples": 8, "seqlen": 64}, eval_tokens=512, eval_seqlen=64)
    else:
        cfg.update(eval_seqlen=32)
    return cfg


# ----------------------------------------------------------------------------------------------- recording

def block_weights(model) -> dict[str, torch.Tensor]:
    from prunepilot.engine import ModelAdapter

    adapter = ModelAdapter(model)
    return {f"{adapter.block_name(i)}.{n}": p.detach().clone()
            for i, b in enumerate(adapter.blocks) for n, p in b.named_parameters()}


def kept_units(dense: dict[str, torch.Tensor], pruned: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """For every weight whose input width shrank: which dense input columns it kept (exact column match)."""
    out = {}
    for name, w in pruned.items():
        d = dense.get(name)
        if d is None or d.dim() != 2 or w.shape[1] == d.shape[1] or w.shape[0] != d.shape[0]:
            continue
        cols, j = [], 0
        for k in range(w.shape[1]):
            while not torch.equal(d[:, j], w[:, k]):
                j += 1
            cols.append(j)
            j += 1
        out[name] = cols
    return out


def run_case(case: Case) -> dict:
    from prunepilot.api import prune

    torch.manual_seed(0)
    model, tok, calib, held, batch = load(case.model)
    dense = block_weights(model)
    if case.recipe is None:
        from prunepilot.agent import run_agent

        with tempfile.TemporaryDirectory() as tmp:
            run_agent(model, tok, agent_config(case.model), tmp, calibration=calib, held_out=held)
    else:
        recipe = {**_calibration(case.model, case.recipe), "device": "cpu"}
        prune(model, recipe, tok, calibration=calib)
    weights = block_weights(model)
    with torch.no_grad():
        logits = model(batch, use_cache=False).logits.float()
    return {"shapes": {n: list(w.shape) for n, w in weights.items()},
            "masks": {n: pack(w == 0) for n, w in weights.items() if w.dim() == 2},
            "kept": kept_units(dense, weights),
            "logits": logits}


def pack(mask: torch.Tensor) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.packbits(mask.flatten().numpy()))


def unpack(bits: torch.Tensor, n: int) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.unpackbits(bits.numpy())[:n].astype(bool))


# ----------------------------------------------------------------------------------------------- comparing

def compare(case: Case, want: dict, got: dict) -> list[str]:
    """Differences between a recorded and a fresh result (empty = equal within the case's tolerance)."""
    problems = []
    if want["shapes"] != got["shapes"]:
        diff = [n for n in want["shapes"] if want["shapes"][n] != got["shapes"].get(n)]
        return [f"parameter shapes differ ({diff[:3]}...)"]
    if want["kept"] != got["kept"]:
        diff = [n for n in want["kept"] if want["kept"][n] != got["kept"].get(n)]
        problems.append(f"kept channels / heads differ in {diff[:3]}")
    total = differ = 0
    for name, bits in want["masks"].items():
        n = torch.Size(want["shapes"][name]).numel()
        a, b = unpack(bits, n), unpack(got["masks"][name], n)
        total += n
        differ += int((a != b).sum())
    allowed = SPARSEGPT_MASK_DISAGREEMENT if case.reconstructs else 0.0
    if differ > allowed * total:
        problems.append(f"{differ} of {total} mask entries differ ({differ / total:.4%}, allowed {allowed:.1%})")
    atol = LOGITS_ATOL["reconstruct" if case.reconstructs else "exact"]
    err = (want["logits"] - got["logits"]).abs().max().item()
    if not err <= atol:
        problems.append(f"logits differ by up to {err:.3g} (tolerance {atol:g})")
    return problems


def save(results: dict, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(results, buf)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(buf.getvalue(), mtime=0))


def read(path: Path) -> dict:
    return torch.load(io.BytesIO(gzip.decompress(path.read_bytes())), weights_only=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", type=Path, help="record every case into this file")
    mode.add_argument("--check", type=Path, help="compare every case against this file")
    ap.add_argument("--only", help="substring of the case keys to run (e.g. 'stories/' or 'flap')")
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    todo = [c for c in cases() if not args.only or args.only in c.key]
    if args.write:
        save({c.key: run_case(c) for c in todo}, args.write)
        print(f"wrote {len(todo)} cases to {args.write}")
        return 0
    recorded = read(args.check)
    bad = 0
    for c in todo:
        problems = compare(c, recorded[c.key], run_case(c))
        bad += bool(problems)
        print(f"{c.key:28s} {'OK' if not problems else '; '.join(problems)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
