"""The agent loop: profile -> controller decision -> checkpoint -> prune -> measure -> accept or roll back.

    s, g   = profile of the current model (Wanda percentile per linear; gradients every k accepted steps)
    while global sparsity < target and iterations left:
        decision = controller(observation)              # validated; built-in fallback
        checkpoint the chosen linears' weights (CPU copies)
        one sequential pass: prune extra_i of layer i's remaining weights (Wanda, row-wise), refresh s
        ppl = held-out perplexity (tail of the calibration sources, never used for calibration)
        if ppl > (1 + threshold) * ppl of the last accepted step: restore the checkpoint (rolled back)
        append the iteration to out_dir/journal.jsonl (fsync)

Granularity: one "layer" is one prunable linear (model.layers.3.mlp.down_proj), not a block: the
sensitivities of q/k/v/o/gate/up/down inside one block differ by orders of magnitude, and a per-linear
profile lets a controller spare a fragile down_proj while pruning its block's q_proj harder.

Resume: the journal holds, for every iteration, the exact extras applied. A resumed run reloads the
starting model, checks its fingerprint and the calibration data against the header, replays the
accepted iterations in order (the same deterministic passes), and continues with the same history,
perplexities and gradients read back from the journal, so it ends at the same masks as an
uninterrupted run.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import distributed
from ..data import calibration_split, check_token_ids
from ..engine import ModelAdapter, keeps_placement, resolve_device, weight_2d
from ..errors import PrunepilotError
from ..eval.perplexity import perplexity_sequential
from ..fingerprint import mask_fingerprint, model_fingerprint
from ..allocation import owl
from ..evo_allocation import evo_targets
from ..methods.wanda import Wanda
from ..search import EvoOptions
from ..io import atomic_write_text
from ..recipe import AllocationConfig
from ..unstructured import owl_outlier_ratios
from ..engine.model_config import check_within_context
from .config import AgentConfig
from .controllers import make_controller
from .decision import Observation
from .journal import IterationRecord, Journal, JournalHeader
from .pacing import Budget, Step, pace_gain, plan_step
from .plan_controller import PlanController, block_plan, uniform_plan
from .replay import check_header, data_hash, replay, warn_changed_settings
from .profile import Profile, gradient_importance, prune_and_profile, zero_counts
from .report import build_report, save_model, write_report

log = logging.getLogger(__name__)

PHASES = ("decide", "prune_profile", "held_ppl", "gradients", "mask_hash")  # an iteration's timed parts


@dataclass
class AgentResult:
    out_dir: Path
    stop_reason: str              # target_reached | controller_stop | max_iterations
    iterations: int
    accepted: int
    rollbacks: int
    global_sparsity: float
    baseline_ppl: float           # held-out perplexity before the run
    final_ppl: float              # held-out perplexity of the final (last accepted) state
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    wall_s: float = 0.0
    target_reached: bool = True   # global sparsity >= target - target_tolerance


def _accepted(change: float, threshold: float) -> bool:
    return math.isfinite(change) and change <= threshold  # a NaN / inf perplexity is never accepted


def _within_total(ppl: float, baseline: float, cap: float | None) -> bool:
    """The optional cap on the total degradation: ppl at most (1 + cap) x the dense baseline."""
    return cap is None or (math.isfinite(ppl) and ppl <= (1 + cap) * baseline)


def _label(change: float, threshold: float, gain: float, within_total: bool = True) -> str:
    if not _accepted(change, threshold) or not within_total:
        return "poor-rolled-back"
    if gain <= 0:
        return "no-op"
    return "excellent" if change <= threshold / 4 else "good"


class AgentRun:
    """One agent run: the model, its calibration / held-out data, the controller, the journal and the state of
    the loop (profile s, gradients g, accepted perplexity, records). `run()` drives it; every step is a method."""

    def __init__(self, model, tokenizer, cfg: AgentConfig, out_dir: Path, controller=None,
                 calibration: torch.Tensor | None = None, held_out: torch.Tensor | None = None):
        self.model, self.tokenizer, self.cfg, self.out_dir = model, tokenizer, cfg, out_dir
        self.device = resolve_device(distributed.local_device(cfg.device))  # torchrun + CUDA: this rank's GPU
        self.adapter = ModelAdapter(model, cfg.include, cfg.ignore)
        self.coverage = self.adapter.coverage()  # a block weight no method handles stops here, unless excluded
        self.linears = self.adapter.all_linears()
        if not self.linears:
            raise PrunepilotError("no linear layer matches the include/ignore patterns")
        self.names = list(self.linears)
        self.journal = Journal(out_dir / "journal.jsonl")
        self.calib, self.held, self.calib_summary = self._data(calibration, held_out)
        # torchrun: rank 0 asks the controller and broadcasts its decision; every rank writes nothing but rank 0
        if controller is None and cfg.controller.kind == "plan":
            controller = self.plan_controller()
        self.guard = make_controller(cfg, str(self.device), controller) if distributed.is_main() else None
        self.records: list[IterationRecord] = []
        self.header: JournalHeader | None = None
        self.s: dict[str, float] = {}
        self.grad: dict[str, float] = {}
        self.ppl_acc = math.nan
        self.since_grad = 0
        self.counts: tuple[dict[str, int], dict[str, int]] = ({}, {})  # (numel, zeros) of the current model
        self.phases: dict[str, float] = {}  # wall seconds per phase of the iteration under way

    # ------------------------------------------------------------------------------------ data and measures

    def _data(self, calibration, held_out) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Given token ids, or calibration windows and a held-out tail drawn from the configured sources."""
        if calibration is not None:
            calibration = check_token_ids(calibration)
        if held_out is not None:
            held_out = check_token_ids(held_out, "held-out", dims=1)
        if calibration is not None and held_out is not None:
            return calibration, held_out, {}
        if self.tokenizer is None:
            raise PrunepilotError("the agent needs a tokenizer (or calibration/held-out token ids)")
        c, cfg = self.cfg.calibration, self.cfg
        check_within_context(self.model, c.seqlen, "calibration seqlen")
        check_within_context(self.model, cfg.eval_seqlen, "held-out perplexity window (eval_seqlen)")
        cal = calibration_split(self.tokenizer, c.sources, c.n_samples, c.seqlen, cfg.seed,
                                held_out_windows=max(1, cfg.eval_tokens // cfg.eval_seqlen),
                                held_out_seqlen=cfg.eval_seqlen)
        return cal.ids, cal.held_out, cal.summary

    def plan_controller(self) -> PlanController:
        """The fixed plan of controller kind "plan": every linear's final sparsity (OWL: one statistics pass)."""
        cfg = self.cfg
        if cfg.controller.plan == "uniform":
            return PlanController(uniform_plan(self.names, cfg.target_sparsity), "uniform")
        if cfg.controller.plan == "evo":
            return PlanController(self.evo_plan(), "evo")
        defaults = AllocationConfig()
        ratios = owl_outlier_ratios(self.adapter, self.calib, self.device, defaults.owl_m,
                                    cfg.calibration.batch_size)
        return PlanController(block_plan(self.names, owl(ratios, cfg.target_sparsity, defaults.owl_lambda)), "owl")

    def evo_plan(self) -> dict[str, float]:
        """The evolutionary search's allocation (Wanda levels, KL to the dense model on the held-out tokens)."""
        opts = EvoOptions(log=str(self.out_dir / "evo_search.jsonl"))
        windows = self.held.numel() // opts.seqlen
        if windows < 1:
            raise PrunepilotError(f"controller plan evo needs at least {opts.seqlen} held-out tokens (eval_tokens)")
        held = self.held[: windows * opts.seqlen].view(windows, opts.seqlen)
        plan, _ = evo_targets(self.model, self.adapter, Wanda(), self.calib, held, self.cfg.target_sparsity, opts,
                              self.cfg.seed, self.device, self.cfg.calibration.batch_size)
        return plan

    @contextlib.contextmanager
    def timed(self, phase: str):
        """Add the wall time of the block to this iteration's `phase` (recorded in the journal)."""
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

    def held_ppl(self) -> float:  # one block on the device at a time, like the pruning passes
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

    # ------------------------------------------------------------------------------------ start / resume

    def start(self) -> None:
        """A fresh run: profile and measure the starting model, write the journal header."""
        if distributed.is_main():
            atomic_write_text(self.out_dir / "agent.yaml", self.cfg.to_yaml())
        self.s = self.profile({}, desc="profile")
        baseline = self.held_ppl()
        self.grad = self.gradients()
        self.header = JournalHeader(model_fingerprint(self.model), data_hash(self.calib, self.held),
                                    self.cfg.replay_key(), self.names, self.cfg.target_sparsity, baseline,
                                    int(self.held.numel()), self.calib_summary, self.grad,
                                    time.strftime("%Y-%m-%dT%H:%M:%S"))
        if distributed.is_main():
            self.journal.write_header(self.header)
        self.ppl_acc = baseline
        self.counts = zero_counts(self.adapter)
        log.info("agent: %d prunable linears, held-out ppl %.3f (%d tokens), target sparsity %.3f",
                 len(self.names), baseline, self.held.numel(), self.cfg.target_sparsity)

    def resume(self) -> None:
        """Continue a journaled run: check it belongs to this model and data, replay its accepted steps."""
        if distributed.is_main():
            self.journal.drop_partial_tail()
        # torchrun: rank 0's reading, on every rank (other nodes need not see the folder)
        self.header, self.records = distributed.broadcast(self.journal.read() if distributed.is_main() else None)
        check_header(self.header, self.cfg, model_fingerprint(self.model), data_hash(self.calib, self.held),
                     self.names, self.journal.path)
        if distributed.is_main():  # a refused resume leaves the saved settings alone
            warn_changed_settings(self.out_dir / "agent.yaml", self.cfg)
            atomic_write_text(self.out_dir / "agent.yaml", self.cfg.to_yaml())
        self.grad = self.header.grad
        s = replay(self, self.records)
        self.s = s if s is not None else self.profile({}, desc="profile")
        accepted = [r for r in self.records if r.accepted]
        self.ppl_acc = accepted[-1].ppl_after if accepted else self.header.baseline_ppl
        self.counts = zero_counts(self.adapter)
        log.info("resumed %s: %d iterations replayed", self.journal.path, len(self.records))

    # ------------------------------------------------------------------------------------ one iteration

    def stop_reason(self) -> str | None:
        if any(r.stopped for r in self.records):
            return "controller_stop"
        numel, zeros = self.counts
        if sum(zeros.values()) / sum(numel.values()) >= self.cfg.target_sparsity - self.cfg.target_tolerance:
            return "target_reached"
        if len(self.records) >= self.cfg.max_iterations:
            return "max_iterations"
        return None

    def observe(self, numel: dict[str, int], zeros: dict[str, int]) -> Observation:
        cfg, history = self.cfg, [r.feedback() for r in self.records]
        current = sum(zeros.values()) / sum(numel.values())
        need = (pace_gain(cfg.target_sparsity - current, cfg.max_iterations - len(self.records), cfg.pace_reserve)
                if cfg.pace else 0.0)
        return Observation(len(self.records), cfg.max_iterations, cfg.target_sparsity, current,
                           Profile(self.names, numel, zeros, self.s, self.grad).rows(), self.ppl_acc,
                           self.header.baseline_ppl, cfg.rollback_threshold, history[-1] if history else None,
                           history, cfg.max_layer_sparsity, cfg.max_total_ppl_rise, need)

    def iterate(self) -> IterationRecord:
        """Ask the controller, try its step, keep it or roll it back; the record of what happened."""
        t0 = time.time()
        self.phases = dict.fromkeys(PHASES, 0.0)
        numel, zeros = self.counts
        obs = self.observe(numel, zeros)
        with self.timed("decide"):
            decision = distributed.broadcast(self.guard.decide(obs) if distributed.is_main() else None)
        st = decision.stats
        base = dict(iteration=obs.iteration, source=decision.source, decision=decision.to_dict(),
                    warnings=decision.warnings, sparsity_before=obs.current_sparsity, ppl_before=self.ppl_acc,
                    controller_s=st.get("controller_s", 0.0), replies=st.get("replies", 0),
                    prompt_chars=st.get("prompt_chars", 0), prompt_tokens=st.get("prompt_tokens"),
                    completion_tokens=st.get("completion_tokens"))
        if decision.stop_pruning:
            rec = IterationRecord(**base, accepted=False, applied={}, scale=1.0, gain=0.0, ppl_after=self.ppl_acc,
                                  ppl_change=0.0, label="stop", sparsity_after=obs.current_sparsity,
                                  zeros_after=sum(zeros.values()), stopped=True)
        else:
            rec = self.try_step(base, self.plan(decision.extras(), obs, numel, zeros), numel, zeros)
        rec.mask_hash = self.masks()  # after a rollback: the restored masks
        rec.seconds = round(time.time() - t0, 2)
        rec.phases = {k: round(v, 3) for k, v in self.phases.items()}
        return rec

    def plan(self, extras: dict[str, float], obs: Observation, numel: dict[str, int],
             zeros: dict[str, int]) -> Step:
        """The decision's extras clipped, paced to the gain still needed per iteration, never past the target."""
        cfg, need = self.cfg, obs.pace_gain
        step = plan_step(extras, Budget(numel, zeros, cfg.target_sparsity, cfg.max_layer_sparsity,
                                        cfg.max_step_extra), need)
        if step.scale > 1 or step.spread_layers:
            log.info("paced the decision to +%.4f global sparsity: x%.2f on its %d layers%s", need, step.scale,
                     len(step.applied) - len(step.spread_layers),
                     f", +{step.spread:.3f} on {len(step.spread_layers)} others" if step.spread_layers else "")
        return step

    def try_step(self, base: dict, step: Step, numel: dict[str, int], zeros: dict[str, int]) -> IterationRecord:
        """Prune `step.applied`, measure; accept (refresh s, maybe gradients) or restore the checkpointed weights."""
        applied = step.applied
        total, before = sum(numel.values()), sum(zeros.values())
        current = before / total
        checkpoint = {n: weight_2d(self.linears[n]).detach().to("cpu", copy=True) for n in applied}
        new_s = self.profile(applied)
        ppl = self.held_ppl()
        counts_try = zero_counts(self.adapter)  # the one count of this iteration
        zeros_try = sum(counts_try[1].values())
        gain, change = zeros_try / total - current, ppl / self.ppl_acc - 1
        step_ok = _accepted(change, self.cfg.rollback_threshold)
        total_ok = _within_total(ppl, self.header.baseline_ppl, self.cfg.max_total_ppl_rise)
        ok = step_ok and total_ok
        if ok:
            self.s, self.ppl_acc, self.counts = new_s, ppl, counts_try
            self.since_grad += 1
        else:
            with torch.no_grad():
                for n, w in checkpoint.items():
                    weight_2d(self.linears[n]).copy_(w)
        rec = IterationRecord(**base, accepted=ok, applied=applied, scale=step.scale, gain=gain, ppl_after=ppl,
                              ppl_change=change, label=_label(change, self.cfg.rollback_threshold, gain, total_ok),
                              sparsity_after=(zeros_try if ok else before) / total,
                              zeros_after=zeros_try if ok else before,
                              rollback_reason="" if ok else ("step" if not step_ok else "total"),
                              pace_gain=round(step.need, 6), spread=round(step.spread, 6),
                              spread_layers=len(step.spread_layers))
        cfg = self.cfg
        if ok and cfg.grad_refresh_every and self.since_grad >= cfg.grad_refresh_every and cfg.grad_samples:
            self.grad = rec.grad = self.gradients()
            self.since_grad = 0
        return rec

    # ------------------------------------------------------------------------------------ the run

    def run(self, resume: bool) -> AgentResult:
        t_start = time.time()
        if resume and distributed.broadcast(self.journal.exists()):  # rank 0's folder decides
            self.resume()
        else:
            self.start()
        bar = tqdm(total=self.cfg.max_iterations, initial=min(len(self.records), self.cfg.max_iterations),
                   desc="agent")
        while (stop_reason := self.stop_reason()) is None:
            rec = self.iterate()
            if distributed.is_main():
                self.journal.append(rec)
            self.records.append(rec)
            log.info("iter %d [%s, %.1fs] %d layers: sparsity %.4f -> %.4f, ppl %.3f -> %.3f (%+.1f%%) %s",
                     rec.iteration, rec.source, rec.controller_s, len(rec.applied), rec.sparsity_before,
                     rec.sparsity_before + rec.gain, rec.ppl_before, rec.ppl_after, 100 * rec.ppl_change, rec.label)
            bar.update(1)
        bar.close()
        return self.finish(stop_reason, t_start)

    def finish(self, stop_reason: str, t_start: float) -> AgentResult:
        numel, zeros = self.counts
        report = build_report(self.cfg, self.header, self.records, numel, zeros, stop_reason, time.time() - t_start)
        report["coverage"] = self.coverage.to_dict()
        report["distributed"] = distributed.summary(self.calib.shape[0])
        if distributed.is_main():  # every rank holds the same pruned model
            write_report(report, self.out_dir)
            if self.cfg.save_model:
                save_model(self.model, self.tokenizer, self.out_dir / "model")
        log.info("agent stopped (%s) after %d iterations: sparsity %.4f, held-out ppl %.3f -> %.3f",
                 stop_reason, len(self.records), report["global_sparsity"], self.header.baseline_ppl,
                 report["final_ppl"])
        return AgentResult(self.out_dir, stop_reason, len(self.records), report["accepted"], report["rollbacks"],
                           report["global_sparsity"], self.header.baseline_ppl, report["final_ppl"],
                           {n: zeros[n] / numel[n] for n in self.names}, report, time.time() - t_start,
                           report["target_reached"])


@keeps_placement
def run_agent(model, tokenizer, config: AgentConfig | dict, out_dir: str | Path, *, controller=None,
              resume: bool = False, calibration: torch.Tensor | None = None,
              held_out: torch.Tensor | None = None) -> AgentResult:
    """Prune `model` in place to config.target_sparsity, guided by a controller; write journal, report,
    plot and (config.save_model) the model into out_dir.

    controller: optional object with propose(obs, errors) (overrides config.controller; tests).
    resume: continue from out_dir/journal.jsonl (the model must be the same starting model).
    calibration / held_out: optional (n, seqlen) and (n_tokens,) token ids instead of config sources.
    """
    cfg = config if isinstance(config, AgentConfig) else AgentConfig.from_dict(config)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise PrunepilotError(f"output path {out_dir} exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    journal = Journal(out_dir / "journal.jsonl")
    if journal.exists() and not resume:
        raise PrunepilotError(f"{journal.path} already exists: pass --resume to continue that run, "
                              "or choose another output folder")
    if resume and journal.exists() and not journal.has_header():  # killed while writing the first line
        distributed.barrier()  # torchrun: every rank has seen the journal before rank 0 removes it
        if distributed.is_main():
            log.warning("%s holds no complete header: starting the run afresh", journal.path)
            journal.path.unlink()
        resume = False
    distributed.barrier()  # every rank has checked the folder before rank 0 writes into it
    model.eval()
    run = AgentRun(model, tokenizer, cfg, out_dir, controller, calibration, held_out)
    return run.run(resume)
