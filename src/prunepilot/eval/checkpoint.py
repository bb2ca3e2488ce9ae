"""Resumable evaluation: finished pieces of a task ("units") are appended to a JSON-lines file as they end.

A full-set evaluation of a small model on a CPU takes hours (MMLU alone: 14,079 questions). With a
checkpoint file, run_suite splits each task into units (chunks of items; MMLU: one subject per unit),
appends each unit's raw outcome (per-item log-likelihoods, correctness, answers) as one line once it is
scored, and on the next call with the same file skips the units already there. Scores are computed from
the raw outcomes of all units, so a resumed run gives the same numbers as an uninterrupted one.

Every line carries a key: the model's fingerprint (parameter names, shapes and the sum of |w| of each
parameter, so a differently pruned model never reuses another's outcomes), the tokenizer's (class, size,
special ids, the encoding of a probe text), the task's protocol (limit, shots, BOS, unit boundaries) and a
digest of the unit's inputs (its items and shots, or an MMLU subject's CSV files), so an edited data file
or another tokenizer is scored anew. Lines with another key are ignored and kept; a line cut short by a
crash is ignored; a reused unit must hold one outcome per item.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from ..errors import PrunepilotError

log = logging.getLogger(__name__)


PROBE = "The quick brown fox, 1234 — Ünïcödé?\nAnswer: A"


@torch.no_grad()
def model_fingerprint(model, tokenizer=None) -> str:
    """A short hash of the parameter names, shapes and per-parameter sum of |w| (not the path the model was
    loaded from: the same weights resumed from another folder or working directory match), and of the
    tokenizer when given."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"{name}{tuple(p.shape)}{float(p.detach().abs().sum(dtype=torch.float64)):.10e}".encode())
    if tokenizer is not None:
        size = len(tokenizer) if hasattr(tokenizer, "__len__") else None
        ids = list(tokenizer.encode(PROBE, add_special_tokens=False))
        h.update(f"{type(tokenizer).__name__}{size}{getattr(tokenizer, 'bos_token_id', None)}"
                 f"{getattr(tokenizer, 'eos_token_id', None)}{ids}".encode())
    return h.hexdigest()[:16]


def digest(*parts) -> str:
    """Digest of a unit's inputs: bytes are hashed as they are, anything else by its repr."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else repr(part).encode())
    return h.hexdigest()[:16]


def unit_key(fingerprint: str, task: str, protocol: dict, unit: str, inputs: str = "") -> str:
    blob = json.dumps({"model": fingerprint, "task": task, "protocol": protocol, "unit": unit, "inputs": inputs},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class UnitStore:
    """Finished units of an evaluation, in a JSON-lines file (one {"key", "task", "unit", "data"} per line)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_file():
            raise PrunepilotError(f"evaluation checkpoint {self.path} exists and is not a file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: dict[str, dict] = {}
        if self.path.exists():
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                        self.done[rec["key"]] = rec["data"]
                    except (json.JSONDecodeError, KeyError, TypeError):  # a line cut short by a crash
                        continue
            log.info("evaluation checkpoint %s: %d finished units", self.path, len(self.done))

    def get(self, key: str) -> dict | None:
        return self.done.get(key)

    def put(self, key: str, task: str, unit: str, data: dict) -> None:
        """Append one finished unit and make it durable before going on."""
        line = json.dumps({"key": key, "task": task, "unit": unit, "data": data}) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            if f.tell() > 0 and not self._ends_with_newline():  # a crash cut the last line: start a fresh one
                f.write("\n")
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.done[key] = data

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"
