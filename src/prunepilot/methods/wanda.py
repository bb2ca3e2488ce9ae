from __future__ import annotations

import torch

from ..registry import register
from .base import InputNormState, PruningMethod


def wanda_scores(weight: torch.Tensor, sq_mean: torch.Tensor) -> torch.Tensor:
    """S_ij = |W_ij| * ‖X_j‖₂ (up to a per-layer constant: ‖X_j‖₂ = sqrt(n * sq_mean_j)). (out, in)"""
    return weight.detach().abs().float() * sq_mean.sqrt().unsqueeze(0)


@register("wanda")
class Wanda(PruningMethod):
    """Wanda (Sun et al. 2023): |W| x input-activation norm, compared within each output row."""
    summary = "|W| * ||X||_2 per output row (Wanda)"

    def __init__(self, granularity: str = "row"):
        self.granularity = granularity

    def init_state(self, weight):
        return InputNormState(weight.shape[1], weight.device)

    def add_batch(self, state, x):
        state.add(x)

    def scores(self, weight, state):
        return wanda_scores(weight, state.sq_mean)
