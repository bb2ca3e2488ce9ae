"""The contract of a statistic state: what a calibration pass (engine.blocks) feeds and merges.

    state = make_state(name, linear)     # one per observed linear (linears reading one input share one)
    state.add(x)                         # x: (..., in) an input of that linear, every batch
    state.all_reduce()                   # torchrun: merge the ranks' statistics, so every rank prunes alike
    state.n                              # tokens seen

Implemented by methods.base.InputNormState (Wanda, RIA), methods.sparsegpt.HessianState, methods.dsnot.WithMoments,
moments.RunningMoments / DomainMoments, structured.expert_scores.TokenCount / ReapScore.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class StatisticState(Protocol):
    n: int

    def add(self, x: torch.Tensor) -> None:
        """Accumulate x (..., in): every row is one token's input."""

    def all_reduce(self) -> None:
        """Merge this statistic over the ranks of a distributed run (no-op effect on one rank)."""
