"""Mixture-of-experts blocks whose experts are stored as fused 3-D parameters (transformers' Qwen3-MoE, Mixtral,
OLMoE ...), pruned without unfusing the model.

    experts.gate_up_proj  (E, 2I, H)   rows [0, I) = gate, [I, 2I) = up of expert e: one (2I, H) matrix per expert
    experts.down_proj     (E, H, I)
    experts(hidden (T, H), top_k_index (T, k), top_k_weights (T, k)): token t goes to the experts in top_k_index[t]

Each expert's matrix is an ExpertMatrix: `.weight` is the (out, in) view of its slice, so masks written into it
land in the fused parameter. Its statistics come from the tokens the router actually sends to it: a forward hook
on the experts module reads the routing and feeds, per expert, the routed hidden states (gate_up input) and
act(gate) * up recomputed from them (down input). Experts that see too few calibration tokens are reported and
pruned from their weights alone (unstructured.py).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


MATRICES = ("gate_up_proj", "down_proj")


class ExpertMatrix:
    """One expert's matrix inside a fused 3-D expert parameter: weight = parameter[expert], an (out, in) view."""

    def __init__(self, module: nn.Module, attr: str, expert: int):
        self.module, self.attr, self.expert = module, attr, expert

    @property
    def parameter(self) -> nn.Parameter:
        return getattr(self.module, self.attr)

    @property
    def weight(self) -> torch.Tensor:
        return self.parameter[self.expert]

    @property
    def grad(self) -> torch.Tensor | None:
        g = self.parameter.grad
        return None if g is None else g[self.expert]

    @property
    def in_features(self) -> int:
        return self.parameter.shape[2]

    @property
    def out_features(self) -> int:
        return self.parameter.shape[1]


def fused_experts(module: nn.Module) -> bool:
    """True for a module that keeps its experts as 3-D gate_up_proj / down_proj parameters."""
    return all(isinstance(getattr(module, a, None), nn.Parameter) and getattr(module, a).dim() == 3 for a in MATRICES)


def layout_problem(module: nn.Module) -> str | None:
    """None for the layout the hooks and masks assume: concatenated [gate; up] (E, 2I, H), down (E, H, I), no
    biases, no post-expert norm, an act_fn; else what differs (gpt-oss interleaves gate/up and has biases)."""
    flags = {"is_concatenated": True, "is_transposed": False, "has_bias": False, "has_gate": True,
             "has_post_expert_norm": False}
    odd = [f"{k}={getattr(module, k)}" for k, v in flags.items() if getattr(module, k, v) != v]
    e, two_i, h = module.gate_up_proj.shape
    if module.down_proj.shape != (e, h, two_i // 2):
        odd.append(f"down_proj {tuple(module.down_proj.shape)}")
    if not hasattr(module, "act_fn"):
        odd.append("no act_fn")
    return ", ".join(odd) or None


def expert_matrices(module: nn.Module, prefix: str) -> dict[str, ExpertMatrix]:
    """{f"{prefix}.{e}.gate_up_proj": ..., f"{prefix}.{e}.down_proj": ...} for every expert e."""
    return {f"{prefix}.{e}.{attr}": ExpertMatrix(module, attr, e)
            for e in range(module.gate_up_proj.shape[0]) for attr in MATRICES}


def routed_hook(module: nn.Module, members: dict[str, ExpertMatrix], fn: Callable[[str, torch.Tensor], None]):
    """A forward hook for an experts module: fn(name, x) with the routed inputs of each member matrix."""
    by_expert: dict[int, dict[str, str]] = {}
    for name, m in members.items():
        by_expert.setdefault(m.expert, {})[m.attr] = name

    @torch.no_grad()
    def hook(mod, args, kwargs, out):
        hidden = args[0] if args else kwargs["hidden_states"]                          # (T, H)
        index = args[1] if len(args) > 1 else kwargs["top_k_index"]                     # (T, k)
        for e, names in by_expert.items():
            tokens = (index == e).any(dim=-1).nonzero().flatten()
            if tokens.numel() == 0:  # not routed to in this batch
                continue
            x = hidden[tokens].detach()                                                 # (t_e, H)
            if "gate_up_proj" in names:
                fn(names["gate_up_proj"], x)
            if "down_proj" in names:
                gate, up = nn.functional.linear(x, mod.gate_up_proj[e]).chunk(2, dim=-1)
                fn(names["down_proj"], mod.act_fn(gate) * up)                           # (t_e, I)
    return module.register_forward_hook(hook, with_kwargs=True)
