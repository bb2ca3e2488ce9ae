"""The step pipeline: reach the target in method.options.steps steps, each one statistics pass over the current
model, then scoring (candidates.py), choosing (selection.py) and slicing (removal.py):

    uniform ratios: each block is pruned inside the pass (the next block sees pruned outputs)
    global ranking: a statistics-only pass; all blocks' scores are ranked together, then every block is sliced
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from tqdm.auto import tqdm

from ..moments import Moments
from .budget import Ledger
from .candidates import Scorer
from .methods import StructuredMethod
from .observation import Domains, observe
from .removal import Remover
from .selection import Candidates, aligned, global_removal, uniform_removal

log = logging.getLogger(__name__)


@dataclass
class Steps:
    """What one structured run works with: the budget (ledger), the scorer, the remover and the pass settings."""
    ledger: Ledger
    scorer: Scorer
    remover: Remover
    device: object
    domains: Domains
    batch_size: int = 1

    def step_uniform(self, ids, keep_frac: float, desc: str, last: bool) -> None:
        """Uniform ratios: each block is pruned to keep_frac of its dense measure inside the pass."""
        for blk in observe(self.ledger, ids, self.device, self.domains, "pruned", desc, self.batch_size):
            cands = self.scorer.candidates(blk.index, blk.states)
            removed = aligned(self.ledger, cands, uniform_removal(self.ledger, blk.index, cands, keep_frac), last)
            self.remover.apply(blk.index, removed, blk.states, self.scorer.expert_order.get(blk.index))

    def step_global(self, ids, keep_frac: float, desc: str, last: bool) -> None:
        """Global ranking: statistics of the unpruned model, one ranking across blocks, then every block sliced."""
        all_cands: list[Candidates] = []
        all_moments: dict[int, dict[str, Moments]] = {}
        for blk in observe(self.ledger, ids, self.device, self.domains, "dense", desc, self.batch_size):
            all_cands.extend(self.scorer.candidates(blk.index, blk.states))
            all_moments[blk.index] = blk.states
        removed = global_removal(self.ledger, all_cands, keep_frac)
        for i in range(len(self.ledger.layouts)):
            cands = [c for c in all_cands if c.layer == i]
            chosen = aligned(self.ledger, cands, {c.kind: removed[(i, c.kind)] for c in cands}, last)
            self.remover.apply(i, chosen, all_moments[i], self.scorer.expert_order.get(i))

    def achieved(self) -> float:
        """The sparsity reached so far (of what `sparsity` counts)."""
        ledger = self.ledger
        return 1 - sum(ledger.measure(i) for i in range(len(ledger.layouts))) / ledger.dense_total


def run_steps(name: str, method: StructuredMethod, steps: Steps, ids, sparsity: float) -> list[dict]:
    """Reach the target in method.options.steps steps (statistics re-measured each step); one record per step."""
    options = method.options
    step = steps.step_uniform if options.ratios == "uniform" else steps.step_global
    k, records = options.steps, []
    for t in (tqdm(range(1, k + 1), desc=f"{name} steps") if k > 1 else range(1, k + 1)):
        ts = time.time()
        keep = method.kept_fraction(sparsity, t)
        if sparsity > 0:
            step(ids, keep, f"{name} {t}/{k}", t == k)
        achieved = steps.achieved()
        records.append({"step": t, "target_kept": keep, "achieved_sparsity": achieved, "seconds": time.time() - ts})
        log.info("%s step %d/%d: kept target %.4f, achieved sparsity %.4f", name, t, k, keep, achieved)
    if sparsity > 0 and abs(records[-1]["achieved_sparsity"] - sparsity) > 0.02:
        m = options.channel_multiple
        rounding = f"; channel_multiple {m} rounds MLP widths" if m > 1 else ""
        log.warning("%s reached sparsity %.3f for a target of %.3f: whole KV groups are coarse units (enable "
                    "prune_channels or use global ratios to fill the gap)%s", name,
                    records[-1]["achieved_sparsity"], sparsity, rounding)
    return records
