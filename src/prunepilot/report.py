"""Saving a pruning result: model + tokenizer + recipe.yaml + report.json + a per-layer sparsity plot."""
from __future__ import annotations

import logging
from pathlib import Path

from .io import atomic_dir, atomic_write_json
from .structured.saving import save_pruned

log = logging.getLogger(__name__)


def environment(device=None) -> dict:
    """Versions and hardware a result was produced with (stored in every report)."""
    import platform

    import torch
    import transformers

    from . import __version__

    env = {"prunepilot": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "machine": platform.machine(), "cpu_threads": torch.get_num_threads()}
    if device is not None and torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


def plot_layer_sparsity(report: dict, path: Path) -> None:
    """Bar plot of the achieved sparsity of every pruned linear, blocks in order (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["layers"])
    values = [report["layers"][n]["sparsity"] for n in names]
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.08), 3.5))
    ax.bar(range(len(values)), values, width=1.0, color="#4C72B0")
    ax.axhline(report.get("target_sparsity", 0), color="k", lw=0.8, ls="--", label="target")
    ax.set_xlabel("linear layer (model order)")
    ax.set_ylabel("sparsity")
    ax.set_ylim(0, 1)
    ax.set_title(f"{report.get('method')} {report.get('pattern')}: global {report.get('global_sparsity', 0):.3f}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_result(model, tokenizer, out_dir: str | Path, recipe, report: dict, overwrite: bool = False,
                save_model: bool = True) -> Path:
    """Write everything into out_dir atomically (temp folder, then one rename)."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        if save_model:  # an ordinary checkpoint, or a resized one with its widths (structured pruning)
            save_pruned(model, tokenizer, tmp / "model")
        (tmp / "recipe.yaml").write_text(recipe.to_yaml())
        atomic_write_json(tmp / "report.json", report)
        if report.get("layers"):
            plot_layer_sparsity(report, tmp / "sparsity.png")
    log.info("wrote %s", out_dir)
    return out_dir
