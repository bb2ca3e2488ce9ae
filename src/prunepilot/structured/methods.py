"""Structured methods: Wanda-sp, FLAP and iterative multi-domain FLAP (pipeline.py does the work).

The contract the structured pipeline relies on (not PruningMethod's per-weight one):

    method.options                          the validated options (options.py), method.options.steps steps
    method.column_scores(W, moments)        (in,) importance of each input column of an output projection
                                            (down_proj for MLP channels, o_proj for heads); lower = removed first
    method.group_reduce                     how head and KV-group scores combine their columns ("mean" / "sum")
    method.kept_fraction(s, step)           the fraction of the dense measure kept after `step` of options.steps
    method.score, method.standardize, method.schedule   what the report records

registry.py registers them with their options model and recipe defaults (ratios, bias compensation, calibration
sources and seqlen).
"""
from __future__ import annotations

import torch

from ..methods.wanda import wanda_scores
from ..moments import Moments
from .options import StructuredOptions
from .scores import fluctuation_scores, standardize


class StructuredMethod:
    summary = ""               # shown by `prunepilot methods`
    score = "fluctuation"      # recorded in the report
    standardize = True         # per-layer, per-module z-scoring of the column scores (FLAP)

    def __init__(self, options: StructuredOptions):
        self.options = options

    @property
    def group_reduce(self) -> str:
        """How head and KV-group scores combine their columns: FLAP averages standardised scores, Wanda-sp sums."""
        return "mean" if self.standardize else "sum"

    @property
    def schedule(self) -> str | None:
        """The step schedule of an iterative method (None: one step)."""
        return None

    def column_scores(self, weight: torch.Tensor, moments: Moments) -> torch.Tensor:
        """Importance of each input column j of an output projection W (out, in); lower = removed first. (in,)"""
        return standardize(fluctuation_scores(weight, moments).cpu())

    def kept_fraction(self, sparsity: float, step: int) -> float:
        """Fraction of the dense measure kept after `step` of options.steps (the last step keeps 1 - sparsity)."""
        return kept_fraction(sparsity, step, self.options.steps, self.schedule or "geometric")


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


class FLAPIterative(StructuredMethod):
    """FLAP reaching the target in options.steps steps (options.schedule, see options.IterativeOptions),
    re-measuring statistics on the partly pruned model before each step, with a multi-domain calibration mixture
    (wiki, web, code, math)."""
    summary = "structured: FLAP in k steps, statistics re-measured each step, multi-domain calibration"

    @property
    def schedule(self) -> str:
        return self.options.schedule


def kept_fraction(sparsity: float, step: int, steps: int, schedule: str = "geometric") -> float:
    """Fraction of the dense measure kept after `step` of `steps` (step = steps gives 1 - sparsity)."""
    if schedule == "linear":
        return 1.0 - sparsity * step / steps
    return (1.0 - sparsity) ** (step / steps)
