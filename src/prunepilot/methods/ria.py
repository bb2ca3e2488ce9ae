from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..schema import Strict
from .nm_permutation import permuted_nm_mask
from .wanda import Wanda


def ria_scores(weight: torch.Tensor, sq_norm: torch.Tensor, a: float = 0.5) -> torch.Tensor:
    """Relative importance x activation (Zhang et al., ICLR 2024), (out, in):
        S_ij = (|W_ij| / Σ_i' |W_i'j| + |W_ij| / Σ_j' |W_ij'|) · ‖X_j‖₂^a
    the first term relative to the weight's input column, the second to its output row. sq_norm = ‖X_j‖² / n
    (Wanda's InputNormState): a per-layer factor away from ‖X_j‖², which no comparison inside a layer sees."""
    w = weight.detach().abs().float()
    relative = w / w.sum(0, keepdim=True) + w / w.sum(1, keepdim=True)   # an all-zero row/column gives nan ...
    return torch.nan_to_num(relative, nan=0.0) * sq_norm.sqrt().pow(a).unsqueeze(0)  # ... scored 0


class RIAOptions(Strict):
    a: float = Field(0.5, ge=0)                          # exponent of the activation norm
    granularity: Literal["row", "layer"] = "layer"       # unstructured: RIA's default compares the whole layer
    permute: Literal["none", "greedy", "exact"] = "none"  # N:M: channel permutation folded into the mask


class RIA(Wanda):
    """RIA: relative importance of each weight to its row and column, times ‖X_j‖^a, on Wanda's statistic
    (InputNormState, inherited with Wanda's init_state).

    N:M with permute="greedy" (RIA's heuristic channel reallocation) or "exact" (then a linear sum assignment
    per group slot) forms the groups of M over a permuted input order; the permutation is folded into the
    mask, so the weights keep their order (an ordinary checkpoint) and every group of the *permuted* order
    keeps N (see nm_permutation.py)."""
    summary = "relative importance (row + column) * ||X||^a (RIA)"

    def __init__(self, options: RIAOptions | None = None):
        super().__init__(options or RIAOptions())

    def scores(self, weight, state):
        return ria_scores(weight, state.sq_mean, self.options.a)

    @torch.no_grad()
    def prune(self, weight, state, sparsity, pattern):
        if pattern is None or self.options.permute == "none":
            return super().prune(weight, state, sparsity, pattern)
        mask = permuted_nm_mask(self.scores(weight, state), *pattern, self.options.permute)
        weight[mask] = 0
        return mask
