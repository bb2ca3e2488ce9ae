"""Streaming per-channel input moments (count, mean, variance, Σ x²) in float32, pooled or per calibration domain:
the statistics the structured methods score with and DSnoT refines with. Both are StatisticStates; Moments is
the protocol their users read (statistic_state.py)."""
from __future__ import annotations

from typing import Callable, Protocol

import torch

from . import distributed
from .errors import PrunepilotError
from .statistic_state import StatisticState


class Moments(StatisticState, Protocol):
    """The per-channel input statistics a structured method scores with (RunningMoments, DomainMoments)."""

    @property
    def mean(self) -> torch.Tensor: ...             # (dim,)

    @property
    def sq_sum(self) -> torch.Tensor: ...           # (dim,) Σ x² over the tokens seen

    def var(self, unbiased: bool = True) -> torch.Tensor: ...   # (dim,)

    def l2(self) -> torch.Tensor: ...               # (dim,) ‖X_j‖₂


class RunningMoments:
    """Moments: per-channel count, mean, M2 (Σ squared deviations) and Σ x², accumulated in float32.

    Batches merge with Chan et al.'s parallel update (numerically stable, exact for any batch split):
        δ = mean_b - mean_a,  n = n_a + n_b
        mean = mean_a + δ · n_b / n
        M2   = M2_a + M2_b + δ² · n_a · n_b / n
    (FLAP's reference keeps a reference to the *same* tensor it updates in place as the "old" mean, so its
    variance uses the new mean twice; here every update builds new tensors.)
    """

    def __init__(self, dim: int, device=None):
        self.n = 0
        self.mean = torch.zeros(dim, dtype=torch.float32, device=device)
        self.m2 = torch.zeros(dim, dtype=torch.float32, device=device)
        self.sq_sum = torch.zeros(dim, dtype=torch.float32, device=device)

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()            # (tokens, dim)
        nb = x.shape[0]
        if nb == 0:
            return
        b_mean = x.mean(0)                                # (dim,)
        b_m2 = (x - b_mean).pow(2).sum(0)                 # (dim,)
        n = self.n + nb
        delta = b_mean - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + b_m2 + delta.pow(2) * (self.n * nb / n)
        self.sq_sum = self.sq_sum + x.pow(2).sum(0)
        self.n = n

    def all_reduce(self) -> None:
        """Merge the ranks' moments (distributed calibration) with the same parallel update:
        mean = Σ n_r mean_r / N,  M2 = Σ (M2_r + n_r (mean_r - mean)²)."""
        n = distributed.total(self.n)
        if n == 0:
            return
        mean = distributed.all_reduce_(self.mean * self.n) / n
        self.m2 = distributed.all_reduce_(self.m2 + (self.mean - mean).pow(2) * self.n)
        self.sq_sum = distributed.all_reduce_(self.sq_sum.clone())
        self.mean, self.n = mean, int(n)

    def var(self, unbiased: bool = True) -> torch.Tensor:
        """Per-channel variance over all tokens seen (unbiased, as torch.var's default)."""
        d = self.n - 1 if unbiased else self.n
        if d <= 0:
            return torch.zeros_like(self.m2)
        return self.m2 / d

    def l2(self) -> torch.Tensor:
        """‖X_j‖₂ over all tokens seen. (dim,)"""
        return self.sq_sum.sqrt()


class DomainMoments:
    """RunningMoments kept per calibration domain, fused by the domain weights w_k (normalised to sum 1):

        mean_j = Σ_k w_k μ_kj        var_j = Σ_k w_k σ²_kj        (σ²_k: domain k's unbiased variance)

    Pooling every token into one RunningMoments instead adds the between-domain spread of the channel means,
    Σ_k (n_k/N)(μ_kj - μ_j)², to the variance; fusion does not. Domains that saw no tokens (an MoE expert no
    token of a domain was routed to) drop out and the others' weights are renormalised; when only one domain
    saw tokens the fused statistic *is* that domain's RunningMoments (bit for bit the pooled one).
    tag() names the domain of the batch being added (engine.BlockPass.tag). Moments like RunningMoments: n,
    mean (dim,), var() (dim,), sq_sum (dim,) = N · Σ_k w_k (Σx²)_k / n_k, l2() (dim,).
    """

    def __init__(self, dim: int, weights: dict[str, float], tag: Callable[[], str | None], device=None):
        total = sum(weights.values())
        if not weights or total <= 0:
            raise PrunepilotError("fused domain statistics need at least one domain with a positive weight")
        self.weights = {d: w / total for d, w in weights.items()}
        self.parts = {d: RunningMoments(dim, device) for d in self.weights}
        self.tag = tag

    def add(self, x: torch.Tensor) -> None:
        """Add x (..., dim) to the moments of the current batch's domain."""
        domain = self.tag()
        if domain not in self.parts:
            raise PrunepilotError(f"calibration domain {domain!r} has no weight (domains: {', '.join(self.parts)})")
        self.parts[domain].add(x)

    def all_reduce(self) -> None:
        """Merge every domain's moments over the ranks (same domain order on every rank)."""
        for d in self.weights:
            self.parts[d].all_reduce()

    def present(self) -> list[tuple[float, RunningMoments]]:
        """(renormalised weight, moments) of the domains that saw tokens."""
        seen = [(self.weights[d], m) for d, m in self.parts.items() if m.n > 0]
        total = sum(w for w, _ in seen)
        return [(w / total, m) for w, m in seen]

    def _fuse(self, value: Callable[[RunningMoments], torch.Tensor]) -> torch.Tensor:
        seen = self.present()
        if len(seen) == 1:
            return value(seen[0][1])
        if not seen:
            return torch.zeros_like(next(iter(self.parts.values())).mean)
        return sum(w * value(m) for w, m in seen)

    @property
    def n(self) -> int:
        return sum(m.n for m in self.parts.values())

    @property
    def mean(self) -> torch.Tensor:
        """Σ_k w_k μ_k. (dim,)"""
        return self._fuse(lambda m: m.mean)

    def var(self, unbiased: bool = True) -> torch.Tensor:
        """Σ_k w_k σ²_k (each domain's own variance, unbiased by default). (dim,)"""
        return self._fuse(lambda m: m.var(unbiased))

    @property
    def sq_sum(self) -> torch.Tensor:
        """N · Σ_k w_k (Σx²)_k / n_k: the weighted mean square, scaled to all N tokens. (dim,)"""
        if len(self.present()) == 1:
            return self.present()[0][1].sq_sum
        return self._fuse(lambda m: m.sq_sum / m.n) * self.n

    def l2(self) -> torch.Tensor:
        return self.sq_sum.sqrt()
