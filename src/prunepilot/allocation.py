"""Per-block sparsity allocation: uniform, explicit map, OWL (outlier-weighted layer-wise)."""
from __future__ import annotations

import re

import torch

from .errors import PrunepilotError
from .masks import check_sparsity


def uniform(n_blocks: int, sparsity: float) -> list[float]:
    return [check_sparsity(sparsity)] * n_blocks


def explicit(layers: dict, n_blocks: int, default: float) -> list[float]:
    """{block index (int or "3") or "a-b" range: sparsity}; blocks not named get `default`."""
    out = [check_sparsity(default)] * n_blocks
    for key, value in layers.items():
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", str(key).strip())
        if not m:
            raise PrunepilotError(f"explicit allocation key {key!r} must be a block index or a range 'a-b'")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) else a
        if not (0 <= a <= b < n_blocks):
            raise PrunepilotError(f"explicit allocation names block(s) {key} but the model has {n_blocks} blocks")
        for i in range(a, b + 1):
            out[i] = check_sparsity(value)
    return out


def outlier_ratio(scores: list[torch.Tensor], m: float = 5.0) -> float:
    """Fraction of a block's Wanda scores above m x their mean (OWL's layer-wise outlier distribution)."""
    flat = torch.cat([s.flatten().float() for s in scores])
    return (flat > m * flat.mean()).float().mean().item()


def owl(outlier_ratios: list[float], sparsity: float, lam: float = 0.08) -> list[float]:
    """OWL (Yin et al. 2024): blocks with more outliers keep more weights.

    Outlier ratios are rescaled linearly to [0, 2*lam], re-centred so the mean density is 1 - sparsity,
    and each block's sparsity is 1 - density. The mean sparsity therefore equals the target.
    """
    check_sparsity(sparsity)
    d = torch.tensor(outlier_ratios, dtype=torch.float64)
    span = (d.max() - d.min()).item()
    scaled = (d - d.min()) / span * (2 * lam) if span > 0 else torch.zeros_like(d)
    density = scaled - scaled.mean() + (1 - sparsity)
    sparsities = (1 - density).clamp(0.0, 0.99)
    return [float(s) for s in sparsities]
