"""Channel/head importance scores of the structured methods (pure tensor code; the statistics: moments.py,
the selection: selection.py).

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

import torch

from ..moments import Moments
from ..stats import zscore


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
