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
uninterrupted run (replay.py).

The loop's parts elsewhere: inputs.py (calibration and held-out ids), measures.py (the timed passes, whose phase
times go into each journal record), plans.py (the allocations of controller kind "plan"), pacing.py (step sizes),
report.py (report and saved model).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import distributed
from ..engine import ModelAdapter, keeps_placement, resolve_device, weight_2d
from ..errors import PrunepilotError
from ..fingerprint import model_fingerprint
from ..io import atomic_write_text
from .config import AgentConfig
from .controllers import make_controller
from .decision import Observation
from .inputs import agent_inputs
from .journal import IterationRecord, Journal, JournalHeader
from .measures import Measures
from .pacing import Budget, Step, pace_gain, plan_step
from .plans import plan_controller
from .profile import Profile
from .replay import data_hash, replay, resumable_journal
from .report import build_report, save_model, write_report

log = logging.getLogger(__name__)


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
    """One agent run: the model, the controller, the journal and the state of the loop (profile s, gradients g,
    accepted perplexity, zero counts, records); what it measures and times is `measure`. `run()` drives it."""

    def __init__(self, model, tokenizer, cfg: AgentConfig, out_dir: Path, controller=None,
                 calibration: torch.Tensor | None = None, held_out: torch.Tensor | None = None):
        self.model, self.tokenizer, self.cfg, self.out_dir = model, tokenizer, cfg, out_dir
        device = resolve_device(distributed.local_device(cfg.device))  # torchrun + CUDA: this rank's GPU
        self.adapter = ModelAdapter(model, cfg.include, cfg.ignore)
        self.coverage = self.adapter.coverage()  # a block weight no method handles stops here, unless excluded
        self.linears = self.adapter.all_linears()
        if not self.linears:
            raise PrunepilotError("no linear layer matches the include/ignore patterns")
        self.names = list(self.linears)
        self.journal = Journal(out_dir / "journal.jsonl")
        calib, held, self.calib_summary = agent_inputs(model, tokenizer, cfg, calibration, held_out)
        self.measure = Measures(model, self.adapter, cfg, calib, held, device)
        if controller is None and cfg.controller.kind == "plan":
            controller = plan_controller(model, self.adapter, cfg, calib, held, device, out_dir)
        # torchrun: rank 0 asks the controller and broadcasts its decision; every rank writes nothing but rank 0
        self.guard = make_controller(cfg, str(device), controller) if distributed.is_main() else None
        self.records: list[IterationRecord] = []
        self.header: JournalHeader | None = None
        self.s: dict[str, float] = {}
        self.grad: dict[str, float] = {}
        self.ppl_acc = math.nan
        self.since_grad = 0
        self.counts: tuple[dict[str, int], dict[str, int]] = ({}, {})  # (numel, zeros) of the current model

    # ------------------------------------------------------------------------------------ start / resume

    def start(self) -> None:
        """A fresh run: profile and measure the starting model, write the journal header."""
        m = self.measure
        if distributed.is_main():
            atomic_write_text(self.out_dir / "agent.yaml", self.cfg.to_yaml())
        self.s = m.profile({}, desc="profile")
        baseline = m.held_ppl()
        self.grad = m.gradients()
        self.header = JournalHeader(model_fingerprint(self.model), data_hash(m.calib, m.held),
                                    self.cfg.replay_key(), self.names, self.cfg.target_sparsity, baseline,
                                    int(m.held.numel()), self.calib_summary, self.grad,
                                    time.strftime("%Y-%m-%dT%H:%M:%S"))
        if distributed.is_main():
            self.journal.write_header(self.header)
        self.ppl_acc = baseline
        self.counts = m.counts()
        log.info("agent: %d prunable linears, held-out ppl %.3f (%d tokens), target sparsity %.3f",
                 len(self.names), baseline, m.held.numel(), self.cfg.target_sparsity)

    def resume(self) -> None:
        """Continue a journaled run: check it belongs to this model and data, replay its accepted steps."""
        m = self.measure
        self.header, self.records = resumable_journal(self.journal, self.cfg, model_fingerprint(self.model),
                                                      data_hash(m.calib, m.held), self.names,
                                                      self.out_dir / "agent.yaml")
        s, self.grad, self.since_grad = replay(m, self.records, self.header.grad, self.journal.path)
        self.s = s if s is not None else m.profile({}, desc="profile")
        accepted = [r for r in self.records if r.accepted]
        self.ppl_acc = accepted[-1].ppl_after if accepted else self.header.baseline_ppl
        self.counts = m.counts()
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
        self.measure.new_iteration()
        numel, zeros = self.counts
        obs = self.observe(numel, zeros)
        with self.measure.timed("decide"):
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
        rec.mask_hash = self.measure.masks()  # after a rollback: the restored masks
        rec.seconds = round(time.time() - t0, 2)
        rec.phases = self.measure.phase_seconds()
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
        new_s = self.measure.profile(applied)
        ppl = self.measure.held_ppl()
        counts_try = self.measure.counts()  # the one count of this iteration
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
            self.grad = rec.grad = self.measure.gradients()
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
        report["distributed"] = distributed.summary(self.measure.calib.shape[0])
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
