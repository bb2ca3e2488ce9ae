from __future__ import annotations

from typing import Literal

import torch

from ..schema import Strict
from .base import InputNormState, PruningMethod


def wanda_scores(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """S_ij = |W_ij| * sqrt(sq_norm_j): with sq_norm = ‖X_j‖² / n (InputNormState) this is |W|·‖X_j‖₂ up to a
    per-layer constant. (out, in)"""
    return weight.detach().abs().float() * sq_norm.sqrt().unsqueeze(0)


class WandaOptions(Strict):
    granularity: Literal["row", "layer"] = "row"


class Wanda(PruningMethod):
    """Wanda (Sun et al. 2023): |W| x input-activation norm, compared within each output row."""
    summary = "|W| * ||X||_2 per output row (Wanda)"

    def __init__(self, options: WandaOptions | None = None):
        super().__init__(options or WandaOptions())
        self.granularity = self.options.granularity

    def init_state(self, weight):
        return InputNormState(weight.shape[1], weight.device)

    def scores(self, weight, state):
        return wanda_scores(weight, state.sq_mean)
