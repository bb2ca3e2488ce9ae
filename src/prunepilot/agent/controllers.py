"""Controllers: given an Observation, propose how much more to prune which layers.

Every controller implements ``propose(obs, errors) -> str | dict`` (raw, untrusted output; `errors`
lists why its previous answers this iteration were rejected; empty: a new decision) and may expose
``last_usage`` (prompt_chars, prompt_tokens, completion_tokens of its last answer). GuardedController
validates the output (validate.parse_decision), re-asks, and falls back to the built-in policy with a
logged warning:

- BuiltinPolicy    deterministic, no network (the default), a pure function of the observation.
- OpenAIController any OpenAI-compatible /chat/completions endpoint through the official openai client:
                   one wall-clock deadline per decision, structured output (response_format json_schema
                   from the validator's pydantic model), secrets redacted (openai_controller.py).
- HFController     a local Hugging Face chat model, JSON-schema-constrained decoding (hf_controller.py).

Unreachable endpoint (after its retries): one warning, then the built-in policy for the rest of the run;
with ``strict`` a PrunepilotError instead.
"""
from __future__ import annotations

import logging
import math
import re
import time

from ..errors import PrunepilotError
from ..stats import zscore_list
from .config import AgentConfig, PolicyConfig
from .decision import MAX_EXTRA, MIN_EXTRA, Decision, Observation
from .granularity import BlockView
from .hf_controller import HFController
from .openai_controller import OpenAIController
from .transport import BadRequest, ControllerUnavailable, DeadlineExceeded
from .validate import DecisionError, parse_decision

log = logging.getLogger(__name__)

__all__ = ["BadRequest", "BuiltinPolicy", "ControllerUnavailable", "DeadlineExceeded", "GuardedController",
           "HFController", "OpenAIController", "layer_type", "make_controller"]


# ------------------------------------------------------------------------------------------ builtin

def layer_type(name: str) -> str:
    """'model.layers.3.mlp.down_proj' -> 'model.layers.*.mlp.down_proj'."""
    return re.sub(r"\.\d+\.", ".*.", name, count=1)


class BuiltinPolicy:
    """Deterministic policy on the same profile an LLM sees (pure function of the observation).

    Step size: aim for a global sparsity gain of `step`, halved after every rollback, grown after
    "excellent" steps (up to grow x step), capped so that the perplexity rise predicted from the last
    accepted step (relative rise per unit of sparsity) stays below safety x threshold; the last step
    takes the whole remainder when what would be left is tiny; never past the target.

    Allocation: sensitivity_i = weight_s * z(log s_i) + weight_g * z(log g_i), z-scored across all
    layers (default "global_log"; "global" uses the profile's z of the raw values, which a handful of
    heavy-tailed layers dominate; "type" compares each layer only with the same projection in other
    blocks). Layer i gets extra_i = c * (1 - tilt * tanh(sensitivity_i)) clipped to [0.01, 0.15], c
    solved by bisection so the weighted gain equals the step: low z_s / low z_g layers are pruned
    harder, by at most (1 + tilt) / (1 - tilt) times the rate of the most sensitive ones, and the tilt
    is halved for each rollback in a row (a failed concentrated step is retried spread out). Because
    s is taken over the weights still alive, a layer's s rises as it is pruned, which balances the
    allocation over the iterations.

    On SmolLM2-135M (bench/agent_compare.py) "global_log" with tilt 0.5 beat uniform Wanda; tilt 0
    (iterative uniform Wanda) did not, so the gain comes from the allocation, not from iterating.
    """
    name = "builtin"

    def __init__(self, cfg: PolicyConfig | None = None, max_layer_sparsity: float = 0.9, tolerance: float = 0.001):
        self.cfg = cfg or PolicyConfig()
        self.max_layer = max_layer_sparsity
        self.tol = tolerance

    def step_size(self, obs: Observation) -> tuple[float, str]:
        c = self.cfg
        step, why = c.step, "base step"
        for fb in obs.history:
            if not fb.accepted and fb.label.startswith("poor"):
                step, why = step * c.backoff, "backed off after a rollback"
            elif fb.label == "excellent":
                step, why = min(c.step * c.grow, step * c.grow), "grown after an excellent step"
        step = max(step, c.min_step)
        last = next((h for h in reversed(obs.history) if h.accepted and h.gain > 1e-6), None)
        if last is not None and last.ppl_change > 0:
            rate = last.ppl_change / last.gain             # relative ppl rise per unit of sparsity
            cap = c.safety * obs.rollback_threshold / rate
            if cap < step:
                step, why = max(cap, c.min_step), f"capped by last rise rate {rate:.2f}/unit"
        return step, why

    def sensitivity(self, rows: list[dict]) -> list[float]:
        c = self.cfg
        if c.normalize == "global":  # the profile's own z-scores
            return [c.weight_s * r["z_s"] + c.weight_g * r["z_g"] for r in rows]
        # z-scores of log s and log g (heavy-tailed, so log), across all layers or within each layer type
        groups: dict[str, list[int]] = {}
        for k, r in enumerate(rows):
            groups.setdefault(layer_type(r["layer"]) if c.normalize == "type" else "", []).append(k)
        out = [0.0] * len(rows)
        for idx in groups.values():
            for key, w in (("s", c.weight_s), ("g", c.weight_g)):
                vals = [math.log(max(rows[k][key], 1e-30)) for k in idx]
                if w and len(idx) > 1:
                    for k, z in zip(idx, zscore_list(vals)):
                        out[k] += w * z
        return out

    def tilt(self, obs: Observation) -> float:
        """The configured tilt, halved (backoff) for every rollback in a row at the end of the history:
        a concentrated step that failed is retried spread more evenly."""
        t = self.cfg.tilt
        for fb in reversed(obs.history):
            if fb.accepted or not fb.label.startswith("poor"):
                break
            t *= self.cfg.backoff
        return t

    def propose(self, obs: Observation, errors: list[str] | None = None) -> dict:
        remaining = obs.target_sparsity - obs.current_sparsity
        rows = [r for r in obs.rows if r["sparsity"] < self.max_layer - 1e-9 and r["alive"] > 0]
        if remaining <= self.tol or not rows:
            why = "target reached" if remaining <= self.tol else "every layer is at the sparsity cap"
            return {"reasoning": why, "stop_pruning": True, "layer_decisions": []}
        step, why = self.step_size(obs)
        gain = min(step, remaining)
        if remaining - gain < self.cfg.min_step and remaining <= 1.5 * step:
            gain, why = remaining, why + "; finishing"  # no tiny last step
        tilt = self.tilt(obs)
        weights = [1.0 - tilt * math.tanh(s) for s in self.sensitivity(rows)]
        need = gain * sum(r["numel"] for r in obs.rows)       # weights to remove this step

        def removed(c: float) -> float:
            return sum(r["alive"] * min(MAX_EXTRA, max(MIN_EXTRA, c * w)) for r, w in zip(rows, weights))

        lo, hi = 0.0, MAX_EXTRA / min(weights)
        for _ in range(60):  # bisection: removed(c) is non-decreasing in c
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if removed(mid) < need else (lo, mid)
        extras = [round(min(MAX_EXTRA, max(MIN_EXTRA, hi * w)), 4) for w in weights]
        order = sorted(range(len(rows)), key=lambda k: -extras[k])
        most = ", ".join(f"{rows[k]['layer']} {extras[k]:.3f}" for k in order[:3])
        least = ", ".join(f"{rows[k]['layer']} {extras[k]:.3f}" for k in order[-3:])
        reasoning = (f"aim for +{gain:.4f} global sparsity ({why}); {len(rows)} layers, extra "
                     f"{min(extras):.3f}-{max(extras):.3f}; hardest: {most}; gentlest: {least}")
        return {"reasoning": reasoning, "stop_pruning": False,
                "layer_decisions": [{"layer": r["layer"], "extra_sparsity": e} for r, e in zip(rows, extras)]}


# ------------------------------------------------------------------------------------------- guard

class GuardedController:
    """Validate, re-ask on invalid output, fall back to the built-in policy; never raises unless strict.
    Every Decision it returns carries `stats`: controller_s, replies, prompt_chars, prompt/completion tokens."""

    def __init__(self, primary, fallback: BuiltinPolicy, invalid_retries: int = 2, strict: bool = False,
                 granularity: str = "linear", allow_early_stop: bool = False):
        self.primary, self.fallback = primary, fallback
        self.allow_early_stop = allow_early_stop  # a stop before the target ends the run (else: the policy goes on)
        self.invalid_retries, self.strict = invalid_retries, strict
        self.by_block = granularity == "block"  # the primary sees and names blocks (granularity.BlockView)
        self.disabled: str | None = None  # reason the primary is no longer asked
        self.name = getattr(primary, "name", type(primary).__name__)

    def _fallback(self, obs: Observation, warning: str) -> Decision:
        d = parse_decision(self.fallback.propose(obs), obs.layer_names, source="builtin-fallback")
        d.warnings.append(warning)
        return d

    def decide(self, obs: Observation) -> Decision:
        t0, stats = time.perf_counter(), {"replies": 0, "prompt_chars": 0}
        if isinstance(self.primary, BuiltinPolicy):
            d = parse_decision(self.primary.propose(obs), obs.layer_names, source="builtin")
        elif self.disabled:
            d = self._fallback(obs, self.disabled)
        else:
            d = self._ask(obs, stats)
        short = obs.target_sparsity - obs.current_sparsity > self.fallback.tol
        if d.stop_pruning and short and not self.allow_early_stop:
            d = self._fallback(obs, f"controller '{self.name}' asked to stop at sparsity {obs.current_sparsity:.4f}, "
                                    f"short of the target {obs.target_sparsity:.4f}: the built-in policy decided "
                                    "this step (allow_short lets a controller end a run early)")
            log.warning("%s", d.warnings[-1])
        d.stats = {**stats, "controller_s": round(time.perf_counter() - t0, 3)}
        return d

    def _count(self, stats: dict) -> None:
        """Add the primary's usage of its last answer to this decision's stats."""
        stats["replies"] += 1
        usage = getattr(self.primary, "last_usage", None) or {}
        for key, value in usage.items():
            if isinstance(value, int):
                stats[key] = stats.get(key, 0) + value

    def _ask(self, obs: Observation, stats: dict) -> Decision:
        if not self.by_block:
            return self._ask_view(obs, obs, stats)
        view = BlockView(obs.layer_names)
        d = self._ask_view(obs, view.observe(obs), stats)
        return d if d.source.endswith("fallback") else view.expand(d)

    def _ask_view(self, obs: Observation, shown: Observation, stats: dict) -> Decision:
        """Ask the primary about `shown` (obs itself, or its block view); the fallback decides on obs."""
        errors: list[str] = []
        for attempt in range(self.invalid_retries + 1):
            try:
                if hasattr(self.primary, "last_usage"):
                    self.primary.last_usage = {}
                try:
                    raw = self.primary.propose(shown, errors)
                finally:
                    self._count(stats)
                return parse_decision(raw, shown.layer_names, source=self.name)
            except ControllerUnavailable as e:
                return self._unavailable(obs, e)
            except DecisionError as e:
                errors.append(str(e))
                if isinstance(e, DeadlineExceeded):
                    break
            except Exception as e:  # a buggy controller must not take the run down
                errors.append(f"controller raised {type(e).__name__}: {e}")
            log.info("controller '%s' answer %d rejected: %s", self.name, attempt + 1, errors[-1])
        msg = (f"agent controller '{self.name}' gave no valid decision in {len(errors)} attempt(s) "
               f"(last: {errors[-1]})")
        if self.strict:
            raise PrunepilotError(msg)
        log.warning("%s; using the built-in policy for this iteration", msg)
        return self._fallback(obs, msg)

    def _unavailable(self, obs: Observation, e: ControllerUnavailable) -> Decision:
        msg = f"agent controller '{self.name}' unavailable: {e}"
        if self.strict:
            raise PrunepilotError(msg) from None
        log.warning("%s; using the built-in policy for the rest of this run "
                    "(--strict-controller makes this an error)", msg)
        self.disabled = msg
        return self._fallback(obs, msg)


def make_controller(config: AgentConfig, device: str = "cpu", primary=None) -> GuardedController:
    """The configured controller wrapped in validation + fallback. `primary` overrides it (tests)."""
    fallback = BuiltinPolicy(config.policy, config.max_layer_sparsity, config.target_tolerance)
    c = config.controller
    if primary is None:
        if c.kind == "plan":
            raise PrunepilotError("controller kind 'plan' is built by the agent loop from the model (run_agent)")
        primary = {"builtin": lambda: fallback,
                   "openai": lambda: OpenAIController(c),
                   "hf": lambda: HFController(c, device)}[c.kind]()
    return GuardedController(primary, fallback, c.invalid_retries, c.strict, c.granularity, config.allow_short)
