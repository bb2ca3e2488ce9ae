from __future__ import annotations

import torch

from pydantic import Field

from ..errors import PrunepilotError
from ..schema import Strict
from .base import PruningMethod


class HessianState:
    """H = (2/n) Σ x xᵀ over all calibration tokens, accumulated in float32. (in, in)"""

    def __init__(self, in_features: int, device):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
        t = x.shape[0]
        self.H.mul_(self.n / (self.n + t))
        x = x * (2.0 / (self.n + t)) ** 0.5
        self.H.addmm_(x.t(), x)
        self.n += t


def _inverse_cholesky(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of H⁻¹ after dampening the diagonal (more damping if H is not PD)."""
    eye = torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
    damp = percdamp * torch.mean(torch.diag(H))
    for _ in range(6):
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0:
                return U
        damp = damp * 10
    raise PrunepilotError("SparseGPT: Hessian is not positive definite even after damping")


class SparseGPTOptions(Strict):
    blocksize: int = Field(128, ge=1)    # columns per lazy-update block
    percdamp: float = Field(0.01, ge=0)  # diagonal damping, as a fraction of mean(diag H)


class SparseGPT(PruningMethod):
    """SparseGPT (Frantar & Alistarh 2023): OBS-style mask selection with weight reconstruction.

    Columns are processed left to right in blocks; pruning column i moves its error onto the
    not-yet-processed columns through the inverse Hessian's Cholesky factor.
    """
    summary = "second-order mask selection + weight update (SparseGPT)"

    def __init__(self, options: SparseGPTOptions | None = None):
        super().__init__(options or SparseGPTOptions())
        self.blocksize = self.options.blocksize
        self.percdamp = self.options.percdamp

    def init_state(self, weight):
        return HessianState(weight.shape[1], weight.device)

    @torch.no_grad()
    def prune(self, weight, state, sparsity, pattern):
        cols = weight.shape[1]
        if pattern is not None and cols % pattern[1]:
            raise PrunepilotError(f"N:M pattern needs the input width ({cols}) divisible by {pattern[1]}")
        W = weight.detach().float().clone()  # (out, in)
        H = state.H.clone()
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        U = _inverse_cholesky(H, self.percdamp)  # (in, in), upper
        mask = torch.zeros_like(W, dtype=torch.bool)
        for i1 in range(0, cols, self.blocksize):
            i2 = min(i1 + self.blocksize, cols)
            W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
            d1 = torch.diag(U1)  # (count,)
            Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
            if pattern is None:  # block-wide selection by the OBS saliency w² / [H⁻¹]_jj
                sal = W1.pow(2) / d1.pow(2).unsqueeze(0)
                k = int(sal.numel() * sparsity)
                mask1 = torch.zeros(sal.numel(), dtype=torch.bool, device=W.device)
                if k:
                    mask1[torch.topk(sal.flatten(), k, largest=False).indices] = True
                mask1 = mask1.view_as(sal)
            else:
                n, m = pattern
                mask1 = torch.zeros_like(W1, dtype=torch.bool)
            for i in range(i2 - i1):
                w = W1[:, i]
                if pattern is not None and i % m == 0:  # choose this m-group's mask on updated weights
                    sal = W1[:, i:i + m].pow(2) / d1[i:i + m].pow(2).unsqueeze(0)
                    idx = torch.topk(sal, m - n, dim=1, largest=False).indices
                    mask1.scatter_(1, i + idx, True)
                q = w.clone()
                q[mask1[:, i]] = 0
                Q1[:, i] = q
                err = (w - q) / d1[i]  # (out,)
                W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
                Err1[:, i] = err
            W[:, i1:i2] = Q1
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]
            mask[:, i1:i2] = mask1
        weight.copy_(W.to(weight.dtype))
        return mask
