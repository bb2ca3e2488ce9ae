"""The physical removal: slice the chosen MLP channels and KV groups out of a layer (bias compensation from the
observed input means when on) and keep track of the original indices each layer still has (for the report)."""
from __future__ import annotations

import torch

from ..engine.layout import MoEParts
from ..moments import Moments
from .budget import Ledger
from .slicing import complement, keep_kv_groups, keep_mlp_channels


class Remover:
    def __init__(self, ledger: Ledger):
        self.ledger = ledger
        self.kept_channels = [torch.arange(u["mlp"]) for u in ledger.dense_units]  # original MLP channel indices
        self.kept_groups = [torch.arange(u["attn"]) for u in ledger.dense_units]   # original KV group indices

    def apply(self, i: int, removed: dict[str, torch.Tensor], moments: dict[str, Moments],
              expert_order: torch.Tensor | None = None) -> None:
        """Slice layer i (with bias compensation when on: every output projection gets a bias). An MoE layer's
        experts each drop their own weakest channels: expert_order (E, I), weakest first."""
        ledger = self.ledger
        block, lay, compensate = ledger.adapter.blocks[i], ledger.layouts[i], ledger.options.bias_compensation
        units = ledger.units(i)
        for kind in ledger.kinds:
            gone = removed.get(kind, torch.zeros(0, dtype=torch.long))
            if gone.numel() == 0 and not compensate:
                continue
            if kind == "mlp" and isinstance(lay.mlp, MoEParts):  # each expert drops its own weakest len(gone)
                keep_mlp_channels(block, expert_order[:, gone.numel():], parts=lay.mlp)
                continue
            keep = complement(gone, units[kind])
            mean = moments[kind].mean if compensate else None
            if kind == "mlp":
                keep_mlp_channels(block, keep, mean, lay.mlp)
                self.kept_channels[i] = self.kept_channels[i][keep]
            else:
                keep_kv_groups(block, keep, ledger.head_dim, mean, lay.attn)
                self.kept_groups[i] = self.kept_groups[i][keep]
