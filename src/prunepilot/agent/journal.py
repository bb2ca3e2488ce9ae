"""Append-only JSONL journal of an agent run: a header line, then one line per iteration.

Each record is written with a single os.write of one complete line, then fsync'ed, so a crash leaves
at worst a truncated last line, which `read` drops with a warning. A run resumes by replaying the
accepted iterations' `applied` extras in order (see loop.py).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from ..engine import ModelAdapter, weight_2d
from ..errors import PrunepilotError

log = logging.getLogger(__name__)

VERSION = 1


class Journal:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def exists(self) -> bool:
        return self.path.is_file() and self.path.stat().st_size > 0

    def append(self, record: dict) -> None:
        line = (json.dumps(record, separators=(",", ":"), default=float) + "\n").encode()
        new = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        if new:  # make the new directory entry durable too
            try:
                dfd = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            except OSError:
                pass

    def read(self) -> tuple[dict, list[dict]]:
        """(header, iteration records). A malformed last line (interrupted write) is dropped."""
        lines = self.path.read_bytes().split(b"\n")
        records = []
        for k, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if k >= len(lines) - 2:  # only the last line may be cut short
                    log.warning("journal %s: dropping a truncated last line", self.path)
                    continue
                raise PrunepilotError(f"journal {self.path} line {k + 1} is corrupt") from None
        if not records or records[0].get("type") != "header":
            raise PrunepilotError(f"journal {self.path} has no header line")
        header = records[0]
        if header.get("version") != VERSION:
            raise PrunepilotError(f"journal {self.path} has version {header.get('version')}, expected {VERSION}")
        return header, [r for r in records[1:] if r.get("type") == "iteration"]


def model_fingerprint(adapter: ModelAdapter) -> str:
    """sha256 over the names, shapes and bytes of every prunable linear weight."""
    h = hashlib.sha256()
    for name, lin in adapter.all_linears().items():
        w = weight_2d(lin).detach().to("cpu").contiguous()
        h.update(f"{name}{tuple(w.shape)}{w.dtype}".encode())
        h.update(w.view(torch.uint8).numpy())  # raw bytes, any dtype (bf16 has no numpy type)
    return h.hexdigest()[:16]
