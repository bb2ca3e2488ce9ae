"""Input-channel permutations for N:M masks (RIA's channel reallocation), folded into the mask.

An N:M mask keeps the N best of each M consecutive inputs; a good permutation p of the inputs puts columns
that compete badly into different groups, so more total score survives. Here p only decides the groups:
mask[:, p] = nm_mask(scores[:, p]). The weights are not moved, so the checkpoint stays ordinary and needs no
matching permutation of the layer that produces these inputs (impossible on a residual stream); the mask is
N:M in the order p, which a 2:4 kernel can use only after permuting W's columns and x by p.

    greedy: columns sorted by total score, dealt to the groups in a snake order (RIA's heuristic reallocation)
    exact:  greedy, then for each slot s of the M in a group, the columns in slot s are reassigned to groups by
            a linear sum assignment that maximises the kept score (optimal per slot given the other slots)
"""
from __future__ import annotations

import torch

from ..errors import PrunepilotError
from ..masks import nm_mask


def snake_permutation(scores: torch.Tensor, m: int) -> torch.Tensor:
    """(in,) order: the columns by ascending total score, chunk k of in/m columns goes to slot k of every group,
    odd chunks reversed so each group mixes strong and weak columns."""
    order = torch.sort(scores.sum(0), stable=True).indices
    g = scores.shape[1] // m
    perm = torch.empty_like(order)
    for k in range(m):
        chunk = order[k * g:(k + 1) * g]
        perm[k::m] = chunk.flip(0) if k % 2 else chunk
    return perm


def slot_assignment(scores: torch.Tensor, perm: torch.Tensor, n: int, m: int, slot: int) -> torch.Tensor:
    """perm with the columns in `slot` of every group reassigned by a linear sum assignment that maximises
    value[g, h], the score group g keeps when it takes the slot column of group h. With o_1 >= .. >= o_{m-1} the
    other columns' scores in a row of g, adding x keeps Σ_{i<=n} o_i + max(0, x - o_n) (x displaces o_n when it is
    larger), so value[g, h] = Σ_rows top-n(others of g) + Σ_rows max(0, x_h - o_n of g)."""
    from scipy.optimize import linear_sum_assignment

    groups = scores[:, perm].reshape(scores.shape[0], -1, m)                  # (rows, G, m)
    cand = groups[:, :, slot]                                                 # (rows, G): slot column of h
    others = torch.cat([groups[:, :, :slot], groups[:, :, slot + 1:]], dim=2).sort(dim=2, descending=True).values
    base = others[:, :, :n].sum((0, 2))                                       # (G,)
    nth = others[:, :, n - 1]                                                 # (rows, G): o_n of each group
    value = torch.empty(cand.shape[1], cand.shape[1])
    step = max(1, 2 ** 24 // max(cand.numel(), 1))                            # groups g per chunk
    for g0 in range(0, cand.shape[1], step):
        g1 = min(g0 + step, cand.shape[1])
        gain = (cand.unsqueeze(1) - nth[:, g0:g1].unsqueeze(2)).clamp_min(0).sum(0)   # (g1 - g0, G)
        value[g0:g1] = base[g0:g1].unsqueeze(1) + gain
    _, take = linear_sum_assignment(value.double().numpy(), maximize=True)    # group g takes h = take[g]
    out = perm.clone()
    slots = perm[slot::m]
    out[slot::m] = slots[torch.as_tensor(take)]
    return out


def channel_permutation(scores: torch.Tensor, n: int, m: int, how: str) -> torch.Tensor:
    """The input order (in,) whose consecutive groups of m form the N:M groups."""
    perm = snake_permutation(scores, m)
    if how == "exact":
        try:
            import scipy.optimize  # noqa: F401
        except ImportError:
            raise PrunepilotError("permute: exact needs scipy (pip install scipy); use permute: greedy") from None
        for slot in range(m):
            perm = slot_assignment(scores, perm, n, m, slot)
    return perm


def permuted_nm_mask(scores: torch.Tensor, n: int, m: int, how: str) -> torch.Tensor:
    """N:M mask (True = prune) whose groups are consecutive in the channel permutation of the inputs."""
    if scores.shape[1] % m:
        raise PrunepilotError(f"N:M pattern {n}:{m} needs the input width ({scores.shape[1]}) divisible by {m}")
    perm = channel_permutation(scores.float(), n, m, how)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask[:, perm] = nm_mask(scores[:, perm], n, m)
    return mask
