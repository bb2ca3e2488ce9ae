"""A fixed allocation as a controller: uniform, OWL or a searched plan, run through the same loop as the LLM.

A plan gives every prunable linear its final sparsity p_i (the parameter-weighted mean is the target). Each
iteration the controller asks for extra_i proportional to what linear i still has to lose of its remaining
weights, r_i = (p_i - s_i) / (1 - s_i), scaled so the largest is MAX_EXTRA; the loop's pacing sets the size of
the step. So with pacing every linear approaches its plan at the same relative speed, and the plan is reached
when the target is, through the same rollback rule, journal and report as every other controller: the table
of bench/agent_paper.py compares allocations, not loops.

Plans (``controller.plan``):
    uniform   p_i = target
    owl       OWL's per-block sparsities (outlier ratios of the dense model's Wanda scores), each linear its block's
    evo       the evolutionary search's per-linear sparsities (search.py: KL to the dense model on held-out tokens)
"""
from __future__ import annotations

from .decision import MAX_EXTRA, MIN_EXTRA, Observation
from .granularity import block_of


class PlanController:
    name = "plan"

    def __init__(self, plan: dict[str, float], label: str):
        self.plan, self.label = plan, label
        self.name = f"plan-{label}"

    def propose(self, obs: Observation, errors: list[str] | None = None) -> dict:
        left = {r["layer"]: (self.plan[r["layer"]] - r["sparsity"]) / max(1e-12, 1 - r["sparsity"])
                for r in obs.rows if r["layer"] in self.plan}
        top = max(left.values(), default=0.0)
        if top <= 0:
            return {"reasoning": f"{self.label} plan reached", "stop_pruning": True, "layer_decisions": []}
        extras = {n: MAX_EXTRA * r / top for n, r in left.items() if MAX_EXTRA * r / top >= MIN_EXTRA}
        return {"reasoning": f"{self.label} plan: {len(extras)} linears still below their planned sparsity",
                "stop_pruning": False,
                "layer_decisions": [{"layer": n, "extra_sparsity": round(e, 6)} for n, e in extras.items()]}


def uniform_plan(names: list[str], target: float) -> dict[str, float]:
    return dict.fromkeys(names, target)


def block_plan(names: list[str], block_sparsity: list[float]) -> dict[str, float]:
    """Each linear gets the sparsity of its decoder block (block k = the k-th distinct block in `names`)."""
    order = list(dict.fromkeys(block_of(n) for n in names))
    return {n: block_sparsity[order.index(block_of(n))] for n in names}
