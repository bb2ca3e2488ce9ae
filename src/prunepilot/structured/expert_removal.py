"""Removing whole MoE experts before the channel steps (options.remove_experts, ranked by options.expert_score:
expert_scores.py), the same count in every MoE layer and never fewer experts than the router's top-k."""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..engine import ExpertMatrix, blocks
from ..engine.layout import MoEParts
from .budget import Ledger
from .expert_scores import expert_score_state
from .slicing import keep_experts

log = logging.getLogger(__name__)


def expert_scores(ledger: Ledger, ids, device, kind: str, batch_size: int) -> dict[int, torch.Tensor]:
    """{MoE layer: (E,) float64 score of each expert} from one statistics-only pass over the dense model."""
    routers: dict[int, nn.Module] = {}

    def observed(i, block):
        lay = ledger.layouts[i].mlp
        if not isinstance(lay, MoEParts):
            return {}
        ex = block.get_submodule(lay.experts)
        routers[id(ex)] = block.get_submodule(lay.router)
        return {e: ExpertMatrix(ex, "gate_up_proj", e) for e in range(ex.gate_up_proj.shape[0])}

    scores = {}
    for blk in blocks(ledger.adapter, ids, device, linears=observed, outputs="dense", batch_size=batch_size,
                      states=expert_score_state(kind, routers), desc="expert scores"):
        if blk.states:
            scores[blk.index] = torch.tensor([blk.states[e].score for e in sorted(blk.states)], dtype=torch.float64)
    return scores


def remove_experts(ledger: Ledger, ids, device, batch_size: int) -> dict[int, dict]:
    """In every MoE layer remove the options.remove_experts fraction of experts with the lowest score.
    Returns {layer: {"kept_experts", "expert_scores"}}."""
    options = ledger.options
    kept = {}
    for i, s in expert_scores(ledger, ids, device, options.expert_score, batch_size).items():
        block, lay = ledger.adapter.blocks[i], ledger.layouts[i].mlp
        top_k = getattr(block.get_submodule(lay.router), "top_k", 1)
        k = min(int(options.remove_experts * s.numel()), s.numel() - top_k)
        keep = torch.argsort(s, descending=True, stable=True)[: s.numel() - k].sort().values
        keep_experts(block, keep, lay)
        kept[i] = {"kept_experts": keep.tolist(), "expert_scores": s.tolist()}
        gone = [e for e in range(s.numel()) if e not in kept[i]["kept_experts"]]
        log.info("layer %d: removed experts %s (%s %s), kept %d", i, gone, options.expert_score,
                 s[gone].tolist(), keep.numel())
    return kept
