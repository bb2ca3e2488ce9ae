"""Structured methods: Wanda-sp, FLAP and iterative multi-domain FLAP (pipeline.py does the work).

Each method says how it scores the input columns of an output projection (down_proj for MLP channels, o_proj
for heads) and how per-column scores combine into one score per head and per KV group; registry.py registers
them with their recipe defaults (ratios, bias compensation, calibration sources and seqlen).
"""
from __future__ import annotations

from typing import Literal

import torch

from ..methods.base import PruningMethod
from ..methods.wanda import wanda_scores
from ..schema import Strict
from .scores import RunningMoments, fluctuation_scores, standardize


class StructuredMethod(PruningMethod):
    score = "fluctuation"      # recorded in the report
    standardize = True         # per-layer, per-module z-scoring of the column scores (FLAP)
    iterative = False          # True: reaches the target in recipe.structured.steps re-measured steps
    schedule = "geometric"

    @property
    def group_reduce(self) -> str:
        """How head and KV-group scores combine their columns: FLAP averages standardised scores, Wanda-sp sums."""
        return "mean" if self.standardize else "sum"

    def column_scores(self, weight: torch.Tensor, moments: RunningMoments) -> torch.Tensor:
        """Importance of each input column j of an output projection W (out, in); lower = removed first. (in,)"""
        return standardize(fluctuation_scores(weight, moments).cpu())


class WandaSP(StructuredMethod):
    """Wanda-sp (the structured Wanda baseline of An et al. 2024): channel score Σ_i |W_ij|·‖X_j‖₂ on the
    output projection's input, uniform per-layer ratios, pruned block by block on the pruned model's
    activations, no bias compensation (unless the recipe asks for it)."""
    summary = "structured: remove channels/KV groups by sum |W|*||X|| (Wanda-sp), uniform per layer"
    score = "wanda_sp"
    standardize = False

    def column_scores(self, weight, moments):
        # Wanda's scores with the unnormalised ‖X_j‖² (Σ x²), summed over output rows
        return wanda_scores(weight, moments.sq_sum.to(weight.device)).sum(0).cpu()


class FLAP(StructuredMethod):
    """FLAP (An et al. 2024): fluctuation metric Var(X_j)·‖W[:, j]‖², per-layer standardisation, global
    ranking across layers and module types, bias compensation; one calibration pass of the dense model."""
    summary = "structured: fluctuation metric + global ranking + bias compensation (FLAP), one shot"


class FLAPIterativeOptions(Strict):
    schedule: Literal["geometric", "linear"] = "geometric"


class FLAPIterative(StructuredMethod):
    """FLAP reaching the target in recipe.structured.steps steps, re-measuring statistics on the partly
    pruned model before each step, with a multi-domain calibration mixture (wiki, web, code, math).

    schedule "geometric" (default): after step t of k the model keeps (1 - s)^(t/k) of the dense block
    parameters (each step removes the same fraction of what is left); "linear": it keeps 1 - s·t/k.
    """
    summary = "structured: FLAP in k steps, statistics re-measured each step, multi-domain calibration"
    iterative = True

    def __init__(self, options: FLAPIterativeOptions | None = None):
        super().__init__(options or FLAPIterativeOptions())
        self.schedule = self.options.schedule


def kept_fraction(sparsity: float, step: int, steps: int, schedule: str = "geometric") -> float:
    """Fraction of the dense measure kept after `step` of `steps` (step = steps gives 1 - sparsity)."""
    if schedule == "linear":
        return 1.0 - sparsity * step / steps
    return (1.0 - sparsity) ** (step / steps)
