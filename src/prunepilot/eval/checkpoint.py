"""Resumable evaluation: finished pieces of a task ("units") are appended to a JSON-lines file as they end.

A full-set evaluation of a small model on a CPU takes hours (MMLU alone: 14,079 questions). With a
checkpoint file, run_suite splits each task into units (chunks of items; MMLU: one subject per unit),
appends each unit's raw outcome (per-item log-likelihoods, correctness, answers) as one line once it is
scored, and on the next call with the same file skips the units already there. Scores are computed from
the raw outcomes of all units, so a resumed run gives the same numbers as an uninterrupted one.

Every line carries a key: the model's fingerprint (prunepilot.fingerprint.model_fingerprint: parameter names,
shapes and the sum of |w| of each parameter, so a differently pruned model never reuses another's outcomes,
and the tokenizer's class, size, special ids and encoding of a probe text), the task's protocol (limit, shots,
BOS, unit boundaries) and a digest of the unit's inputs (its items and shots, or an MMLU subject's CSV files),
so an edited data file or another tokenizer is scored anew. Lines with another key are ignored and kept; a
line cut short by a crash is ignored (and kept: a later append starts a fresh line after it); a reused unit
must hold one outcome per item.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from ..io import JsonLines

log = logging.getLogger(__name__)


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
    """Finished units of an evaluation, in a JSON-lines file (one {"key", "task", "unit", "data"} per line).

    A prunepilot.io.JsonLines file (fsync'ed appends; a cut last line is followed by a fresh one), read with
    skip_damaged: the file is a cache, so an unreadable line, even one that a later append left in the middle
    of the file, only means that unit is scored again.
    """

    def __init__(self, path: str | Path):
        self.file = JsonLines(path, what="evaluation checkpoint")
        self.path = self.file.path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: dict[str, dict] = {}
        if self.path.exists():
            for _, rec in self.file.read(skip_damaged=True):  # a cache: a damaged line is scored again
                if isinstance(rec.get("key"), str) and "data" in rec:
                    self.done[rec["key"]] = rec["data"]
            log.info("evaluation checkpoint %s: %d finished units", self.path, len(self.done))

    def get(self, key: str) -> dict | None:
        return self.done.get(key)

    def put(self, key: str, task: str, unit: str, data: dict) -> None:
        """Append one finished unit and make it durable before going on."""
        self.file.append({"key": key, "task": task, "unit": unit, "data": data})
        self.done[key] = data
