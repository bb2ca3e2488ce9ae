"""Pure tensor functions that turn importance scores into pruning masks.

Convention everywhere: a mask is a bool tensor shaped like the scores, **True = prune (set to zero)**.
Lower score = less important.
"""
from __future__ import annotations

import torch

from .errors import PrunepilotError


def check_sparsity(sparsity: float) -> float:
    if not (0.0 <= float(sparsity) < 1.0):
        raise PrunepilotError(f"sparsity must be in [0, 1), got {sparsity}")
    return float(sparsity)


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """'unstructured' -> None; 'N:M' -> (n, m): keep n weights in every m consecutive inputs."""
    if pattern in (None, "", "unstructured"):
        return None
    try:
        n, m = (int(p) for p in str(pattern).split(":"))
    except ValueError:
        raise PrunepilotError(f"pattern must be 'unstructured' or 'N:M' such as 2:4, got {pattern!r}") from None
    if not (0 < n < m):
        raise PrunepilotError(f"N:M pattern needs 0 < N < M, got {pattern!r}")
    return n, m


def rowwise_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the int(in * sparsity) lowest-scoring weights in every output row. scores: (out, in)."""
    k = int(scores.shape[1] * check_sparsity(sparsity))
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k == 0:
        return mask
    idx = torch.topk(scores, k, dim=1, largest=False, sorted=False).indices  # (out, k)
    return mask.scatter_(1, idx, True)


def layer_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the int(numel * sparsity) lowest scores of the whole matrix (magnitude-pruning style)."""
    k = int(scores.numel() * check_sparsity(sparsity))
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k == 0:
        return mask.view_as(scores)
    idx = torch.topk(scores.flatten(), k, largest=False, sorted=False).indices
    return mask.scatter_(0, idx, True).view_as(scores)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M: in every group of m consecutive input weights of a row keep the n highest scores.

    scores: (out, in) with in divisible by m. Sparsity is exactly (m - n) / m.
    """
    out_f, in_f = scores.shape
    if in_f % m:
        raise PrunepilotError(f"N:M pattern {n}:{m} needs the input width ({in_f}) divisible by {m}")
    groups = scores.reshape(out_f, in_f // m, m)  # (out, in/m, m)
    idx = torch.topk(groups, m - n, dim=2, largest=False, sorted=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True)
    return mask.reshape(out_f, in_f)


def select_mask(scores: torch.Tensor, sparsity: float, pattern: tuple[int, int] | None,
                granularity: str = "row") -> torch.Tensor:
    """Dispatch: N:M when a pattern is given, else row-wise or whole-layer unstructured."""
    if pattern is not None:
        return nm_mask(scores, *pattern)
    if granularity == "row":
        return rowwise_mask(scores, sparsity)
    if granularity == "layer":
        return layer_mask(scores, sparsity)
    raise PrunepilotError(f"granularity must be 'row' or 'layer', got {granularity!r}")


def lowest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask (1-D) of the k lowest entries: the channels or heads to remove."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k <= 0:
        return mask
    return mask.scatter_(0, torch.topk(scores, k, largest=False, sorted=False).indices, True)
