"""Append-only JSONL journal of an agent run: a header line, then one line per iteration.

Each record is one complete line written with os.write (looping over short writes), then fsync'ed, so
a crash leaves at worst a truncated last line: `read` drops it with a warning and `drop_partial_tail`
cuts it off before a resumed run appends. A run resumes by replaying the accepted iterations'
`applied` extras in order (see loop.py); each record's `mask_hash` checks that the replay produced the
same masks.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
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
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
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

    def drop_partial_tail(self) -> None:
        """Cut an interrupted last write (bytes after the last newline) so that appends start on a fresh line."""
        data = self.path.read_bytes()
        keep = data.rfind(b"\n") + 1
        if keep < len(data):
            log.warning("journal %s: removing a truncated last line (%d bytes)", self.path, len(data) - keep)
            with open(self.path, "r+b") as f:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())

    def has_header(self) -> bool:
        """True when the first complete line is a header (a crash can cut the very first write short)."""
        if not self.exists():
            return False
        first, sep, _ = self.path.read_bytes().partition(b"\n")
        try:
            return bool(sep) and json.loads(first).get("type") == "header"
        except (json.JSONDecodeError, AttributeError):
            return False

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


def mask_fingerprint(adapter: ModelAdapter) -> str:
    """sha256 over which weights of every prunable linear are zero: equal masks, equal hash."""
    h = hashlib.sha256()
    for name, lin in adapter.all_linears().items():
        zero = (weight_2d(lin).detach() == 0).to("cpu").contiguous().numpy()
        h.update(name.encode())
        h.update(np.packbits(zero).tobytes())
    return h.hexdigest()[:16]


def model_fingerprint(adapter: ModelAdapter) -> str:
    """sha256 over the names, shapes and bytes of every prunable linear weight."""
    h = hashlib.sha256()
    for name, lin in adapter.all_linears().items():
        w = weight_2d(lin).detach().to("cpu").contiguous()
        h.update(f"{name}{tuple(w.shape)}{w.dtype}".encode())
        h.update(w.view(torch.uint8).numpy())  # raw bytes, any dtype (bf16 has no numpy type)
    return h.hexdigest()[:16]
