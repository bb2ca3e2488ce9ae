"""Streaming input statistics, channel/head importance scores and structured selection (pure tensor code).

Scores are computed on the *input* of the output projection (down_proj for MLP channels, o_proj for
heads) because that is where a removed channel/head stops contributing:

    Wanda-sp:     s_j = Σ_i |W_ij| · ‖X_j‖₂                 (W: (out, in) output projection)
    FLAP (WIFV):  s_j = Var(X_j) · ‖W[:, j]‖²              fluctuation of the input x column energy

Attention columns are aggregated per head (head_dim columns) and per KV group (group_size heads).
Lower score = removed first. (FLAP's reference code squares the attention metric before standardising
it; the paper's formula, used here, does not. Unit costs are exact parameter counts rather than the
reference's fixed 512/3 head-versus-channel weight.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from .. import distributed
from ..errors import PrunepilotError
from ..statistic_state import StatisticState
from ..stats import zscore


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


# ---------------------------------------------------------------------------------------------- scores

def fluctuation_scores(weight: torch.Tensor, stats: Moments) -> torch.Tensor:
    """FLAP's WIFV metric Var(X_j) · ‖W[:, j]‖² for every input column j. -> (in,)"""
    return stats.var().to(weight.device) * weight.detach().float().pow(2).sum(0)


def head_scores(column_scores: torch.Tensor, head_dim: int, reduce: str = "sum") -> torch.Tensor:
    """(heads * head_dim,) column scores -> (heads,) by summing (or averaging) each head's columns."""
    per_head = column_scores.reshape(-1, head_dim)    # (heads, head_dim)
    return per_head.sum(1) if reduce == "sum" else per_head.mean(1)


def group_scores(per_head: torch.Tensor, group_size: int, reduce: str = "sum") -> torch.Tensor:
    """(heads,) head scores -> (kv_heads,): a KV group's score aggregates its group_size query heads."""
    per_group = per_head.reshape(-1, group_size)      # (kv_heads, group_size)
    return per_group.sum(1) if reduce == "sum" else per_group.mean(1)


def standardize(s: torch.Tensor) -> torch.Tensor:
    """(s - mean) / std within one module type of one layer (zeros when undefined: < 2 values or std 0)."""
    s = s.float()
    if s.numel() < 2:
        return torch.zeros_like(s)
    std = s.std()
    if not torch.isfinite(std) or std == 0:
        return torch.zeros_like(s)
    return zscore(s, unbiased=True, eps=0.0)


# ---------------------------------------------------------------------------------------------- selection

@dataclass
class Candidates:
    """The removable units of one module type in one layer."""
    layer: int
    kind: str               # "mlp" (intermediate channels) or "attn" (KV groups)
    scores: torch.Tensor    # (n,) lower = removed first
    cost: float             # what removing one unit saves (parameters, or a unit fraction)

    @property
    def n(self) -> int:
        return self.scores.numel()

    @property
    def capacity(self) -> float:  # the most this module can give while keeping one unit
        return (self.n - 1) * self.cost


def select_global(cands: list[Candidates], budget: float) -> dict[tuple[int, str], torch.Tensor]:
    """Remove the globally lowest-scoring units until `budget` is spent (FLAP's global ranking).

    Units are visited in ascending score; a unit is removed if it keeps >= 1 unit in its module and fits
    in what is left of the budget (a unit that would overshoot is skipped, so a coarse KV group near the
    end gives way to cheaper channels). The result undershoots the budget by less than the cheapest
    unit that is still removable. Returns {(layer, kind): removed indices (sorted)}.
    """
    if budget > sum(c.capacity for c in cands) + 1e-6:
        raise PrunepilotError(f"cannot remove {budget:.6g} (parameters or units): keeping one head group and one "
                              f"channel per layer allows at most {sum(c.capacity for c in cands):.6g}")
    scores = torch.cat([c.scores.float().cpu() for c in cands]) if cands else torch.zeros(0)
    owner = torch.cat([torch.full((c.n,), k) for k, c in enumerate(cands)]) if cands else torch.zeros(0)
    local = torch.cat([torch.arange(c.n) for c in cands]) if cands else torch.zeros(0)
    order = torch.argsort(scores, stable=True).tolist()
    owner, local = owner.tolist(), local.tolist()
    removed: list[list[int]] = [[] for _ in cands]
    left = budget
    min_cost = min((c.cost for c in cands), default=math.inf)
    eps = 1e-9 * max(budget, 1.0)
    for u in order:
        if left < min_cost - eps:
            break
        c = cands[owner[u]]
        if len(removed[owner[u]]) >= c.n - 1 or c.cost > left + eps:
            continue
        removed[owner[u]].append(local[u])
        left -= c.cost
    return {(c.layer, c.kind): torch.tensor(sorted(r), dtype=torch.long) for c, r in zip(cands, removed)}


def align_removal(scores: torch.Tensor, removed: torch.Tensor, multiple: int) -> torch.Tensor:
    """Adjust a module's removed units so that the number kept is a multiple of `multiple`.

    Matrix kernels on GPUs run fastest when a dimension is a multiple of 64 or 128; FLAP's global ranking
    leaves arbitrary widths. The kept count goes to the nearest multiple (halves round up; at least one
    multiple, at most the units there are): extra units are taken from the lowest-scoring kept ones, or the
    highest-scoring removed ones come back. Untouched modules (nothing removed) stay as they are. Rounding to
    the nearest multiple keeps the overall amount close to the budget: per-layer errors of at most
    multiple/2 units partly cancel (the report gives the achieved sparsity).
    """
    n, k = scores.numel(), removed.numel()
    if multiple <= 1 or k == 0 or n < multiple:
        return removed
    kept = n - k
    target = min(max(multiple, math.floor(kept / multiple + 0.5) * multiple), n - n % multiple)
    if target == kept:
        return removed
    s = scores.float().cpu()
    is_removed = torch.zeros(n, dtype=torch.bool)
    is_removed[removed] = True
    if target < kept:  # remove the lowest-scoring kept units too
        kept_idx = (~is_removed).nonzero().squeeze(1)
        extra = kept_idx[lowest(s[kept_idx], kept - target)]
        is_removed[extra] = True
    else:  # bring back the highest-scoring removed units
        back = removed[torch.topk(s[removed], target - kept, largest=True).indices]
        is_removed[back] = False
    return is_removed.nonzero().squeeze(1)


def lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted indices of the k lowest scores."""
    if k <= 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.topk(scores.float().cpu(), k, largest=False).indices.sort().values


def split_uniform_layer(mlp: Candidates | None, attn: Candidates | None, budget: float,
                        groups_wanted: int) -> tuple[int, int]:
    """How many (channels, KV groups) one layer removes under uniform per-layer ratios.

    KV groups are coarse, so attention goes first: `groups_wanted` groups (the caller floors the layer's
    ratio times its dense group count, as the Wanda-sp/FLAP reference code does per module), never above the
    budget; MLP channels fill the rest of the budget; when channels run out (keep one), further groups are
    taken. Returns (k_channels, k_groups).
    """
    k_g = 0
    if attn is not None:
        k_g = min(attn.n - 1, max(0, groups_wanted))
        while k_g > 0 and k_g * attn.cost > budget + 1e-9:
            k_g -= 1
    left = budget - (k_g * attn.cost if attn is not None else 0)
    k_c = 0
    if mlp is not None:
        k_c = min(mlp.n - 1, max(0, math.floor(left / mlp.cost + 1e-9)))
        left -= k_c * mlp.cost
    while attn is not None and k_g < attn.n - 1 and attn.cost <= left + 1e-9:
        k_g += 1
        left -= attn.cost
    exhausted = (mlp is None or k_c == mlp.n - 1) and (attn is None or k_g == attn.n - 1)
    cheapest = min(c.cost for c in (mlp, attn) if c is not None)
    if exhausted and left >= cheapest - 1e-9:
        raise PrunepilotError(f"layer {(mlp or attn).layer}: the per-layer target cannot be met while keeping one "
                              f"head group and one channel; lower the sparsity")
    return k_c, k_g
