"""Contract every unstructured/N:M method follows (cf. SparseGPT's per-layer object):

    state = method.init_state(W)          # W: (out, in) weight view of one linear
    method.add_batch(state, x)            # x: (..., in) inputs of that linear, called per batch
    mask = method.prune(W, state, sparsity, pattern)   # zeroes W in place, returns the bool mask
"""
from __future__ import annotations

import torch

from .. import masks


class PruningMethod:
    name = "base"
    kind = "unstructured"        # or "structured"
    needs_calibration = True
    summary = ""

    def init_state(self, weight: torch.Tensor):
        return None

    def add_batch(self, state, x: torch.Tensor) -> None:
        pass

    def scores(self, weight: torch.Tensor, state) -> torch.Tensor:
        """Importance of every weight, (out, in); lower = pruned first."""
        raise NotImplementedError

    granularity = "row"

    @torch.no_grad()
    def prune(self, weight: torch.Tensor, state, sparsity: float, pattern: tuple[int, int] | None) -> torch.Tensor:
        mask = masks.select_mask(self.scores(weight, state), sparsity, pattern, self.granularity)
        weight[mask] = 0
        return mask


class InputNormState:
    """Streaming mean of x**2 per input channel, in float32: ‖X_j‖² / n_tokens."""

    def __init__(self, in_features: int, device):
        self.sq_mean = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
        t = x.shape[0]
        self.sq_mean.mul_(self.n / (self.n + t)).add_(x.pow(2).sum(0) / (self.n + t))
        self.n += t
