"""z-scores (the one standardisation used across prunepilot: agent profile, built-in policy, FLAP scores) and
order statistics of large tensors (the agent's percentiles, SparseGPT's exact-k selection)."""
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


def order_stats(x: torch.Tensor, ranks: list[int], by_sort: bool | None = None) -> list[torch.Tensor]:
    """The ranks-th smallest entries (1-based) of a 1-D tensor, as 0-d tensors.

    by_sort (default: on CUDA) reads them from one full sort: CUDA's kthvalue selects inside one thread block and is
    ~20x slower than a radix sort on tens of millions of elements (pytorch/pytorch#75599). On the CPU kthvalue
    (quickselect, O(n)) is the faster one, several times faster than topk or sort for a rank near n/2."""
    if x.is_cuda if by_sort is None else by_sort:
        ordered = torch.sort(x).values
        return [ordered[r - 1] for r in ranks]
    return [x.kthvalue(r).values for r in ranks]
