"""Choosing what to remove: each layer's candidates (Candidates: scores and unit cost), one global ranking against
the budget (select_global, FLAP) or uniform per-layer ratios (split_uniform_layer), and the MLP removals rounded to
the kept-width multiple (align_removal); uniform_removal / global_removal / aligned apply them to the Ledger."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..engine.layout import MoEParts
from ..errors import PrunepilotError
from .budget import Ledger


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



def uniform_removal(ledger: Ledger, i: int, cands: list[Candidates], keep_frac: float) -> dict[str, torch.Tensor]:
    """Layer i keeps keep_frac of its dense measure: {kind: removed indices}."""
    by_kind = {c.kind: c for c in cands}
    if ledger.options.target == "channels":  # every module type keeps round(keep_frac * dense) units
        ks = {k: max(0, c.n - max(1, round(keep_frac * ledger.dense_units[i][k]))) for k, c in by_kind.items()}
    else:
        now = ledger.measure(i)
        budget = now + ledger.overhead(i) - keep_frac * ledger.dense_layer[i]
        # KV groups: floor(removed fraction x dense groups), with the fraction counted cumulatively
        # against the dense layer, so k small iterative steps remove as many groups as one step would
        # (flooring each step's small share of what is left gave 0 groups every step)
        dense_g = ledger.dense_units[i]["attn"]
        gone_g = dense_g - (by_kind["attn"].n if "attn" in by_kind else dense_g)
        removed = 1 - (now - max(budget, 0.0)) / ledger.dense_layer[i]  # after this step
        groups = math.floor(removed * dense_g + 1e-9) - gone_g
        k_c, k_g = split_uniform_layer(by_kind.get("mlp"), by_kind.get("attn"), max(budget, 0.0), groups)
        ks = {"mlp": k_c, "attn": k_g}
    return {k: lowest(c.scores, ks[k]) for k, c in by_kind.items()}


def global_removal(ledger: Ledger, cands: list[Candidates], keep_frac: float) -> dict[tuple[int, str], torch.Tensor]:
    """One ranking across all layers' candidates until the model keeps keep_frac of its dense measure:
    {(layer, kind): removed indices}."""
    n = len(ledger.layouts)
    budget = sum(ledger.measure(i) + ledger.overhead(i) for i in range(n)) - keep_frac * ledger.dense_total
    return select_global(cands, max(budget, 0.0))


def aligned(ledger: Ledger, cands: list[Candidates], removed: dict[str, torch.Tensor],
            align: bool) -> dict[str, torch.Tensor]:
    """MLP removals rounded so that the kept width is a multiple of ledger.multiple (channel_multiple; 8 for
    MoE experts), on the last step only (rounding the intermediate steps of flap_iterative would push
    removals to later steps), except for MoE experts, which must stay aligned to run at all."""
    def rounds(c: Candidates) -> bool:
        moe = isinstance(ledger.layouts[c.layer].mlp, MoEParts)
        return c.kind == "mlp" and (align or moe) and ledger.multiple(c.layer) > 1

    return {c.kind: align_removal(c.scores, removed[c.kind], ledger.multiple(c.layer)) if rounds(c)
            else removed[c.kind] for c in cands}
