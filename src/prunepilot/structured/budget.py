"""What structured `sparsity` counts, what each removable unit is worth, and whether a target is reachable.

options.target (options.py):
    "params":   the fraction of the decoder blocks' linear parameters (weights + biases) removed; biases
                added by compensation count against it, so params_after = (1 - s) * params_before up to
                one MLP channel.
    "channels": the mean over module types of the fraction of MLP channels / KV groups removed.
"""
from __future__ import annotations

import math

from ..engine import ModelAdapter
from ..engine.layout import BlockLayout, MoEParts, attention_counts, channel_cost, linear, mlp_params, mlp_width
from ..errors import PrunepilotError
from .options import StructuredOptions

EXPERT_MULTIPLE = 8


def linear_params(block, layout: BlockLayout) -> int:
    attn = sum(p.numel() for n in layout.attn.projections() for p in linear(block, n).parameters())
    return attn + mlp_params(block, layout.mlp)


class Ledger:
    """Counts what `sparsity` measures and what each removable unit is worth, on the current model."""

    def __init__(self, adapter: ModelAdapter, layouts: list[BlockLayout], head_dim: int, options: StructuredOptions):
        self.adapter, self.layouts, self.head_dim, self.options = adapter, layouts, head_dim, options
        self.kinds = options.kinds  # ("mlp", "attn") minus what the options switch off
        self.dense_units = [self.units(i) for i in range(len(layouts))]
        self.dense_layer = [self.measure(i) for i in range(len(layouts))]
        self.dense_total = sum(self.dense_layer)
        self.dense_params = [linear_params(adapter.blocks[i], lay) for i, lay in enumerate(layouts)]

    def units(self, i: int) -> dict[str, int]:
        block, lay = self.adapter.blocks[i], self.layouts[i]
        return {"mlp": mlp_width(block, lay.mlp), "attn": attention_counts(block, lay.attn, self.head_dim)[1]}

    def measure(self, i: int) -> float:
        if self.options.target == "params":
            return float(linear_params(self.adapter.blocks[i], self.layouts[i]))
        now = self.units(i)
        return sum(now[k] / self.dense_units[i][k] for k in self.kinds)

    def cost(self, i: int, kind: str) -> float:
        """What removing one MLP channel / one KV group of layer i saves."""
        if self.options.target == "channels":
            return 1.0 / self.dense_units[i][kind]
        block, lay, hd = self.adapter.blocks[i], self.layouts[i], self.head_dim

        def row(name):  # one output row: a weight row plus its bias entry
            lin = linear(block, name)
            return lin.in_features + (lin.bias is not None)

        if kind == "mlp":  # gate + up rows, down column (of every expert)
            return channel_cost(block, lay.mlp)
        gs = attention_counts(block, lay.attn, hd)[2]  # q rows + k/v rows + o columns of one KV group
        return float(gs * hd * row(lay.attn.q) + hd * (row(lay.attn.k) + row(lay.attn.v))
                     + gs * hd * linear(block, lay.attn.o).out_features)

    def overhead(self, i: int) -> float:
        """Parameters bias compensation will add to layer i (a bias on each bias-less output projection)."""
        if self.options.target != "params" or not self.options.bias_compensation:
            return 0.0
        block, lay = self.adapter.blocks[i], self.layouts[i]
        outs = {"mlp": lay.mlp.out, "attn": lay.attn.o}  # fused experts have no bias: nothing added (out "")
        return float(sum(linear(block, outs[k]).out_features for k in self.kinds
                         if outs[k] and linear(block, outs[k]).bias is None))

    def multiple(self, i: int) -> int:
        """MLP widths of layer i are kept at a multiple of this: channel_multiple, and for fused MoE experts at
        least 8 (transformers' grouped_mm experts kernel needs 16-byte strides: 8 bf16 / 4 fp32 values)."""
        m = self.options.channel_multiple
        return math.lcm(m, EXPERT_MULTIPLE) if isinstance(self.layouts[i].mlp, MoEParts) else m

    def min_kept(self, i: int, kind: str) -> int:
        """Fewest units a module can keep: one, or one multiple of channel_multiple for an MLP wide enough
        to be rounded (align_removal never rounds a kept width down to zero)."""
        m = self.multiple(i)
        return m if kind == "mlp" and 1 < m <= self.dense_units[i]["mlp"] else 1

    def capacity(self, i: int) -> float:
        now = self.units(i)
        return sum(max(0, now[k] - self.min_kept(i, k)) * self.cost(i, k) for k in self.kinds)

    def mlp_floor_words(self) -> str:
        m = self.options.channel_multiple
        return f"{m} MLP channels (channel_multiple {m})" if m > 1 else "one MLP channel"

    def check_feasible(self, sparsity: float) -> None:
        """Fail before any work when keeping the fewest units per layer (one KV group; one MLP channel, or one
        channel_multiple) cannot reach the target."""
        need = [self.dense_layer[i] * sparsity + self.overhead(i) for i in range(len(self.layouts))]
        cap = [self.capacity(i) for i in range(len(self.layouts))]
        short = sum(need) > sum(cap) + 1e-6 if self.options.ratios == "global" else any(
            n > c + 1e-6 for n, c in zip(need, cap))
        if short:
            most = max(0.0, sum(c - o for c, o in zip(cap, (self.overhead(i) for i in range(len(cap))))))
            raise PrunepilotError(
                f"sparsity {sparsity:g} is too high for structured pruning ({self.options.ratios} ratios, kinds "
                f"{'+'.join(self.kinds)}): keeping one KV head group and {self.mlp_floor_words()} per layer allows "
                f"removing at most {most / self.dense_total:.3f} of the block {self.options.target}")
