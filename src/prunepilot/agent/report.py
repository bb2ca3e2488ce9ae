"""Agent run outputs: report.json, trajectory.png (matplotlib Agg), model/ (atomic)."""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from ..io import atomic_dir, atomic_write_json
from ..modelfiles import save_model_files
from ..report import environment
from .config import AgentConfig
from .journal import IterationRecord, JournalHeader

log = logging.getLogger(__name__)


def _trajectory(header: JournalHeader, records: list[IterationRecord], start: float) -> list[dict]:
    trajectory = [{"iteration": -1, "sparsity": start, "ppl": header.baseline_ppl, "accepted": True,
                   "label": "baseline", "source": ""}]
    for r in records:
        trajectory.append({"iteration": r.iteration, "sparsity": r.sparsity_before + r.gain,
                           "sparsity_after": r.sparsity_after, "ppl": r.ppl_after,
                           "ppl_change": r.ppl_change, "accepted": r.accepted,
                           "rolled_back": r.rolled_back, "label": r.label,
                           "source": r.source, "layers_touched": len(r.applied),
                           "scale": r.scale, "seconds": r.seconds, "controller_s": r.controller_s,
                           "replies": r.replies, "prompt_chars": r.prompt_chars, "prompt_tokens": r.prompt_tokens,
                           "completion_tokens": r.completion_tokens, "rollback_reason": r.rollback_reason,
                           "phases": r.phases})
    return trajectory


def controller_summary(records: list[IterationRecord]) -> dict:
    """How the controller did: answers asked, valid ones (each decision it made is one valid answer), fallbacks,
    time and prompt size in all."""
    asked = sum(r.replies for r in records)
    valid = sum(r.replies > 0 and not r.source.endswith("fallback") for r in records)
    tokens = [r.prompt_tokens for r in records if r.prompt_tokens is not None]
    return {"replies": asked, "valid_replies": valid, "invalid_replies": asked - valid,
            "valid_rate": round(valid / asked, 4) if asked else None,
            "fallbacks": sum(r.source.endswith("fallback") for r in records),
            "controller_s": round(sum(r.controller_s for r in records), 2),
            "prompt_chars": sum(r.prompt_chars for r in records),
            "prompt_tokens": sum(tokens) if tokens else None}


def build_report(cfg: AgentConfig, header: JournalHeader, records: list[IterationRecord], numel: dict[str, int],
                 zeros: dict[str, int], stop_reason: str, wall_s: float) -> dict:
    total = sum(numel.values())
    accepted = [r for r in records if r.accepted]
    start = records[0].sparsity_before if records else sum(zeros.values()) / total
    return {
        "kind": "agent",
        "environment": environment(cfg.device if cfg.device != "auto" else None),
        "controller": cfg.controller.kind,
        "target_sparsity": cfg.target_sparsity,
        "global_sparsity": sum(zeros.values()) / total,
        "target_reached": sum(zeros.values()) / total >= cfg.target_sparsity - cfg.target_tolerance,
        "stop_reason": stop_reason,
        "iterations": len(records),
        "accepted": len(accepted),
        "rollbacks": sum(r.rolled_back for r in records),
        "fallbacks": sum(r.source == "builtin-fallback" for r in records),
        "controller_stats": controller_summary(records),
        "baseline_ppl": header.baseline_ppl,
        "final_ppl": accepted[-1].ppl_after if accepted else header.baseline_ppl,
        "held_out_tokens": header.held_out_tokens,
        "eval_seqlen": cfg.eval_seqlen,
        "calibration": header.calibration,
        "layers": {n: {"numel": numel[n], "zeros": zeros[n], "sparsity": zeros[n] / numel[n]} for n in numel},
        "trajectory": _trajectory(header, records, start),
        "wall_s": round(wall_s, 1),
        "config": cfg.model_dump(mode="json"),
    }


def plot_trajectory(report: dict, path: str | Path) -> None:
    """Held-out perplexity and global sparsity per iteration; rolled-back attempts marked with red x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traj = report["trajectory"]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    acc = [t for t in traj if t["accepted"]]
    rb = [t for t in traj if t.get("rolled_back")]
    ax1.plot([t["iteration"] for t in acc], [t["ppl"] for t in acc], "o-", color="#4C72B0", label="accepted")
    if rb:
        ax1.scatter([t["iteration"] for t in rb], [t["ppl"] for t in rb], marker="x", s=60, color="#C44E52",
                    label="rolled back", zorder=3)
    ax1.set_yscale("log")
    ax1.set_ylabel("held-out perplexity")
    ax1.legend(loc="upper left")
    ax1.set_title(f"agent ({report['controller']}): sparsity {report['global_sparsity']:.3f}, "
                  f"{report['iterations']} iterations, {report['rollbacks']} rollbacks")
    ax2.step([t["iteration"] for t in traj], [t.get("sparsity_after", t["sparsity"]) for t in traj], where="post",
             color="#55A868", label="global sparsity")
    if rb:
        ax2.scatter([t["iteration"] for t in rb], [t["sparsity"] for t in rb], marker="x", s=60, color="#C44E52",
                    label="attempted (rolled back)")
    ax2.axhline(report["target_sparsity"], color="k", lw=0.8, ls="--", label="target")
    ax2.set_xlabel("iteration (-1 = before pruning)")
    ax2.set_ylabel("global sparsity")
    ax2.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_report(report: dict, out_dir: str | Path) -> None:
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "report.json", report)
    plot_trajectory(report, out_dir / "trajectory.png")


def save_model(model, tokenizer, path: str | Path) -> Path:
    """model.save_pretrained + tokenizer into `path`, atomically (temp folder, then one rename)."""
    with atomic_dir(path, overwrite=True) as tmp:
        save_model_files(model, tokenizer, tmp)
    log.info("saved pruned model to %s", path)
    return Path(path)
