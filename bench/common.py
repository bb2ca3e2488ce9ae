"""Shared helpers for the bench scripts: locating ../shared, loading once, restoring weights."""
from __future__ import annotations

import copy
import os
import platform
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


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
