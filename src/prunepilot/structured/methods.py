"""Structured methods (kind = "structured"): Wanda-sp, FLAP and iterative multi-domain FLAP.

They are small option holders; the work (calibration pass, ranking, slicing) is done by
``prunepilot.structured.api.prune_structured``, which reads these attributes:

    score             "wanda_sp" | "fluctuation"              (see scores.py)
    standardize       per-layer, per-module-type z-scoring before ranking (FLAP)
    default_ratios    "global" | "uniform" when the recipe leaves structured.ratios unset
    default_bias_compensation                                   when the recipe leaves it unset
    steps             1 = one shot; None = recipe.structured.steps (iterative)
    default_sources   calibration sources used when the recipe leaves calibration.sources unset
"""
from __future__ import annotations

from ..errors import PrunepilotError
from ..methods.base import PruningMethod
from ..registry import register

SCHEDULES = ("geometric", "linear")


class StructuredMethod(PruningMethod):
    kind = "structured"
    needs_calibration = True
    score = "fluctuation"
    standardize = True
    default_ratios = "global"
    default_bias_compensation = True
    default_sources: list[str] | None = None
    iterative = False
    schedule = "geometric"


@register("wanda_sp")
class WandaSP(StructuredMethod):
    """Wanda-sp (the structured Wanda baseline of An et al. 2024): channel score Σ_i |W_ij|·‖X_j‖₂ on the
    output projection's input, uniform per-layer ratios, pruned block by block on the pruned model's
    activations, no bias compensation (unless the recipe asks for it)."""
    summary = "structured: remove channels/KV groups by sum |W|*||X|| (Wanda-sp), uniform per layer"
    score = "wanda_sp"
    standardize = False
    default_ratios = "uniform"
    default_bias_compensation = False


@register("flap")
class FLAP(StructuredMethod):
    """FLAP (An et al. 2024): fluctuation metric Var(X_j)·‖W[:, j]‖², per-layer standardisation, global
    ranking across layers and module types, bias compensation; one calibration pass of the dense model."""
    summary = "structured: fluctuation metric + global ranking + bias compensation (FLAP), one shot"


@register("flap_iterative")
class FLAPIterative(StructuredMethod):
    """FLAP reaching the target in recipe.structured.steps steps, re-measuring statistics on the partly
    pruned model before each step, with a multi-domain calibration mixture (wiki, web, code, math).

    schedule "geometric" (default): after step t of k the model keeps (1 - s)^(t/k) of the dense block
    parameters (each step removes the same fraction of what is left); "linear": it keeps 1 - s·t/k.
    """
    summary = "structured: FLAP in k steps, statistics re-measured each step, multi-domain calibration"
    iterative = True
    default_sources = ["wiki", "web", "code", "math"]

    def __init__(self, schedule: str = "geometric"):
        if schedule not in SCHEDULES:
            raise PrunepilotError(f"flap_iterative schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        self.schedule = schedule


def kept_fraction(sparsity: float, step: int, steps: int, schedule: str = "geometric") -> float:
    """Fraction of the dense measure kept after `step` of `steps` (step = steps gives 1 - sparsity)."""
    if schedule == "linear":
        return 1.0 - sparsity * step / steps
    return (1.0 - sparsity) ** (step / steps)
