"""Shared helpers for the bench scripts: locating ../shared, loading once, restoring weights."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
FLOAT_CACHE = str(Path.home() / ".cache" / "prunepilot" / "float")


def shared_dir() -> Path:
    return Path(os.environ.get("PRUNEPILOT_SHARED", REPO.parent / "shared"))


def smollm2_path() -> str:
    return str(shared_dir() / "models" / "smollm2-135m-instruct")


def machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} CPU threads, torch {torch.__version__} ({torch.get_num_threads()} threads)"


class Snapshot:
    """Keep a CPU copy of a model's weights so several methods can start from the same dense model."""

    def __init__(self, model):
        self.state = copy.deepcopy({k: v.detach().cpu().clone() for k, v in model.state_dict().items()})

    def restore(self, model):
        model.load_state_dict(self.state)


def md_table(headers: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def publish(table: str, protocol: str, out: str | None) -> str:
    """Print the table with its protocol and, with --out, write the same text atomically."""
    text = f"{table}\n\nProtocol: {protocol}\n"
    print(text, flush=True)
    if out:
        from prunepilot.io import atomic_write_text

        atomic_write_text(out, text)
    return text


def gguf_in(path: str) -> Path | None:
    """The GGUF file a --model names: the file itself, or the first *.gguf in a folder; None for other models."""
    p = Path(path)
    found = [p] if p.suffix == ".gguf" else sorted(p.glob("*.gguf")) if p.is_dir() else []
    return found[0] if found else None


def float_folder(model: str, dtype: str = "float32", cache: str = FLOAT_CACHE) -> str:
    """A GGUF model dequantized once into `cache` (safetensors), so every later load takes seconds; other models
    are returned as given."""
    gguf = gguf_in(model)
    if gguf is None:
        return model
    folder = Path(cache) / f"{gguf.stem}-{gguf.stat().st_size}-{dtype}"
    if not (folder / "config.json").is_file():
        from prunepilot.io import atomic_dir
        from prunepilot.modelfiles import save_model_files
        from prunepilot.modeling import load_model_and_tokenizer

        loaded, tok = load_model_and_tokenizer(model, dtype=dtype, device="cpu")
        with atomic_dir(folder, overwrite=True) as tmp:
            save_model_files(loaded, tok, tmp)
        del loaded
    return str(folder)


def task_scores(model, tok, tasks: list[str], limit: int | None, batch_size: int, **options) -> tuple[dict, dict]:
    """Each task's reported metric in % and its item count, from one eval.suite run over ../shared/data (limit None
    or 0 = every item)."""
    from prunepilot.data import data_root
    from prunepilot.eval.suite import run_suite

    res = run_suite(model, tok, tasks, data_root(), limit=limit or None, batch_size=batch_size, **options)
    return {t: 100 * r[r["main"]] for t, r in res.items()}, {t: r.get("n") for t, r in res.items()}


def settings_fingerprint(args, ignore: tuple[str, ...]) -> str:
    """12 hex digits of the command's settings but `ignore` (which rows run, where they go): the protocol a
    resumable bench's rows are keyed by."""
    keep = {k: v for k, v in vars(args).items() if k not in ignore}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:12]


def method_with_options(spec: str) -> tuple[str, dict[str, str]]:
    """"ria@permute=greedy,a=0.5" -> ("ria", {"permute": "greedy", "a": "0.5"}): a --methods entry's name and its
    method options, as strings (the method's options model converts and checks them)."""
    name, _, opts = spec.partition("@")
    pairs = [kv.partition("=") for kv in opts.split(",") if kv]
    if any(not sep or not key for key, sep, _ in pairs):
        raise SystemExit(f"method options of {spec!r} must be key=value pairs separated by ','")
    return name, {key: value for key, _, value in pairs}
