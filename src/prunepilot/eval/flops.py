"""Prefill FLOPs per token: what a speed ratio should be if every kernel ran at the same efficiency.

    linears   2 x in x out per token for every linear of the decoder blocks (whatever their pruned widths)
    head      2 x hidden x vocab, per token when every position's logits are computed, once per sequence when only
              the last position's are (what a serving stack does in prefill)
    attention 4 x (query heads x head_dim) x (seq_len + 1) / 2 per layer: QKᵀ and AV over the causal prefix,
              averaged over the positions of the sequence
Elementwise work (norms, rotary, activations, added biases) is left out: it is a few percent of the total and is
what, together with kernel efficiency, the measured ratio adds to this one.
"""
from __future__ import annotations

from torch import nn

from ..engine import AttentionGeometry, ModelAdapter
from ..engine.layout import query_width


def _linear_flops(module: nn.Module) -> int:
    return sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def _query_width(block: nn.Module, geo: AttentionGeometry) -> int:
    """Query heads x head_dim of this block as the engine's layout reads it (structured pruning removes heads per
    layer), or the configured width for an attention layout it does not know (nothing can have resized that)."""
    width = query_width(block, geo.head_dim)
    return geo.num_heads * geo.head_dim if width is None else width


def prefill_flops(model, seq_len: int, last_logits_only: bool = True) -> dict:
    """{"blocks", "attention", "head", "total"}: FLOPs per prefill token of a sequence of seq_len tokens."""
    adapter = ModelAdapter(model)
    blocks = sum(_linear_flops(b) for b in adapter.blocks)
    geo = adapter.attention_geometry()
    attention = sum(4 * _query_width(b, geo) * (seq_len + 1) / 2 for b in adapter.blocks)
    head_module = model.get_output_embeddings()
    head = _linear_flops(head_module) if head_module is not None else 0
    if last_logits_only:
        head /= seq_len
    return {"blocks": blocks, "attention": attention, "head": head, "total": blocks + attention + head}


def ideal_speedup(dense, pruned, seq_len: int, last_logits_only: bool = True) -> float:
    """dense FLOPs / pruned FLOPs per prefill token."""
    return prefill_flops(dense, seq_len, last_logits_only)["total"] / prefill_flops(pruned, seq_len,
                                                                                  last_logits_only)["total"]
