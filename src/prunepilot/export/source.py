"""What `prunepilot export` reads: a model folder, a GGUF folder (or file), or a `prunepilot prune` output folder.

    run folder    DIR/report.json + DIR/model/          -> DIR/model; tokenizer from the GGUF the run started from
    model folder  config.json + *.safetensors           -> loaded with prunepilot.modeling.load_model (reads
                                                           prunepilot_widths.json for per-layer widths)
    GGUF folder   *.gguf and no safetensors (or a file)  -> dequantized by transformers; its tokenizer is copied

A folder that is none of these (a half-written run, a run saved with --no-save-model, a model folder without
weights) is a PrunepilotError naming what is missing, before anything is loaded.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ..errors import PrunepilotError

log = logging.getLogger(__name__)

RUN_MARKERS = ("report.json", "recipe.yaml")


@dataclass
class ExportSource:
    model_dir: Path                   # folder handed to load_model
    gguf_file: str | None = None      # GGUF file inside model_dir when the weights themselves are a GGUF
    tokenizer_gguf: Path | None = None  # GGUF whose tokenizer.* metadata is copied (None: build it from HF files)


def _has_weights(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()


def _single_gguf(folder: Path) -> Path | None:
    files = sorted(folder.glob("*.gguf"))
    return files[0] if len(files) == 1 else None


def _gguf_of(location: str | None) -> Path | None:
    """The GGUF file a prune run started from, if `location` (report.json's "model") is a local GGUF."""
    if not location:
        return None
    path = Path(location).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not _has_weights(path):
        return _single_gguf(path)
    return None


def _run_tokenizer_gguf(run_dir: Path) -> Path | None:
    try:
        report = json.loads((run_dir / "report.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    found = _gguf_of(report.get("model")) if isinstance(report, dict) else None
    if found is None and isinstance(report, dict) and report.get("model"):
        log.info("the run's source model %s is not a local GGUF: building the tokenizer from %s/model",
                 report["model"], run_dir)
    return found


def _check_model_dir(folder: Path, what: str) -> None:
    if not (folder / "config.json").is_file():
        raise PrunepilotError(f"{what} {folder} has no config.json (half-written or not a saved model)")
    if not _has_weights(folder):
        raise PrunepilotError(f"{what} {folder} has no model.safetensors (half-written or not a saved model)")


def _run_source(run_dir: Path) -> ExportSource:
    model_dir = run_dir / "model"
    if not model_dir.is_dir():
        raise PrunepilotError(f"run folder {run_dir} has no model/ subfolder (pruned with --no-save-model, or "
                              f"not finished)")
    _check_model_dir(model_dir, "run model folder")
    return ExportSource(model_dir, tokenizer_gguf=_run_tokenizer_gguf(run_dir))


def resolve_source(path: str | Path) -> ExportSource:
    """Classify MODEL_OR_RUN; raises PrunepilotError (one line) for anything that cannot be exported."""
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise PrunepilotError(f"{path} is a file but not a .gguf; give a model folder, a GGUF or a run folder")
        return ExportSource(path.parent, gguf_file=path.name, tokenizer_gguf=path)
    if not path.is_dir():
        raise PrunepilotError(f"model path {path} does not exist")
    if any((path / m).is_file() for m in RUN_MARKERS) or (path / "model").is_dir():
        return _run_source(path)
    if _has_weights(path):
        _check_model_dir(path, "model folder")
        parent_run = path.name == "model" and (path.parent / "report.json").is_file()
        return ExportSource(path, tokenizer_gguf=_run_tokenizer_gguf(path.parent) if parent_run else None)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) > 1:
        raise PrunepilotError(f"{path} holds {len(ggufs)} .gguf files; give the file itself")
    if ggufs:
        return ExportSource(path, gguf_file=ggufs[0].name, tokenizer_gguf=ggufs[0])
    raise PrunepilotError(f"{path} is not a model folder (config.json + model.safetensors), a GGUF folder or a "
                          f"prunepilot run folder (report.json + model/)")
