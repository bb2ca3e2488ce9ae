from __future__ import annotations

from typing import Literal

import torch

from ..schema import Strict
from .base import PruningMethod


class MagnitudeOptions(Strict):
    granularity: Literal["row", "layer"] = "layer"


class Magnitude(PruningMethod):
    """|W|: no calibration. Unstructured compares across the whole matrix (as in the Wanda paper)."""
    needs_calibration = False
    summary = "weight magnitude |W|, no calibration data"

    def __init__(self, options: MagnitudeOptions | None = None):
        super().__init__(options or MagnitudeOptions())
        self.granularity = self.options.granularity

    def scores(self, weight: torch.Tensor, state) -> torch.Tensor:
        return weight.detach().abs().float()
