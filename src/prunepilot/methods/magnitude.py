from __future__ import annotations

import torch

from ..registry import register
from .base import PruningMethod


@register("magnitude")
class Magnitude(PruningMethod):
    """|W|: no calibration. Unstructured compares across the whole matrix (as in the Wanda paper)."""
    needs_calibration = False
    summary = "weight magnitude |W|, no calibration data"

    def __init__(self, granularity: str = "layer"):
        self.granularity = granularity

    def scores(self, weight: torch.Tensor, state) -> torch.Tensor:
        return weight.detach().abs().float()
