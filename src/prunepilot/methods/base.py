"""Contract every unstructured/N:M method follows (cf. SparseGPT's per-layer object):

    state = method.init_state(W)          # W: (out, in) weight view of one linear; state.add(x) sees its inputs
    method.add_batch(state, x)            # x: (..., in) inputs of that linear, called per batch
    mask = method.prune(W, state, sparsity, pattern)   # zeroes W in place, returns the bool mask
    masks = method.prune_group([W1, W2], state, sparsity, pattern)   # linears sharing one input state (q/k/v):
                                          # each pruned alone by default; SparseGPT sweeps them together

A method is built from its options model (registry.py): ``Method(options)``.
"""
from __future__ import annotations

import torch

from .. import distributed, masks
from ..schema import Strict
from ..statistic_state import StatisticState


class NoOptions(Strict):
    """A method without options."""


class PruningMethod:
    needs_calibration = True
    summary = ""
    granularity = "row"

    def __init__(self, options: Strict | None = None):
        self.options = options

    def init_state(self, weight: torch.Tensor) -> StatisticState | None:
        return None  # data-free

    def add_batch(self, state: StatisticState | None, x: torch.Tensor) -> None:
        if state is not None:  # data-free methods keep no state
            state.add(x)

    def scores(self, weight: torch.Tensor, state: StatisticState | None) -> torch.Tensor:
        """Importance of every weight, (out, in); lower = pruned first."""
        raise NotImplementedError

    @torch.no_grad()
    def prune(self, weight: torch.Tensor, state: StatisticState | None, sparsity: float,
              pattern: tuple[int, int] | None) -> torch.Tensor:
        mask = masks.select_mask(self.scores(weight, state), sparsity, pattern, self.granularity)
        weight[mask] = 0
        return mask

    def prune_group(self, weights: list[torch.Tensor], state: StatisticState | None, sparsity: float,
                    pattern: tuple[int, int] | None) -> list[torch.Tensor]:
        """Prune linears that read one input (one shared state) to one sparsity; returns each one's mask."""
        return [self.prune(w, state, sparsity, pattern) for w in weights]


class InputNormState:
    """A StatisticState: streaming mean of x**2 per input channel, in float32: ‖X_j‖² / n_tokens."""

    def __init__(self, in_features: int, device):
        self.sq_mean = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
        t = x.shape[0]
        self.sq_mean.mul_(self.n / (self.n + t)).add_(x.pow(2).sum(0) / (self.n + t))
        self.n += t

    def all_reduce(self) -> None:
        """Merge the ranks' statistics (distributed calibration): the mean over every rank's tokens."""
        total = distributed.all_reduce_(self.sq_mean * self.n)
        self.n = int(distributed.total(self.n))
        self.sq_mean = total / max(self.n, 1)
