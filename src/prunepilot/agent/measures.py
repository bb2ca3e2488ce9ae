"""What the agent loop measures on the current model, each timed into the phases of the iteration under way
(recorded in its journal record, so bench scripts read them there):

    prune_profile  one sequential pass: prune the extras, refresh the Wanda percentile s of every linear
    held_ppl       held-out perplexity (one block on the device at a time, like the pruning passes)
    gradients      mean |dL/dW| per linear (when refreshed)
    mask_hash      fingerprint of every linear's zero mask
    decide         the controller's decision (timed by the loop, through `timed`)
"""
from __future__ import annotations

import contextlib
import time

import torch

from ..engine import ModelAdapter, weight_2d
from ..eval.perplexity import perplexity_sequential
from ..fingerprint import mask_fingerprint
from .config import AgentConfig
from .profile import gradient_importance, prune_and_profile, zero_counts

PHASES = ("decide", "prune_profile", "held_ppl", "gradients", "mask_hash")  # an iteration's timed parts


class Measures:
    """The measurements of one run's model on its calibration ids and held-out tail, on `device`."""

    def __init__(self, model, adapter: ModelAdapter, cfg: AgentConfig, calib: torch.Tensor, held: torch.Tensor,
                 device):
        self.model, self.adapter, self.cfg, self.device = model, adapter, cfg, device
        self.calib, self.held = calib, held
        self.linears = adapter.all_linears()
        self.phases: dict[str, float] = {}  # wall seconds per phase of the iteration under way

    def new_iteration(self) -> None:
        self.phases = dict.fromkeys(PHASES, 0.0)

    def phase_seconds(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.phases.items()}

    @contextlib.contextmanager
    def timed(self, phase: str):
        """Add the wall time of the block to this iteration's `phase`."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phases[phase] = self.phases.get(phase, 0.0) + time.perf_counter() - t0

    def profile(self, extras: dict[str, float], desc: str = "agent pass") -> dict[str, float]:
        """Prune `extras` of the named linears (one pass) and return the refreshed Wanda percentile s."""
        with self.timed("prune_profile"):
            return prune_and_profile(self.adapter, self.calib, self.device, extras, self.cfg.profile_percentile,
                                     desc=desc, batch_size=self.cfg.calibration.batch_size)

    def held_ppl(self) -> float:
        with self.timed("held_ppl"):
            return perplexity_sequential(self.model, self.held, self.cfg.eval_seqlen, self.device,
                                         desc="held-out ppl")["ppl"]

    def gradients(self) -> dict[str, float]:
        if self.cfg.grad_samples == 0:
            return {}
        with self.timed("gradients"):
            return gradient_importance(self.model, self.adapter, self.calib[: self.cfg.grad_samples],
                                       self.device, self.cfg.grad_mode)

    def masks(self) -> str:
        with self.timed("mask_hash"):
            return mask_fingerprint({n: weight_2d(lin) for n, lin in self.linears.items()})

    def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """(numel, zeros) of every linear: the loop counts once per iteration and passes the counts along."""
        return zero_counts(self.adapter)
