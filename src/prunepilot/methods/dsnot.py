"""DSnoT (Zhang et al., ICLR 2024): training-free refinement of a sparse mask by pruning-and-growing swaps.

Per output row i, with μ_j = E[x_j] over the calibration tokens, the expected output the pruning lost is
    e_i = Σ_j μ_j (W_ij - W̃_ij)          (W: dense weights, W̃: pruned (and possibly updated) weights)
Each cycle swaps one weight per row while |e_i| > update_threshold (at most max_cycles times):
    grow:  the pruned weight whose contribution W_ij μ_j has the sign of e_i (growing it moves e_i toward 0)
           with the largest |W_ij μ_j| / Var(x_j)^var_power (the reference's regrowing criterion)
    prune: unstructured: the kept weight whose contribution W̃_ij μ_j has the opposite sign, with the smallest
           Wanda score |W̃_ij|·‖X_j‖; N:M: the kept weight of the grown weight's group with the smallest
           Wanda score, so every group keeps exactly N
    e_i ← e_i - W_ij μ_j + W̃_ik μ_k
A row stops for good when |e_i| <= threshold, when it has no candidate left, when the swap would not lower |e_i|,
or (N:M always, unstructured with same_sign) when it would flip the sign of e_i. (The reference's N:M path takes
any swap that keeps the sign, also one that raises |e_i|: on stories260K, Wanda 2:4 went from perplexity 69.4
to 121 with it, to 65.1 with this guard.) Every swap is one pruned and one kept weight: the row's
sparsity and the N:M pattern are kept exactly. Candidates are the initially pruned / kept weights, each used once.
"""
from __future__ import annotations

import torch
from pydantic import Field

from ..moments import RunningMoments
from ..schema import Strict
from ..statistic_state import StatisticState


class DSnoTOptions(Strict):
    max_cycles: int = Field(50, ge=0)            # swaps per row at most (reference: max_cycle_time 50)
    # stop a row once |e_i| <= this. e_i here is per token (μ = E[x] over tokens); the reference's μ is Σ_tokens x
    # / number of sequences, seqlen times larger, so its 0.1 equals 0.1 / seqlen here
    update_threshold: float = Field(0.1, ge=0)
    var_power: float = Field(1.0, ge=0)          # grow score |W μ| / Var(x)^var_power (reference: 1)
    same_sign: bool = False                      # unstructured: refuse a swap that flips the sign of e_i
    # linears whose name contains one of these keep their mask (the reference's default skips the MLP)
    skip: list[str] = Field(default_factory=lambda: ["mlp"])


class WithMoments:
    """The pruning method's own statistic of one input and DSnoT's moments of it (mean, variance, ‖x‖²), fed
    together."""

    def __init__(self, inner: StatisticState | None, in_features: int, device):
        self.inner, self.moments = inner, RunningMoments(in_features, device)

    def add(self, x: torch.Tensor) -> None:
        if self.inner is not None:
            self.inner.add(x)
        self.moments.add(x)

    @property
    def n(self) -> int:
        return self.moments.n

    def all_reduce(self) -> None:
        if self.inner is not None:
            self.inner.all_reduce()
        self.moments.all_reduce()


def ranked(key: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order (rows, in): the valid columns by ascending key first, count (rows,) of valid columns)."""
    order = torch.sort(torch.where(valid, key, torch.inf), dim=1, stable=True).indices
    return order, valid.sum(1)


def pick(order: torch.Tensor, count: torch.Tensor, ptr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(column at position ptr of each row's list, whether the list still has one). (rows,) each."""
    col = order.gather(1, ptr.clamp(max=order.shape[1] - 1).unsqueeze(1)).squeeze(1)
    return col, ptr < count


class DSnoT:
    """Refines the mask a per-block method chose: refine(...) after method.prune(...)."""
    summary = "DSnoT pruning-and-growing refinement of a sparse mask"

    def __init__(self, options: DSnoTOptions | None = None):
        self.options = options or DSnoTOptions()

    def wraps(self, state: StatisticState | None, weight: torch.Tensor) -> WithMoments:
        return WithMoments(state, weight.shape[1], weight.device)

    def applies_to(self, name: str) -> bool:
        return not any(s in name for s in self.options.skip)

    @torch.no_grad()
    def refine(self, weight: torch.Tensor, dense: torch.Tensor, mask: torch.Tensor, moments: RunningMoments,
               pattern: tuple[int, int] | None, rows_per_chunk: int = 1024) -> torch.Tensor:
        """Swap weights in place (weight, mask: (out, in), True = pruned); dense: the weights before pruning."""
        mu = moments.mean.to(weight.device)                                    # (in,)
        var = moments.var(unbiased=False).to(weight.device).clamp_min(1e-12)
        norm = moments.l2().to(weight.device)
        for a in range(0, weight.shape[0], rows_per_chunk):  # rows are independent: bounded memory
            b = min(a + rows_per_chunk, weight.shape[0])
            W, M = weight[a:b].float(), mask[a:b].clone()
            self._refine_rows(W, dense[a:b].float(), M, mu, var, norm, pattern)
            weight[a:b], mask[a:b] = W.to(weight.dtype), M
        return mask

    def _refine_rows(self, W, dense, mask, mu, var, norm, pattern) -> None:
        o = self.options
        grown = dense * mu                                    # (rows, in): contribution of each dense weight
        e = ((dense - W) * mu).sum(1)                         # (rows,) expected output lost
        grow_key = grown / var.pow(o.var_power)
        grow_pos = ranked(-grow_key, mask & (grow_key > 0))   # e > 0: the largest positive first
        grow_neg = ranked(grow_key, mask & (grow_key < 0))    # e < 0: the most negative first
        wanda = W.abs() * norm                                # (rows, in)
        if pattern is None:
            kept = W * mu
            prune_neg = ranked(wanda, ~mask & (kept < 0))     # e > 0: prune a negative contribution
            prune_pos = ranked(wanda, ~mask & (kept > 0))     # e < 0: a positive one
        candidates = torch.where(mask, torch.inf, wanda)      # N:M: initially kept, not yet pruned
        sign0, active = torch.sign(e), e.abs() > o.update_threshold
        ptr = torch.zeros(W.shape[0], 4, dtype=torch.long, device=W.device)  # grow+, grow-, prune-, prune+
        rows = torch.arange(W.shape[0], device=W.device)
        for _ in range(o.max_cycles):
            if not active.any():
                break
            pos = e > 0
            g_pos, g_pos_ok = pick(*grow_pos, ptr[:, 0])
            g_neg, g_neg_ok = pick(*grow_neg, ptr[:, 1])
            gj, ok = torch.where(pos, g_pos, g_neg), torch.where(pos, g_pos_ok, g_neg_ok)
            if pattern is None:
                p_neg, p_neg_ok = pick(*prune_neg, ptr[:, 2])
                p_pos, p_pos_ok = pick(*prune_pos, ptr[:, 3])
                pj, ok = torch.where(pos, p_neg, p_pos), ok & torch.where(pos, p_neg_ok, p_pos_ok)
            else:
                pj, p_ok = self._group_candidate(candidates, gj, pattern[1])
                ok = ok & p_ok
            after = e - grown[rows, gj] + W[rows, pj] * mu[pj]
            if pattern is not None or o.same_sign:
                ok = ok & (torch.sign(after) == sign0)
            active = active & ok & (e.abs() > o.update_threshold) & (after.abs() < e.abs())  # a swap must help
            r = rows[active]
            mask[r, gj[r]], mask[r, pj[r]] = False, True
            W[r, gj[r]], W[r, pj[r]] = dense[r, gj[r]], 0.0
            candidates[r, pj[r]] = torch.inf
            e = torch.where(active, after, e)
            ptr[r, torch.where(pos, 0, 1)[r]] += 1
            ptr[r, torch.where(pos, 2, 3)[r]] += 1

    @staticmethod
    def _group_candidate(candidates: torch.Tensor, gj: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the lowest-Wanda kept weight in the N:M group of column gj, whether there is one). (rows,) each."""
        cols = (gj - gj % m).unsqueeze(1) + torch.arange(m, device=gj.device)   # (rows, m)
        best, at = candidates.gather(1, cols).min(1)
        return cols.gather(1, at.unsqueeze(1)).squeeze(1), torch.isfinite(best)
