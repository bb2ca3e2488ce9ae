"""z-scores: the one standardisation used across prunepilot (agent profile, built-in policy, FLAP scores)."""
from __future__ import annotations

import torch


def zscore(x: torch.Tensor, unbiased: bool = False, eps: float = 1e-9) -> torch.Tensor:
    """(x - mean) / (std + eps), std over all entries (population std unless unbiased); keeps x's dtype."""
    return (x - x.mean()) / (x.std(unbiased=unbiased) + eps)


def zscore_list(values: list[float]) -> list[float]:
    """zscore of plain numbers in float64 (population std, eps 1e-9); [] for no values."""
    if not values:
        return []
    return zscore(torch.tensor(values, dtype=torch.float64)).tolist()
