"""The typed options of the structured methods: what the recipe's `structured:` section states.

    StructuredOptions   what every structured method takes (what `sparsity` counts, ratios, which units ...)
    OneShotOptions      wanda_sp, flap: one calibration pass, so `steps` can only be 1
    IterativeOptions    flap_iterative: `steps` re-measured steps following a `schedule`

registry.py names each method's model and the defaults it brings (wanda_sp: uniform ratios, no bias compensation;
flap_iterative: fused domain statistics); the method object carries the validated options (method.options).
The recipe validates its `structured:` section against IterativeOptions, the widest model, so that a typo fails
when the recipe is read; the method's own model then refuses what that method does not take.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ..errors import PrunepilotError
from ..schema import Strict


class StructuredOptions(Strict):
    """Options every structured method takes."""
    target: Literal["params", "channels"] = "params"   # sparsity counts removed block parameters
    ratios: Literal["global", "uniform"] = "global"     # FLAP global ranking or per-layer uniform ratios
    prune_heads: bool = True
    prune_channels: bool = True
    bias_compensation: bool = True
    channel_multiple: int = Field(1, ge=1)              # MLP widths kept at a multiple of this (GPU kernels: 64/128)
    remove_experts: float = Field(0.0, ge=0.0, lt=1.0)  # MoE: fraction of each layer's experts removed first
    # how remove_experts ranks a layer's experts (lowest removed): routed calibration tokens, or REAP's mean over
    # the routed tokens of gate weight x ‖expert output‖₂ (structured/expert_scores.py)
    expert_score: Literal["frequency", "reap"] = "frequency"
    # per-channel input statistics over several calibration domains: "pooled" = one running mean/variance of
    # all tokens; "fused" = per-domain moments, mean Σ w_k μ_k and variance Σ w_k σ²_k (w_k: source weights)
    domain_stats: Literal["fused", "pooled"] = "pooled"

    @property
    def kinds(self) -> tuple[str, ...]:
        """The module types pruned: ("mlp", "attn") minus what prune_channels / prune_heads switch off."""
        kinds = tuple(k for k, on in (("mlp", self.prune_channels), ("attn", self.prune_heads)) if on)
        if not kinds:
            raise PrunepilotError("structured pruning with prune_heads and prune_channels both off removes nothing")
        return kinds


class OneShotOptions(StructuredOptions):
    """A method that measures the dense model once (wanda_sp, flap)."""
    steps: int = Field(1, ge=1)

    @field_validator("steps")
    @classmethod
    def _one_step(cls, v: int) -> int:
        if v > 1:
            raise ValueError(f"this method prunes in one step, not {v} (--steps / structured.steps applies to the "
                             "iterative methods: `prunepilot methods`)")
        return v


class IterativeOptions(StructuredOptions):
    """A method that reaches the target in `steps` steps, re-measuring statistics before each (flap_iterative).

    schedule "geometric": after step t of k the model keeps (1 - s)^(t/k) of the dense measure (each step removes
    the same fraction of what is left); "linear": it keeps 1 - s·t/k.
    """
    steps: int = Field(5, ge=1)
    schedule: Literal["geometric", "linear"] = "geometric"
