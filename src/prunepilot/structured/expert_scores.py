"""How `--remove-experts` ranks the experts of an MoE layer (recipe structured.expert_score); lowest go first.

    frequency:  n_j = number of calibration tokens whose top-k contains expert j
    reap:       S_j = (1 / n_j) Σ_{x routed to j} g_j(x) · ‖f_j(x)‖₂          (REAP, Lasby et al. 2025, eq. 9)
                g_j(x): the gate weight the model multiplies f_j(x) by (the router's top-k weight: softmax over
                all experts, renormalised over the top-k where the model does so, e.g. Mixtral or
                norm_topk_prob); f_j(x) = down_j(act(gate_j x) * up_j x), the expert's own output.
                The mean runs over the routed tokens only; an expert no token reaches scores 0.

Both are statistic states of the engine's pass (engine.blocks): one per expert, fed the hidden states of the
tokens routed to that expert (engine.moe.routed_hook). REAP recomputes the router on those tokens to read g_j.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .. import distributed
from ..engine.moe import ExpertMatrix
from ..statistic_state import StatisticState

EXPERT_SCORES = ("frequency", "reap")


class TokenCount:
    """A statistic state that only counts the tokens it is given (score: the routing frequency)."""

    def __init__(self):
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        self.n += x.reshape(-1, x.shape[-1]).shape[0]

    @property
    def score(self) -> float:
        return float(self.n)

    def all_reduce(self) -> None:
        self.n = int(distributed.total(self.n))


def expert_output(experts: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """f_e(x) of a fused experts module, without the gate weight. x: (t, H) -> (t, H)."""
    gate, up = nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)  # (t, I) each
    return nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[e])


def gate_weight(router: nn.Module, x: torch.Tensor, e: int) -> torch.Tensor:
    """g_e(x): the top-k weight the router gives expert e on each token (0 where e is not in its top-k). (t,)"""
    _, weights, index = router(x)                                                 # (t, k), (t, k)
    return (weights.float() * (index == e)).sum(dim=-1)


class ReapScore:
    """Streaming REAP saliency of one expert: Σ g_e(x)·‖f_e(x)‖₂ and the routed-token count, in float64."""

    def __init__(self, matrix: ExpertMatrix, router: nn.Module):
        self.experts, self.expert, self.router = matrix.module, matrix.expert, router
        self.total = torch.zeros((), dtype=torch.float64)
        self.n = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])                                                # (t, H)
        norm = expert_output(self.experts, self.expert, x).float().norm(dim=-1)       # (t,)
        self.total += (gate_weight(self.router, x, self.expert) * norm).sum().double().cpu()
        self.n += x.shape[0]

    @property
    def score(self) -> float:
        return float(self.total) / self.n if self.n else 0.0

    def all_reduce(self) -> None:
        self.total = torch.tensor(distributed.total(float(self.total)), dtype=torch.float64)
        self.n = int(distributed.total(self.n))


def expert_score_state(kind: str, routers: dict[int, nn.Module]) -> Callable[[str, ExpertMatrix], StatisticState]:
    """states(name, matrix) for engine.blocks: the chosen score's state of one expert; routers maps
    id(experts module) -> the router of its layer."""
    if kind == "frequency":
        return lambda name, matrix: TokenCount()
    if kind == "reap":
        return lambda name, matrix: ReapScore(matrix, routers[id(matrix.module)])
    raise ValueError(f"expert score must be one of {EXPERT_SCORES}, got {kind!r}")
