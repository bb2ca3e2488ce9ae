"""A GGUF file checked before the gguf package or transformers read it: one bounded pass over its header.

Every declared count and length (keys, tensors, strings, arrays, dimensions) is checked against the bytes left
in the file before anything is allocated or looped over, every value / item / tensor type against the types
GGUF defines, every tensor's data against the end of the file, and the architecture's block_count /
embedding_length / feed_forward_length against the tensors actually present (a declared block_count of
100,000 made transformers build 100,000 layers). Any problem is a PrunepilotError naming the file and what is
wrong; the cost is one pass over the header (arrays of numbers are skipped, not read).
"""
from __future__ import annotations

import math
import mmap
import re
import struct
from pathlib import Path

from .errors import PrunepilotError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_DIMS = 4                # GGML_MAX_DIMS
MAX_ARRAY_NESTING = 4       # arrays of arrays (none of the keys llama.cpp writes nests deeper than 2)
# value types: fixed sizes of the scalar ones (STRING = 8, ARRAY = 9 are variable)
SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
INT_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 10: "Q", 11: "q"}
STRING, ARRAY = 8, 9
_BLOCK = re.compile(r"blk\.(\d+)\.")


class _Cursor:
    """Reads little- or big-endian GGUF fields from a buffer, never past its end."""

    def __init__(self, buf, where: str, endian: str):
        self.buf, self.pos, self.where, self.endian = buf, 0, where, endian

    def fail(self, what: str):
        raise PrunepilotError(f"{self.where}: damaged GGUF file: {what} (at byte {self.pos})")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            self.fail(f"{what} needs {n} bytes, {len(self.buf) - self.pos} are left")

    def unpack(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        self.need(size, what)
        value = struct.unpack_from(self.endian + fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def string(self, what: str) -> str:
        n = self.unpack("Q", f"{what} length")
        self.need(n, f"{what} of declared length {n}")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, what: str, depth: int = 0):
        """One value of type vtype (integers and strings; None for floats, bools and arrays). Arrays of numbers
        are skipped by their size, arrays of strings walked."""
        if vtype in SCALAR_SIZES:
            if vtype in INT_FORMATS:
                return self.unpack(INT_FORMATS[vtype], what)
            self.need(SCALAR_SIZES[vtype], what)
            self.pos += SCALAR_SIZES[vtype]
            return None
        if vtype == STRING:
            return self.string(what)
        if vtype != ARRAY:
            self.fail(f"{what} has unknown value type {vtype}")
        if depth >= MAX_ARRAY_NESTING:
            self.fail(f"{what} nests arrays deeper than {MAX_ARRAY_NESTING}")
        item, count = self.unpack("I", f"{what} item type"), self.unpack("Q", f"{what} length")
        if item not in SCALAR_SIZES and item not in (STRING, ARRAY):
            self.fail(f"{what} has unknown item type {item}")
        least = SCALAR_SIZES.get(item, 8 if item == STRING else 12)  # bytes each item takes at least
        self.need(count * least, f"{what}: {count} items")
        if item in SCALAR_SIZES:
            self.pos += count * least
            return None
        for k in range(count):
            self.value(item, f"{what}[{k}]", depth + 1)
        return None  # arrays are walked, not kept (a per-layer array is never compared with a tensor)


def _header(c: _Cursor) -> tuple[int, int]:
    if bytes(c.buf[:4]) != MAGIC:
        c.fail(f"it does not start with {MAGIC!r}")
    c.pos = 4
    version = c.unpack("I", "version")
    if version not in VERSIONS:
        swapped = struct.unpack(">I", struct.pack("<I", version))[0]
        if swapped not in VERSIONS:
            c.fail(f"version {version} (prunepilot reads GGUF versions {VERSIONS})")
        c.endian = ">"
    n_tensors, n_kv = c.unpack("Q", "tensor count"), c.unpack("Q", "key count")
    left = len(c.buf) - c.pos
    if n_kv * 13 > left or n_tensors * 24 > left:  # a key takes >= 13 bytes, a tensor entry >= 24
        c.fail(f"it declares {n_kv} keys and {n_tensors} tensors, more than its {len(c.buf)} bytes can hold")
    return n_tensors, n_kv


def _metadata(c: _Cursor, n_kv: int) -> dict:
    meta = {}
    for k in range(n_kv):
        key = c.string(f"key {k}")
        meta[key] = c.value(c.unpack("I", f"type of {key!r}"), f"value of {key!r}")
    return meta


def _tensor_infos(c: _Cursor, n_tensors: int) -> list[tuple[str, list[int], int, int]]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    known = {int(t) for t in GGMLQuantizationType}
    infos = []
    for k in range(n_tensors):
        name = c.string(f"tensor {k} name")
        n_dims = c.unpack("I", f"tensor {name!r} dimension count")
        if not 1 <= n_dims <= MAX_DIMS:
            c.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS})")
        dims = [c.unpack("Q", f"tensor {name!r} shape") for _ in range(n_dims)]
        qtype, offset = c.unpack("I", f"tensor {name!r} type"), c.unpack("Q", f"tensor {name!r} offset")
        if qtype not in known or GGMLQuantizationType(qtype) not in GGML_QUANT_SIZES:
            c.fail(f"tensor {name!r} has unknown type {qtype}")
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        if dims[0] % block:
            c.fail(f"tensor {name!r}: first dimension {dims[0]} is not a multiple of its type's block {block}")
        infos.append((name, dims, offset, math.prod(dims) // block * size))
    return infos


def _check_data(c: _Cursor, infos, alignment: int) -> None:
    start = -(-c.pos // alignment) * alignment
    for name, _, offset, nbytes in infos:
        if offset % alignment or start + offset + nbytes > len(c.buf):
            c.fail(f"tensor {name!r}: {nbytes} bytes at offset {offset} lie beyond the end of the file "
                   f"({len(c.buf)} bytes) or off the {alignment}-byte alignment")


def _check_shape_keys(c: _Cursor, meta: dict, infos) -> None:
    """block_count / embedding_length / feed_forward_length as the tensors present say."""
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        c.fail("general.architecture is missing or not a string")
    shapes = {name: dims for name, dims, _, _ in infos}
    blocks = {int(m.group(1)) for name in shapes if (m := _BLOCK.match(name))}
    declared = meta.get(f"{arch}.block_count")
    if declared is not None and (not isinstance(declared, int) or not set(range(declared)) <= blocks):
        c.fail(f"{arch}.block_count is {declared!r} but the file holds tensors for {len(blocks)} blocks")
    for key, tensor, axis in (("embedding_length", "token_embd.weight", 0), ("feed_forward_length",
                                                                             "blk.0.ffn_up.weight", 1)):
        value = meta.get(f"{arch}.{key}")
        if tensor in shapes and isinstance(value, int) and shapes[tensor][axis] != value:
            c.fail(f"{arch}.{key} is {value} but {tensor} has shape {shapes[tensor]}")


def check_gguf(path: str | Path) -> None:
    """Raise PrunepilotError (one line) unless `path` is a GGUF file whose header is consistent with its size."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if path.stat().st_size < 24:
                raise PrunepilotError(f"{path}: damaged GGUF file: {path.stat().st_size} bytes, too short for a header")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                _check_buffer(memoryview(buf), str(path))
    except OSError as e:
        raise PrunepilotError(f"cannot read {path}: {e.strerror or e}") from None


def _check_buffer(buf, where: str) -> None:
    c = _Cursor(buf, where, "<")
    try:
        n_tensors, n_kv = _header(c)
        meta = _metadata(c, n_kv)
        infos = _tensor_infos(c, n_tensors)
        alignment = meta.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            c.fail(f"general.alignment {alignment!r} is not a power of two")
        _check_data(c, infos, alignment)
        _check_shape_keys(c, meta, infos)
    finally:
        c.buf = None
        buf.release()
