from __future__ import annotations

import logging

import torch

from pydantic import Field

from .. import distributed
from ..errors import PrunepilotError
from ..schema import Strict
from ..stats import order_stats
from .base import PruningMethod

log = logging.getLogger(__name__)


class HessianState:
    """A StatisticState: H = (2/n) Σ x xᵀ over all calibration tokens: the raw sum Σ x xᵀ in float32 and n; H
    scales it once.

    sink_weight w > 1 counts the first token of every window w times in the sum (its x scaled by √w): models that
    park a massive activation on that token (the attention sink) depend on it being reconstructed, and in a plain sum
    it is one token of seqlen. Inputs without a sequence axis (tokens routed to an expert, (tokens, in)) cannot tell
    which token came first; they are added unweighted and counted in `unweighted`."""

    def __init__(self, in_features: int, device, sink_weight: float = 1.0):
        self.xxt = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0
        self.sink_weight = sink_weight
        self.unweighted = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.float()
        if self.sink_weight != 1.0:
            if x.dim() >= 3:  # (..., seq, in): position 0 of each window is its sink token
                x = x.clone()
                x[..., 0, :] *= self.sink_weight ** 0.5
            else:
                self.unweighted += x.reshape(-1, x.shape[-1]).shape[0]
        x = x.reshape(-1, x.shape[-1])  # (tokens, in)
        self.xxt.addmm_(x.t(), x)
        self.n += x.shape[0]

    @property
    def H(self) -> torch.Tensor:
        return self.xxt * (2.0 / max(self.n, 1))

    def all_reduce(self) -> None:
        """Merge the ranks' sums (distributed calibration): Σ x xᵀ and n over every rank's tokens."""
        distributed.all_reduce_(self.xxt)
        self.n = int(distributed.total(self.n))


def _inverse_cholesky(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU) after dampening the diagonal (more damping if H is not PD).

    With J the order-reversing permutation and J H J = L Lᵀ (one Cholesky), H⁻¹ = J L⁻ᵀ L⁻¹ J = UᵀU for
    U = J L⁻¹ J, which is upper triangular with a positive diagonal: the factor itself, from one Cholesky and one
    triangular inverse (the reference computes cholesky, cholesky_inverse, then a second cholesky)."""
    eye = torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
    damp = percdamp * torch.mean(torch.diag(H))
    for _ in range(6):
        L, info = torch.linalg.cholesky_ex((H + damp * eye).flip(0, 1))
        if info == 0:
            U = torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1)
            if torch.isfinite(U).all():
                return U
        damp = damp * 10
    raise PrunepilotError("SparseGPT: Hessian is not positive definite even after damping")


def lowest_k(values: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of exactly k of the smallest entries of a 1-D tensor: every entry below the k-th smallest value,
    then entries equal to it in index order (the order statistic is several times cheaper than topk for k ~ n/2)."""
    kth = order_stats(values, [k])[0]
    mask = values < kth
    ties = (values == kth).nonzero().flatten()
    mask[ties[: k - int(mask.sum())]] = True
    return mask


class SparseGPTOptions(Strict):
    blocksize: int = Field(128, ge=1)    # columns per lazy-update block
    percdamp: float = Field(0.01, ge=0)  # diagonal damping, as a fraction of mean(diag H)
    sink_weight: float = Field(1.0, ge=1)  # each window's first token counts this many times in H (1 = the paper)


class SparseGPT(PruningMethod):
    """SparseGPT (Frantar & Alistarh 2023): OBS-style mask selection with weight reconstruction.

    Columns are processed left to right in blocks; pruning column i moves its error onto the
    not-yet-processed columns through the inverse Hessian's Cholesky factor. Every row is reconstructed
    independently of the others, so linears that read the same input (q/k/v, gate/up: one shared state, see
    engine.blocks) are swept together as one stack of rows (prune_group): one damping + inverse Cholesky and
    one column sweep, each matrix keeping its own selection rule.
    """
    summary = "second-order mask selection + weight update (SparseGPT)"

    def __init__(self, options: SparseGPTOptions | None = None):
        super().__init__(options or SparseGPTOptions())
        self.blocksize = self.options.blocksize
        self.percdamp = self.options.percdamp

    def init_state(self, weight):
        return HessianState(weight.shape[1], weight.device, self.options.sink_weight)

    @torch.no_grad()
    def prune(self, weight, state, sparsity, pattern):
        return self.prune_group([weight], state, sparsity, pattern)[0]

    @torch.no_grad()
    def prune_group(self, weights: list[torch.Tensor], state: HessianState, sparsity: float,
                    pattern: tuple[int, int] | None) -> list[torch.Tensor]:
        """Prune (out_k, in) matrices that share the input statistics `state`; returns each one's bool mask."""
        cols = weights[0].shape[1]
        if pattern is not None and cols % pattern[1]:
            raise PrunepilotError(f"N:M pattern needs the input width ({cols}) divisible by {pattern[1]}")
        if pattern is not None and self.blocksize % pattern[1] and cols > self.blocksize:  # groups would straddle blocks
            raise PrunepilotError(f"SparseGPT N:M needs blocksize ({self.blocksize}) divisible by {pattern[1]}")
        if state.unweighted:
            log.warning("SparseGPT sink_weight %g: %d routed tokens without a position were added unweighted",
                        state.sink_weight, state.unweighted)
        W = torch.cat([w.detach().float() for w in weights])  # (rows, in): every matrix's rows, stacked
        H = state.H  # a fresh tensor: (2/n) Σ x xᵀ
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        U = _inverse_cholesky(H, self.percdamp)  # (in, in), upper
        bounds = torch.tensor([0] + [w.shape[0] for w in weights]).cumsum(0).tolist()
        mask = torch.zeros_like(W, dtype=torch.bool)
        for i1 in range(0, cols, self.blocksize):
            i2 = min(i1 + self.blocksize, cols)
            mask[:, i1:i2] = self._sweep(W, U, i1, i2, sparsity, pattern, bounds)
        W.masked_fill_(mask, 0.0)
        for w, a, b in zip(weights, bounds[:-1], bounds[1:]):
            w.copy_(W[a:b].to(w.dtype))
        return [mask[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def _sweep(self, W, U, i1, i2, sparsity, pattern, bounds) -> torch.Tensor:
        """Columns i1..i2-1: choose their masks, zero them one column at a time moving each column's error onto
        the columns to its right (inside the block now, beyond it in one matmul at the end). Returns (rows, count)."""
        U1 = U[i1:i2, i1:i2]
        d1 = torch.diag(U1)                                   # (count,)
        Wt = W[:, i1:i2].t().contiguous()                     # (count, rows): column i is the contiguous row i
        err = torch.zeros_like(Wt)                            # (count, rows)
        if pattern is None:  # block-wide selection by the OBS saliency w² / [H⁻¹]_jj, per matrix
            mask_t = self._block_mask(Wt, d1, sparsity, bounds)
            pruned = mask_t.to(Wt.dtype)                      # (count, rows): 1 where pruned
        for i in range(i2 - i1):
            if pattern is not None and i % pattern[1] == 0:  # this m-group's mask, chosen on updated weights
                if i == 0:
                    mask_t, pruned = torch.zeros_like(Wt, dtype=torch.bool), torch.zeros_like(Wt)
                n, m = pattern
                sal = Wt[i:i + m].pow(2) / d1[i:i + m].pow(2).unsqueeze(1)         # (m, rows)
                idx = torch.topk(sal, m - n, dim=0, largest=False).indices
                mask_t[i:i + m].scatter_(0, idx, True)
                pruned[i:i + m].scatter_(0, idx, 1.0)                             # the group's rows only
            e = Wt[i] * pruned[i] / d1[i]                     # (w - q) / d: w / d where pruned, 0 where kept
            Wt[i:].addr_(U1[i, i:], e, alpha=-1.0)            # W1[:, i:] -= e ⊗ U1[i, i:]
            err[i] = e
        W[:, i1:i2] = Wt.t()
        W[:, i2:].addmm_(err.t(), U[i1:i2, i2:], alpha=-1.0)
        return mask_t.t()

    @staticmethod
    def _block_mask(Wt, d1, sparsity, bounds) -> torch.Tensor:
        """(count, rows) mask: in each matrix's rows the int(size * sparsity) lowest saliencies of the block."""
        sal = Wt.pow(2) / d1.pow(2).unsqueeze(1)              # (count, rows)
        mask = torch.zeros_like(sal, dtype=torch.bool)
        for a, b in zip(bounds[:-1], bounds[1:]):
            part = sal[:, a:b]
            k = int(part.numel() * sparsity)
            if k:
                mask[:, a:b] = lowest_k(part.t().flatten(), k).view(b - a, -1).t()
        return mask
