"""The controller's view at block granularity: one row per decoder block instead of one per linear.

An LLM that can name only a few layers per reply (a small local model with a short answer budget) moves a
model with hundreds of linears by a fraction of a percent per iteration when every name is one linear. With
``controller.granularity: block`` it sees one row per block (``model.layers.3``: weights and zeros summed,
z_s / z_g = the block's weight-weighted mean of its linears' z-scores, z-scored again across blocks) and its
decision on a block applies the same extra sparsity to every prunable linear of that block. The loop, the
journal and the rollback rule stay per linear; only what the controller reads and writes changes.
"""
from __future__ import annotations

import re
from dataclasses import replace

from ..stats import zscore_list
from .decision import Decision, Feedback, LayerDecision, Observation

_BLOCK = re.compile(r"^(.*?\.\d+)\.")


def block_of(name: str) -> str:
    """'model.layers.3.mlp.experts.5.up_proj' -> 'model.layers.3' (the name up to its first index);
    a name without an index is its own block."""
    m = _BLOCK.match(name)
    return m.group(1) if m else name


def _weighted_mean(pairs: list[tuple[float, int]]) -> float:
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else 0.0


class BlockView:
    """Translates an Observation to block rows and a block-level Decision back to linears."""

    def __init__(self, linear_names):
        self.members: dict[str, list[str]] = {}
        for name in linear_names:
            self.members.setdefault(block_of(name), []).append(name)

    def rows(self, rows: list[dict]) -> list[dict]:
        by_block: dict[str, list[dict]] = {}
        for r in rows:
            by_block.setdefault(block_of(r["layer"]), []).append(r)
        blocks = sorted(by_block)
        raw_s = [_weighted_mean([(r["z_s"], r["numel"]) for r in by_block[b]]) for b in blocks]
        raw_g = [_weighted_mean([(r["z_g"], r["numel"]) for r in by_block[b]]) for b in blocks]
        out = []
        for b, zs, zg in zip(blocks, zscore_list(raw_s), zscore_list(raw_g)):
            numel = sum(r["numel"] for r in by_block[b])
            alive = sum(r["alive"] for r in by_block[b])
            out.append({"layer": b, "numel": numel, "alive": alive, "sparsity": 1 - alive / numel if numel else 0.0,
                        "s": _weighted_mean([(r["s"], r["numel"]) for r in by_block[b]]),
                        "g": _weighted_mean([(r["g"], r["numel"]) for r in by_block[b]]), "z_s": zs, "z_g": zg})
        return sorted(out, key=lambda r: (r["z_s"], r["layer"]))

    def feedback(self, fb: Feedback) -> Feedback:
        """A past step as the controller chose it: the mean extra applied to each block's linears."""
        applied: dict[str, list[float]] = {}
        for name, extra in fb.applied.items():
            applied.setdefault(block_of(name), []).append(extra)
        return replace(fb, applied={b: sum(v) / len(v) for b, v in applied.items()}, n_layers=len(applied))

    def observe(self, obs: Observation) -> Observation:
        last = self.feedback(obs.last) if obs.last else None
        return replace(obs, rows=self.rows(obs.rows), last=last, history=[self.feedback(h) for h in obs.history])

    def expand(self, decision: Decision) -> Decision:
        """Every linear of a chosen block gets the block's extra sparsity."""
        per_linear = [LayerDecision(name, d.extra_sparsity) for d in decision.layer_decisions
                      for name in self.members.get(d.layer, [])]
        return replace(decision, layer_decisions=per_linear)
