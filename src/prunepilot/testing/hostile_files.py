"""Hostile and damaged model files for the guarded-reader tests and bench/bad_inputs.py: GGUFs made with the
gguf package and then damaged byte by byte, safetensors folders damaged the same way. Every maker takes a
folder and returns the path to give the CLI."""
from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import numpy as np

BLOCKS = 2


def valid_gguf(path: Path) -> Path:
    """A small, consistent llama GGUF (2 blocks, width 8, FFN 16, 32 tokens)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(BLOCKS)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_context_length(32)
    w.add_head_count(2)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"t{k}".encode() for k in range(32)])
    w.add_tensor("token_embd.weight", np.zeros((32, 8), np.float32))
    for i in range(BLOCKS):
        w.add_tensor(f"blk.{i}.ffn_up.weight", np.ones((16, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _after(data: bytes, key: str, nth: int = 0) -> int:
    """Offset just after the nth occurrence of `key` (a GGUF key or tensor name)."""
    pos = -1
    for _ in range(nth + 1):
        pos = data.index(key.encode(), pos + 1)
    return pos + len(key)


def _patch(data: bytes, at: int, fmt: str, value) -> bytes:
    return data[:at] + struct.pack("<" + fmt, value) + data[at + struct.calcsize(fmt):]


TENSOR = "blk.1.ffn_up.weight"  # the last tensor entry: name, n_dims u32, 2 dims u64, type u32, offset u64
GGUF_DAMAGE = {
    "empty": lambda d: b"",
    "truncated-header": lambda d: d[:20],
    "truncated-metadata": lambda d: d[:200],
    "truncated-half": lambda d: d[: len(d) // 2],
    "truncated-last-byte": lambda d: d[:-1],
    "wrong-magic": lambda d: b"GGML" + d[4:],
    "random-bytes": lambda d: random.Random(1).randbytes(len(d)),
    "bad-version": lambda d: _patch(d, 4, "I", 99),
    "huge-tensor-count": lambda d: _patch(d, 8, "Q", 2**62),
    "huge-key-count": lambda d: _patch(d, 16, "Q", 2**62),
    "huge-key-length": lambda d: _patch(d, 24, "Q", 2**60),
    "huge-string-length": lambda d: _patch(d, _after(d, "general.architecture") + 4, "Q", 2**60),
    "huge-array-length": lambda d: _patch(d, _after(d, "tokenizer.ggml.tokens") + 8, "Q", 2**61),
    "bad-value-type": lambda d: _patch(d, _after(d, "general.architecture"), "I", 77),
    "bad-item-type": lambda d: _patch(d, _after(d, "tokenizer.ggml.tokens") + 4, "I", 77),
    "bad-tensor-type": lambda d: _patch(d, _after(d, TENSOR) + 4 + 16, "I", 999),
    "too-many-dims": lambda d: _patch(d, _after(d, TENSOR), "I", 9),
    "huge-tensor-dim": lambda d: _patch(d, _after(d, TENSOR) + 4, "Q", 2**40),
    "tensor-offset-beyond-end": lambda d: _patch(d, _after(d, TENSOR) + 4 + 16 + 4, "Q", 2**40),
    "block-count-100000": lambda d: _patch(d, _after(d, "llama.block_count") + 4, "I", 100_000),
    "embedding-length-lie": lambda d: _patch(d, _after(d, "llama.embedding_length") + 4, "I", 1 << 20),
}


def hostile_gguf(folder: Path, kind: str) -> Path:
    """A folder holding one damaged GGUF (what `prune` / `eval` / `agent` / `export` are given)."""
    folder.mkdir(parents=True, exist_ok=True)
    good = valid_gguf(folder / "good.tmp").read_bytes()
    (folder / "good.tmp").unlink()
    (folder / "model.gguf").write_bytes(GGUF_DAMAGE[kind](good))
    return folder


def _header_len(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


def _edit_header(data: bytes, edit) -> bytes:
    n = _header_len(data)
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * ((-len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


def _first_tensor(h: dict) -> dict:
    return h[next(k for k in h if k != "__metadata__")]


SAFETENSORS_DAMAGE = {
    "st-empty": lambda d: b"",
    "st-truncated": lambda d: d[: len(d) // 2],
    "st-huge-header-length": lambda d: struct.pack("<Q", 2**62) + d[8:],
    "st-header-not-json": lambda d: d[:8] + b"\xff" * _header_len(d) + d[8 + _header_len(d):],
    "st-offsets-beyond-end": lambda d: _edit_header(d, lambda h: _first_tensor(h).update(data_offsets=[0, 2**40])),
    "st-bad-dtype": lambda d: _edit_header(d, lambda h: _first_tensor(h).update(dtype="Q99")),
    "st-negative-shape": lambda d: _edit_header(d, lambda h: _first_tensor(h).update(shape=[-1, 4])),
}


def hostile_safetensors(folder: Path, kind: str, good: Path) -> Path:
    """A copy of the model folder `good` with its model.safetensors (or config.json) damaged."""
    import shutil

    shutil.copytree(good, folder)
    weights, config = folder / "model.safetensors", folder / "config.json"
    if kind in SAFETENSORS_DAMAGE:
        weights.write_bytes(SAFETENSORS_DAMAGE[kind](weights.read_bytes()))
    elif kind == "config-deep":
        config.write_text('{"a":' * 100_000 + "1" + "}" * 100_000)
    elif kind == "config-mismatched-width":  # weights of another shape than the config describes
        cfg = json.loads(config.read_text())
        config.write_text(json.dumps({**cfg, "hidden_size": 2 * cfg["hidden_size"]}))
    elif kind == "config-layers-not-int":
        config.write_text(json.dumps({**json.loads(config.read_text()), "num_hidden_layers": "abc"}))
    elif kind == "missing-layers-0-1":
        from safetensors.torch import load_file, save_file

        tensors = load_file(weights)
        save_file({k: v for k, v in tensors.items() if ".layers.0." not in k and ".layers.1." not in k}, weights,
                  metadata={"format": "pt"})
    elif kind == "index-names-missing-shard":
        weights.rename(folder / "model-00001-of-00001.safetensors")
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../elsewhere"}}))
    else:
        raise KeyError(kind)
    return folder


SAFETENSORS_KINDS = [*SAFETENSORS_DAMAGE, "config-deep", "config-layers-not-int", "config-mismatched-width",
                     "missing-layers-0-1",
                     "index-names-missing-shard"]
