"""Choosing what to remove: how many units of each layer's candidates go (uniform per-layer ratios or one
global ranking against the budget), and the MLP removals rounded to the kept-width multiple."""
from __future__ import annotations

import math

import torch

from .budget import Ledger
from .scores import Candidates, align_removal, lowest, select_global, split_uniform_layer
from .slicing import MoEParts


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
