"""Scoring: the removable units of each layer (MLP channels, KV groups) with the method's scores and their cost,
from the observed input statistics of down_proj / o_proj."""
from __future__ import annotations

import torch

from ..engine.layout import attention_counts, linear
from ..moments import Moments
from .budget import Ledger
from .methods import StructuredMethod
from .scores import group_scores, head_scores, standardize
from .selection import Candidates


class Scorer:
    """Candidates of every layer; for MoE layers also each expert's channel order (expert_order, used by the
    removal) and the experts scored by their weights alone for lack of routed tokens (starved)."""

    def __init__(self, ledger: Ledger, method: StructuredMethod, min_expert_tokens: int = 0):
        self.ledger, self.method, self.min_expert_tokens = ledger, method, min_expert_tokens
        self.expert_order: dict[int, torch.Tensor] = {}   # MoE layer -> (E, I) each expert's channels, weakest first
        self.starved: dict[str, int] = {}                   # experts scored by weights alone -> routed tokens

    def candidates(self, i: int, moments: dict[str, Moments]) -> list[Candidates]:
        """Scores of layer i's MLP channels and KV groups from the input statistics of down_proj / o_proj."""
        ledger = self.ledger
        block, lay, hd = ledger.adapter.blocks[i], ledger.layouts[i], ledger.head_dim
        out = []
        if "mlp" in moments:
            out.append(Candidates(i, "mlp", self.method.column_scores(linear(block, lay.mlp.out).weight,
                                                                      moments["mlp"]), ledger.cost(i, "mlp")))
        elif "mlp" in ledger.kinds:
            out.append(Candidates(i, "mlp", self.expert_slots(i, moments), ledger.cost(i, "mlp")))
        if "attn" in moments:
            gs = attention_counts(block, lay.attn, hd)[2]
            col = self.method.column_scores(linear(block, lay.attn.o).weight, moments["attn"])  # (in,)
            reduce = self.method.group_reduce
            out.append(Candidates(i, "attn", group_scores(head_scores(col, hd, reduce), gs, reduce),  # (kv_heads,)
                                  ledger.cost(i, "attn")))
        return out

    def expert_slots(self, i: int, moments: dict[str, Moments]) -> torch.Tensor:
        """Scores of an MoE layer's channel slots: slot r = removing each expert's r-th weakest channel (by its
        own routed-token statistics); its score is the mean over experts of those r-th scores, so slots come in
        ascending order. Experts routed fewer than min_expert_tokens tokens are scored by their weights alone."""
        experts = self.ledger.adapter.blocks[i].get_submodule(self.ledger.layouts[i].mlp.experts)
        scores = []
        for e in range(experts.down_proj.shape[0]):
            m = moments[f"mlp.{e}"]
            if m.n < self.min_expert_tokens:
                self.starved[f"{self.ledger.adapter.block_name(i)}.mlp.experts.{e}"] = m.n
                col = standardize(experts.down_proj[e].detach().float().pow(2).sum(0).cpu())
            else:
                col = self.method.column_scores(experts.down_proj[e], m)
            scores.append(col)
        ordered = torch.stack(scores).sort(dim=1, stable=True)            # (E, I) each expert ascending
        self.expert_order[i] = ordered.indices
        return ordered.values.mean(0)
