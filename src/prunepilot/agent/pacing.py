"""From a controller's decision to the extras the loop applies: clipped, paced, never past the target.

A controller decides *where* to prune and the ratios between layers; the loop decides how far this iteration goes:

    need    = remaining global gain / usable iterations left,  usable = max(1, floor(left * (1 - reserve)))
    applied = c * extra_i, clipped to each layer's room (max_step_extra this step, max_layer_sparsity in all),
              c >= 1 solved so the step removes need * total weights (pacing up), or c <= 1 so it does not pass
              the target (scaling down);
    spread  = when the named layers at their room still fall short, the rest goes to every other layer
              that has room, the same extra on each (the controller's layers stay as it chose them).

`reserve` keeps a share of the iterations for retries after rollbacks; on the last iteration the whole remainder is
due. So a timid controller (2 blocks at +0.02 per reply) still ends at the target within max_iterations whenever
the rollback guard accepts the steps; a bold one is only scaled down. The journal keeps the decision as asked
and the extras as applied, with the factor c and the spread.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Budget:
    """The model's state and the run's limits that bound one step."""
    numel: dict[str, int]
    zeros: dict[str, int]
    target: float                 # global sparsity
    max_layer: float              # no linear beyond this sparsity
    max_step_extra: float = 1.0   # no linear loses more than this fraction of its remaining weights in one step

    def alive(self, name: str) -> int:
        return self.numel[name] - self.zeros[name]

    def room(self, name: str) -> float:
        """The largest extra (fraction of the remaining weights) `name` may take this step."""
        alive = self.alive(name)
        if alive <= 0:
            return 0.0
        return max(0.0, min(self.max_step_extra, (self.max_layer * self.numel[name] - self.zeros[name]) / alive))

    def to_target(self) -> float:
        """Weights still to remove to reach the target."""
        return max(0.0, self.target * sum(self.numel.values()) - sum(self.zeros.values()))


@dataclass
class Step:
    applied: dict[str, float]     # extra per linear, what the pass prunes and a replay re-applies
    scale: float                  # the factor c on the controller's extras (1: as asked)
    need: float                   # global gain the pace asked for this iteration (0: no pacing)
    spread: float = 0.0           # extra given to every layer the controller did not name (pacing only)
    spread_layers: list[str] = field(default_factory=list)


def pace_gain(remaining: float, iterations_left: int, reserve: float) -> float:
    """Global gain due this iteration to reach the target with `reserve` of the iterations left to spare."""
    usable = max(1, math.floor(iterations_left * (1 - reserve)))
    return max(0.0, remaining) / usable


def _removed(extras: dict[str, float], budget: Budget, c: float) -> float:
    return sum(budget.alive(n) * min(budget.room(n), c * e) for n, e in extras.items())


def _solve(extras: dict[str, float], budget: Budget, want: float, hi: float) -> float:
    """The c in [0, hi] for which c * extras (clipped to room) removes `want` weights (bisection: monotone in c)."""
    lo = 0.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _removed(extras, budget, mid) < want else (lo, mid)
    return hi


def plan_step(extras: dict[str, float], budget: Budget, need: float = 0.0) -> Step:
    """The extras to apply: clipped to each layer's room, paced up to `need` global gain (0: no pacing),
    never past the target."""
    asked = {n: e for n, e in extras.items() if e > 0 and budget.room(n) > 0}
    total = sum(budget.numel.values())
    goal = min(need * total, budget.to_target()) if need > 0 else 0.0
    ceiling = budget.to_target()
    as_asked = _removed(asked, budget, 1.0)
    if as_asked > ceiling > 0:  # past the target: scale down
        c = _solve(asked, budget, ceiling, 1.0)
    elif as_asked < goal and asked:  # short of the pace: scale up while the named layers have room
        top = max(budget.room(n) / e for n, e in asked.items())
        c = max(1.0, _solve(asked, budget, goal, top))
    else:
        c = 1.0
    applied = {n: min(budget.room(n), c * e) for n, e in asked.items()}
    applied = {n: e for n, e in applied.items() if e > 0}
    step = Step(applied, c, need)
    short = goal - _removed(asked, budget, c)
    if short > 1e-6 * total:
        _spread(step, budget, short)
    return step


def _spread(step: Step, budget: Budget, short: float) -> None:
    """Give `short` weights to the layers the controller did not name: the same extra u on each (clipped)."""
    others = {n: 1.0 for n in budget.numel if n not in step.applied and budget.room(n) > 0}
    if not others:
        return
    u = _solve(others, budget, short, 1.0)
    for n in others:
        e = min(budget.room(n), u)
        if e > 0:
            step.applied[n] = e
            step.spread_layers.append(n)
    step.spread = u
