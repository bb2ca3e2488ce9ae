"""Saving a pruning result: model + tokenizer + recipe.yaml + report.json + a per-layer sparsity plot."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from .io import atomic_dir, atomic_write_json
from .modeling import save_pruned

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


SPARSITY_FORMAT = "prunepilot-sparsity/1"
SPARSITY_STORAGE = ("dense: pruned weights are stored as explicit zeros; runtimes multiply them like any other "
                    "weight (no size or speed change until a sparse kernel or a quantized export uses them)")


def sparsity_config(report: dict) -> dict | None:
    """The config.json entry describing an unstructured / N:M result: method, pattern, global and per-linear
    sparsity, how the zeros are stored. None for a resized result (its layers record their dense shapes: structured
    pruning made them physically smaller instead of zeroing weights)."""
    layers = report.get("layers")
    if not layers or any("dense_shape" in v for v in layers.values()):
        return None
    pattern = report.get("pattern")
    return {"format": SPARSITY_FORMAT, "method": report.get("method"), "pattern": pattern,
            "target_sparsity": report.get("target_sparsity"),
            "global_sparsity": round(float(report.get("global_sparsity", 0.0)), 6),
            "layers": {name: round(float(v["sparsity"]), 6) for name, v in report["layers"].items()},
            "storage": SPARSITY_STORAGE}


def record_sparsity(model_dir: Path, report: dict) -> None:
    """Add {"prunepilot": {"sparsity_config": ...}} to model_dir/config.json (transformers keeps unknown keys as
    config attributes, so plain from_pretrained still loads the folder)."""
    entry = sparsity_config(report)
    cfg_file = model_dir / "config.json"
    if not cfg_file.is_file():
        return
    cfg = json.loads(cfg_file.read_text())
    if entry is None:  # structured: drop a stale entry inherited from an earlier unstructured run's config
        if not cfg.get("prunepilot", {}).pop("sparsity_config", None):
            return
        cfg = {k: v for k, v in cfg.items() if k != "prunepilot" or v}
    else:
        cfg.setdefault("prunepilot", {})["sparsity_config"] = entry
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def save_result(model, tokenizer, out_dir: str | Path, recipe, report: dict, overwrite: bool = False,
                save_model: bool = True, carry: list[str] = ()) -> Path:
    """Write everything into out_dir atomically (temp folder, then one rename); the files named in `carry` that
    out_dir already holds (e.g. a search log) are kept."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        for name in carry:
            if (out_dir / name).is_file():
                shutil.copy2(out_dir / name, tmp / name)
        if save_model:  # an ordinary checkpoint, or a resized one with its widths (structured pruning)
            save_pruned(model, tokenizer, tmp / "model")
            record_sparsity(tmp / "model", report)  # unstructured / N:M: what is pruned, in config.json
        (tmp / "recipe.yaml").write_text(recipe.to_yaml())
        atomic_write_json(tmp / "report.json", report)
        if report.get("layers"):
            plot_layer_sparsity(report, tmp / "sparsity.png")
    log.info("wrote %s", out_dir)
    return out_dir
