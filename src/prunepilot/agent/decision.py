"""What a controller sees (Observation) and what it must return (Decision)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

MIN_EXTRA, MAX_EXTRA = 0.01, 0.15  # bounds of one layer's extra sparsity per iteration


@dataclass
class Feedback:
    """How one past decision turned out."""
    iteration: int
    gain: float               # global sparsity gain the step made (attempted gain when rolled back)
    ppl_before: float
    ppl_after: float
    ppl_change: float         # relative: ppl_after / ppl_before - 1
    label: str                # excellent | good | poor-rolled-back | no-op
    accepted: bool
    reasoning: str = ""
    source: str = ""          # controller that produced the decision (builtin, openai, builtin-fallback ...)
    n_layers: int = 0
    applied: dict[str, float] = field(default_factory=dict)  # extra sparsity applied per layer
    rollback_reason: str = ""  # "step" (rise over the last accepted step) | "total" (over the baseline cap)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Observation:
    iteration: int
    max_iterations: int
    target_sparsity: float
    current_sparsity: float
    rows: list[dict]          # Profile.rows(): sorted by z_s ascending
    current_ppl: float        # held-out ppl of the last accepted state
    baseline_ppl: float       # held-out ppl before the run
    rollback_threshold: float
    last: Feedback | None = None
    history: list[Feedback] = field(default_factory=list)
    max_layer_sparsity: float = 1.0  # no layer is pruned beyond this
    max_total_ppl_rise: float | None = None  # a step is also rolled back above (1 + this) x baseline_ppl
    pace_gain: float = 0.0    # global gain the loop scales this step to (pacing.py); 0: steps applied as asked

    @property
    def layer_names(self) -> list[str]:
        return [r["layer"] for r in self.rows]


@dataclass
class LayerDecision:
    layer: str
    extra_sparsity: float


@dataclass
class Decision:
    reasoning: str
    stop_pruning: bool
    layer_decisions: list[LayerDecision]
    source: str = ""
    warnings: list[str] = field(default_factory=list)
    # how the decision was obtained: controller_s (wall time), replies (answers asked of the controller),
    # prompt_chars, prompt_tokens / completion_tokens (when the server reports usage)
    stats: dict = field(default_factory=dict)

    def extras(self) -> dict[str, float]:
        return {d.layer: d.extra_sparsity for d in self.layer_decisions}

    def to_dict(self) -> dict:
        return {"reasoning": self.reasoning, "stop_pruning": self.stop_pruning,
                "layer_decisions": [asdict(d) for d in self.layer_decisions]}
