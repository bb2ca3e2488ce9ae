"""Atomic file and folder writes: a crash never leaves a half-written result where a good one was."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .bounded_json import BoundedJsonError, loads_bounded
from .errors import PrunepilotError

log = logging.getLogger(__name__)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | Path):
    """Yield a temporary path beside `path` to write; on success it is fsync'ed and renamed over `path` (with the
    permissions open() would give), on failure removed: `path` is never left half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:  # on disk before the rename
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | Path, data) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def check_output_location(path: str | Path, what: str = "--out") -> Path:
    """Refuse, before any work, an output path that cannot be written: a file in the way of a parent folder, a
    read-only or pseudo file system (/proc). Probes with a temporary folder in the nearest existing parent;
    creates nothing that stays."""
    path = Path(path).expanduser().absolute()
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise PrunepilotError(f"{what} {path} cannot be written: {parent} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".prunepilot-probe-"))
    except OSError as e:
        raise PrunepilotError(f"{what} {path} cannot be written: {parent}: {e.strerror or e}") from None
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def stale_prefix(name: str, kind: str) -> str:
    """Prefix of a temporary sibling of `name` that this process makes: `.NAME.KIND-PID-`."""
    return f".{name}.{kind}-{os.getpid()}-"


def remove_stale(folder: Path, name: str, kinds=("tmp", "old", "offload")) -> None:
    """Remove the temporary siblings `.NAME.KIND-*` of an interrupted run into `folder/name` (killed: no cleanup
    ran), except those of a process still alive. Older names without a pid (`.NAME.tmp-XXXX`) count as stale."""
    if not folder.is_dir():
        return
    for kind in kinds:
        for entry in folder.glob(f".{name}.{kind}-*"):
            pid = entry.name[len(f".{name}.{kind}-"):].split("-", 1)[0]
            if pid.isdigit() and (int(pid) == os.getpid() or _pid_alive(int(pid))):
                continue  # ours, or a run still going
            log.info("removing %s, left by an interrupted run", entry)
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False):
    """Yield a temporary folder beside `path`; on success it replaces `path` in one rename.

    An existing non-empty `path` is an error unless overwrite=True; on failure the old folder is kept.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PrunepilotError(f"output path {path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise PrunepilotError(f"output folder {path} is not empty; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent, path.name, ("tmp", "old"))  # an interrupted run's leftovers
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=stale_prefix(path.name, "tmp")))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the folder the permissions mkdir would
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.parent / f"{stale_prefix(path.name, 'old')}0"
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class JsonLines:
    """Append-only JSON-lines file: each record is one line, written in full and fsync'ed before `append` returns.

    A crash leaves at worst a cut last line: `read` skips it with a warning, `drop_partial_tail` removes it, and
    `append` starts a fresh line after it. A malformed line anywhere else is an error naming the file and line.
    (The agent journal and the evaluation checkpoints are both such files.)
    """

    def __init__(self, path: str | Path, what: str = "file"):
        self.path = Path(path)
        self.what = what
        if self.path.exists() and not self.path.is_file():
            raise PrunepilotError(f"{what} {self.path} exists and is not a file")

    def exists(self) -> bool:
        return self.path.is_file() and self.path.stat().st_size > 0

    def append(self, record: dict) -> None:
        line = (json.dumps(record, separators=(",", ":"), default=float) + "\n").encode()
        new = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":  # a crash cut the last line: start a fresh one
                line = b"\n" + line
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if new:  # make the new directory entry durable too
            _fsync_dir(self.path.parent)

    def drop_partial_tail(self) -> None:
        """Cut an interrupted last write (bytes after the last newline)."""
        data = self.path.read_bytes()
        keep = data.rfind(b"\n") + 1
        if keep < len(data):
            log.warning("%s %s: removing a truncated last line (%d bytes)", self.what, self.path, len(data) - keep)
            with open(self.path, "r+b") as f:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())

    def read(self, skip_damaged: bool = False) -> list[tuple[int, dict]]:
        """(line number, record) for every complete line; a malformed last line (interrupted write) is skipped.

        skip_damaged: skip every malformed line instead of failing, for a cache whose lost line only means work
        is done again (a line cut by a crash stays in the middle of the file once later lines are appended)."""
        lines = self.path.read_bytes().split(b"\n")
        out = []
        for k, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                record = loads_bounded(line)  # size and nesting depth limited: a tampered line is one error
            except BoundedJsonError as e:
                if skip_damaged or (k >= len(lines) - 2 and str(e) == "not valid JSON"):  # only the last may be cut
                    log.warning("%s %s: skipping a truncated last line", self.what, self.path)
                    continue
                raise PrunepilotError(f"{self.path}:{k + 1}: {self.what} line is {e}") from None
            if not isinstance(record, dict):
                if skip_damaged:
                    continue
                raise PrunepilotError(f"{self.path}:{k + 1}: {self.what} line is not a JSON object")
            out.append((k + 1, record))
        return out


def _fsync_dir(folder: Path) -> None:
    try:
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
