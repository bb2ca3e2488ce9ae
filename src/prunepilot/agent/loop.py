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

import hashlib
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..api import resolve_device
from ..data import TextSource, check_token_ids, load_documents, split_counts, tokenize_stream
from ..engine import ModelAdapter, capture_block_inputs, keeps_placement, weight_2d
from ..errors import PrunepilotError
from ..eval.perplexity import perplexity_sequential
from ..io import atomic_write_text
from .config import AgentConfig
from .controllers import make_controller
from .decision import Feedback, Observation
from .journal import VERSION, Journal, mask_fingerprint, model_fingerprint
from .profile import Profile, gradient_importance, prune_and_profile, zero_counts

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


# --------------------------------------------------------------------------------------------- data

def calibration_and_heldout(tokenizer, sources: list[str], n_samples: int, seqlen: int, seed: int,
                            eval_tokens: int, eval_seqlen: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Seeded (n_samples, seqlen) calibration windows and a disjoint held-out token stream.

    Each source's documents are joined and tokenized once (as data.calibration_blocks does); the last
    `share x eval_seqlen` tokens of every source are held out, and calibration windows are drawn only
    from what comes before. Returns (calibration ids, held-out ids (n_held,), summary).
    """
    if tokenizer is None:
        raise PrunepilotError("the agent needs a tokenizer (or calibration/held-out token ids)")
    srcs = [TextSource.parse(s) for s in sources]
    counts = split_counts([s.weight for s in srcs], n_samples)
    n_windows = max(1, eval_tokens // eval_seqlen)
    held_windows = split_counts([s.weight for s in srcs], n_windows)
    rng = random.Random(seed)
    blocks, held, summary = [], [], {}
    for src, count, hw in zip(srcs, counts, held_windows):
        stream = tokenize_stream(tokenizer, load_documents(src), max_chars=20_000_000)
        n_held = hw * eval_seqlen
        head = stream[: stream.numel() - n_held]
        if head.numel() <= seqlen:
            raise PrunepilotError(f"calibration source {src} has {stream.numel()} tokens: not enough for "
                                  f"{n_held} held-out tokens plus windows of {seqlen}")
        held.append(stream[stream.numel() - n_held:])
        for _ in range(count):
            i = rng.randint(0, head.numel() - seqlen - 1)
            blocks.append(head[i:i + seqlen])
        summary[src.domain] = {"samples": count, "held_out_tokens": n_held, "tokens_available": int(stream.numel()),
                               "source": str(src)}
    order = list(range(len(blocks)))
    rng.shuffle(order)
    return torch.stack([blocks[i] for i in order]), torch.cat(held), summary


def _data_hash(calib: torch.Tensor, held: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in (calib, held):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------- loop

def plan_extras(extras: dict[str, float], numel: dict[str, int], zeros: dict[str, int], target: float,
                max_layer: float) -> tuple[dict[str, float], float]:
    """Clip each layer to max_layer sparsity, then scale all extras down so the step does not overshoot
    the global target. Returns (applied extras, scale factor)."""
    applied = {}
    for name, e in extras.items():
        alive = numel[name] - zeros[name]
        if alive <= 0:
            continue
        e = min(e, (max_layer * numel[name] - zeros[name]) / alive)
        if e > 0:
            applied[name] = e
    projected = sum(e * (numel[n] - zeros[n]) for n, e in applied.items())
    need = target * sum(numel.values()) - sum(zeros.values())
    scale = 1.0
    if projected > need > 0:
        scale = need / projected
        applied = {n: e * scale for n, e in applied.items()}
    return applied, scale


def _feedback(rec: dict) -> Feedback:
    return Feedback(rec["iteration"], rec["gain"], rec["ppl_before"], rec["ppl_after"], rec["ppl_change"],
                    rec["label"], rec["accepted"], rec["decision"].get("reasoning", ""), rec.get("source", ""),
                    len(rec.get("applied", {})))


def _accepted(change: float, threshold: float) -> bool:
    return math.isfinite(change) and change <= threshold  # a NaN / inf perplexity is never accepted


def _label(change: float, threshold: float, gain: float) -> str:
    if not _accepted(change, threshold):
        return "poor-rolled-back"
    if gain <= 0:
        return "no-op"
    return "excellent" if change <= threshold / 4 else "good"


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
    from .report import build_report, write_report

    cfg = config if isinstance(config, AgentConfig) else AgentConfig.from_dict(config)
    t_start = time.time()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise PrunepilotError(f"output path {out_dir} exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    adapter = ModelAdapter(model, cfg.include, cfg.ignore)
    linears = adapter.all_linears()
    if not linears:
        raise PrunepilotError("no linear layer matches the include/ignore patterns")
    names = list(linears)
    journal = Journal(out_dir / "journal.jsonl")
    if journal.exists() and not resume:
        raise PrunepilotError(f"{journal.path} already exists: pass --resume to continue that run, "
                              "or choose another output folder")
    if resume and journal.exists() and not journal.has_header():  # killed while writing the first line
        log.warning("%s holds no complete header: starting the run afresh", journal.path)
        journal.path.unlink()
    model.eval()

    calib_summary: dict = {}
    if calibration is not None:
        calibration = check_token_ids(calibration)
    if held_out is not None:
        held_out = check_token_ids(held_out, "held-out", dims=1)
    if calibration is None or held_out is None:
        c = cfg.calibration
        calibration, held_out, calib_summary = calibration_and_heldout(
            tokenizer, c.sources, c.n_samples, c.seqlen, cfg.seed, cfg.eval_tokens, cfg.eval_seqlen)
    data_hash = _data_hash(calibration, held_out)
    guard = make_controller(cfg, str(device), controller)

    def fresh_inputs():
        return capture_block_inputs(model, adapter, calibration, device, cfg.calibration.batch_size)

    def held_ppl() -> float:  # one block on the device at a time, like the pruning passes
        return perplexity_sequential(model, held_out, cfg.eval_seqlen, device, desc="held-out ppl")["ppl"]

    def gradients() -> dict[str, float]:
        if cfg.grad_samples == 0:
            return {}
        return gradient_importance(model, adapter, calibration[: cfg.grad_samples], device, cfg.grad_mode)

    q = cfg.profile_percentile
    fingerprint = model_fingerprint(adapter)
    records: list[dict] = []
    if resume and journal.exists():
        journal.drop_partial_tail()
        header, records = journal.read()
        _check_header(header, cfg, fingerprint, data_hash, names, journal.path)
        _warn_changed_settings(out_dir / "agent.yaml", cfg)
        atomic_write_text(out_dir / "agent.yaml", cfg.to_yaml())
        baseline, grad = header["baseline_ppl"], header["grad"]
        s = None
        for rec in tqdm(records, desc="replaying journal", leave=False):
            if rec["accepted"]:  # even a step that applied nothing refreshed the profile
                s = prune_and_profile(adapter, fresh_inputs(), device, rec["applied"], q, desc="replay")
                same = (mask_fingerprint(adapter) == rec["mask_hash"] if "mask_hash" in rec
                        else sum(zero_counts(adapter)[1].values()) == rec["zeros_after"])
                if not same:
                    raise PrunepilotError(f"replaying {journal.path} iteration {rec['iteration']} gave different "
                                          "masks: the starting model, the data or the environment changed")
            grad = rec.get("grad", grad)
        if s is None:
            s = prune_and_profile(adapter, fresh_inputs(), device, {}, q, desc="profile")
        log.info("resumed %s: %d iterations replayed", journal.path, len(records))
    else:
        atomic_write_text(out_dir / "agent.yaml", cfg.to_yaml())
        s = prune_and_profile(adapter, fresh_inputs(), device, {}, q, desc="profile")
        baseline = held_ppl()
        grad = gradients()
        header = {"type": "header", "version": VERSION, "fingerprint": fingerprint, "data_hash": data_hash,
                  "replay_key": cfg.replay_key(), "layers": names, "target_sparsity": cfg.target_sparsity,
                  "baseline_ppl": baseline, "held_out_tokens": int(held_out.numel()),
                  "calibration": calib_summary, "grad": grad, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        journal.append(header)
        log.info("agent: %d prunable linears, held-out ppl %.3f (%d tokens), target sparsity %.3f",
                 len(names), baseline, held_out.numel(), cfg.target_sparsity)

    accepted = [r for r in records if r["accepted"]]
    ppl_acc = accepted[-1]["ppl_after"] if accepted else baseline
    since_grad = 0
    for r in records:
        since_grad = 0 if "grad" in r else since_grad + int(r["accepted"])
    stop_reason = "controller_stop" if any(r.get("stopped") for r in records) else None
    it = len(records)
    bar = tqdm(total=cfg.max_iterations, initial=min(it, cfg.max_iterations), desc="agent")
    while stop_reason is None:
        numel, zeros = zero_counts(adapter)
        total = sum(numel.values())
        current = sum(zeros.values()) / total
        if current >= cfg.target_sparsity - cfg.target_tolerance:
            stop_reason = "target_reached"
            break
        if it >= cfg.max_iterations:
            stop_reason = "max_iterations"
            break
        t0 = time.time()
        history = [_feedback(r) for r in records]
        obs = Observation(it, cfg.max_iterations, cfg.target_sparsity, current,
                          Profile(names, numel, zeros, s, grad).rows(), ppl_acc, baseline, cfg.rollback_threshold,
                          history[-1] if history else None, history, cfg.max_layer_sparsity)
        decision = guard.decide(obs)
        rec = {"type": "iteration", "iteration": it, "source": decision.source, "decision": decision.to_dict(),
               "warnings": decision.warnings, "sparsity_before": current, "ppl_before": ppl_acc}
        if decision.stop_pruning:
            rec.update(stopped=True, accepted=False, applied={}, scale=1.0, gain=0.0, ppl_after=ppl_acc,
                       ppl_change=0.0, label="stop", sparsity_after=current, zeros_after=sum(zeros.values()))
            stop_reason = "controller_stop"
        else:
            applied, scale = plan_extras(decision.extras(), numel, zeros, cfg.target_sparsity, cfg.max_layer_sparsity)
            checkpoint = {n: weight_2d(linears[n]).detach().to("cpu", copy=True) for n in applied}
            new_s = prune_and_profile(adapter, fresh_inputs(), device, applied, q)
            ppl = held_ppl()
            zeros_try = sum(zero_counts(adapter)[1].values())
            gain = zeros_try / total - current
            change = ppl / ppl_acc - 1
            label = _label(change, cfg.rollback_threshold, gain)
            ok = _accepted(change, cfg.rollback_threshold)
            if ok:
                s, ppl_acc = new_s, ppl
                since_grad += 1
            else:
                with torch.no_grad():
                    for n, w in checkpoint.items():
                        weight_2d(linears[n]).copy_(w)
            rec.update(accepted=ok, applied=applied, scale=scale, gain=gain, ppl_after=ppl, ppl_change=change,
                       label=label, sparsity_after=(zeros_try if ok else sum(zeros.values())) / total,
                       zeros_after=zeros_try if ok else sum(zeros.values()))
            if ok and cfg.grad_refresh_every and since_grad >= cfg.grad_refresh_every and cfg.grad_samples:
                grad = rec["grad"] = gradients()
                since_grad = 0
        rec["mask_hash"] = mask_fingerprint(adapter)  # after a rollback: the restored masks
        rec["seconds"] = round(time.time() - t0, 2)
        journal.append(rec)
        records.append(rec)
        log.info("iter %d [%s] %d layers: sparsity %.4f -> %.4f, ppl %.3f -> %.3f (%+.1f%%) %s",
                 it, decision.source, len(rec["applied"]), current, current + rec["gain"], rec["ppl_before"],
                 rec["ppl_after"], 100 * rec["ppl_change"], rec["label"])
        bar.update(1)
        it += 1
    bar.close()

    numel, zeros = zero_counts(adapter)
    report = build_report(cfg, header, records, numel, zeros, stop_reason, time.time() - t_start)
    write_report(report, out_dir)
    if cfg.save_model:
        from .report import save_model

        save_model(model, tokenizer, out_dir / "model")
    log.info("agent stopped (%s) after %d iterations: sparsity %.4f, held-out ppl %.3f -> %.3f",
             stop_reason, len(records), report["global_sparsity"], baseline, report["final_ppl"])
    return AgentResult(out_dir, stop_reason, len(records), report["accepted"], report["rollbacks"],
                       report["global_sparsity"], baseline, report["final_ppl"],
                       {n: zeros[n] / numel[n] for n in names}, report, time.time() - t_start)


def _warn_changed_settings(saved_path: Path, cfg: AgentConfig) -> None:
    """Settings outside the replay key may change on resume (e.g. a higher target), but then the run is no
    longer the one an uninterrupted run would have made: say so."""
    if not saved_path.is_file():
        return
    old = AgentConfig.from_yaml(saved_path).model_dump(mode="json")
    new = cfg.model_dump(mode="json")

    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    old_f = dict(flat(old))
    changed = [f"{k}: {old_f.get(k)!r} -> {v!r}" for k, v in flat(new) if old_f.get(k) != v]
    if changed:
        log.warning("resuming with changed settings (%s); the result differs from an uninterrupted run with the "
                    "saved ones", "; ".join(changed))


def _check_header(header: dict, cfg: AgentConfig, fingerprint: str, data_hash: str, names: list[str], path) -> None:
    if header["fingerprint"] != fingerprint:
        raise PrunepilotError(f"{path} was written for a different starting model (weights fingerprint "
                              f"{header['fingerprint']} != {fingerprint}); resume from the original model")
    if header["layers"] != names:
        raise PrunepilotError(f"{path} lists other prunable layers than this model / include / ignore")
    if header["replay_key"] != cfg.replay_key():
        diff = [k for k, v in cfg.replay_key().items() if header["replay_key"].get(k) != v]
        raise PrunepilotError(f"cannot resume {path}: settings changed since it was written: {', '.join(diff)}")
    if header["data_hash"] != data_hash:
        raise PrunepilotError(f"cannot resume {path}: the calibration / held-out data changed")
