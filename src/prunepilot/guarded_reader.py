"""The one gate every command that reads a model (prune, agent, eval, export) passes before loading it.

check_model_input(path, gguf_file) looks at a local model's files without loading them: a GGUF through
guarded_gguf; safetensors headers (declared length, JSON, dtypes, shapes and data offsets against the file
size); the shard index (every file present, inside the folder); config.json (size/depth-bounded JSON, a mapping,
a sane layer count); whether the weights cover every layer the config declares and are as wide as it says (a
checkpoint missing layers 0-1 was loaded with those layers filled at random). Any problem is one PrunepilotError naming the file.
Hub names (not local paths) are left to transformers. load_error turns what a loader raised anyway into one line.
"""
from __future__ import annotations

import math
import re
import struct
from pathlib import Path

from .bounded_json import BoundedJsonError, loads_bounded
from .errors import PrunepilotError
from .guarded_gguf import check_gguf

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
MAX_LAYERS = 10_000
ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
              "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
INDEX = "model.safetensors.index.json"
EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")
_LAYER = re.compile(r"\.(?:layers|h|blocks|decoder\.layers)\.(\d+)\.")


def _json_file(path: Path, what: str):
    try:
        return loads_bounded(path.read_bytes(), max_depth=16)
    except BoundedJsonError as e:
        raise PrunepilotError(f"{path}: damaged {what}: {e}") from None
    except OSError as e:
        raise PrunepilotError(f"cannot read {path}: {e.strerror or e}") from None


def _safetensors_header(path: Path) -> dict:
    """{tensor name: entry} of one safetensors file, every entry checked against the file size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= min(size - 8, MAX_HEADER_BYTES):
            raise PrunepilotError(f"{path}: damaged safetensors file: header length {n} for a {size}-byte file")
        try:
            header = loads_bounded(f.read(n), max_depth=4)
        except BoundedJsonError as e:
            raise PrunepilotError(f"{path}: damaged safetensors file: header is {e}") from None
    if not isinstance(header, dict):
        raise PrunepilotError(f"{path}: damaged safetensors file: header is not a JSON object")
    header.pop("__metadata__", None)
    for name, entry in header.items():
        _check_entry(path, name, entry, size - 8 - n)
    return header


def _check_entry(path: Path, name: str, entry, data_bytes: int) -> None:
    ok = isinstance(entry, dict) and entry.get("dtype") in ITEM_BYTES and isinstance(entry.get("shape"), list) \
        and all(type(d) is int and d >= 0 for d in entry["shape"]) and isinstance(entry.get("data_offsets"), list) \
        and len(entry["data_offsets"]) == 2 and all(type(o) is int for o in entry["data_offsets"])
    if not ok:
        raise PrunepilotError(f"{path}: damaged safetensors file: tensor {name!r} has a malformed entry")
    start, end = entry["data_offsets"]
    nbytes = math.prod(entry["shape"]) * ITEM_BYTES[entry["dtype"]]
    if not 0 <= start <= end <= data_bytes or end - start != nbytes:
        raise PrunepilotError(f"{path}: damaged or truncated safetensors file: tensor {name!r} needs bytes "
                              f"{start}-{start + nbytes}, the file holds {data_bytes}")


def _shards(folder: Path) -> list[Path]:
    index = folder / INDEX
    if not index.is_file():
        return sorted(folder.glob("*.safetensors"))
    data = _json_file(index, "shard index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise PrunepilotError(f"{index}: damaged shard index: no weight_map of tensor name -> file")
    files = sorted(set(weight_map.values()))
    for name in files:
        if Path(name).name != name or not (folder / name).is_file():
            raise PrunepilotError(f"{index} names shard {name!r}, which is not a file in {folder}")
    return [folder / name for name in files]


def _text_config(folder: Path) -> dict:
    config = _json_file(folder / "config.json", "config.json")
    if not isinstance(config, dict):
        raise PrunepilotError(f"{folder / 'config.json'}: damaged config.json: not a JSON object")
    return config.get("text_config") if isinstance(config.get("text_config"), dict) else config


def _declared_layers(folder: Path) -> int | None:
    """num_hidden_layers (or n_layer / num_layers) of config.json, checked to be a sane integer."""
    text = _text_config(folder)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if key in text:
            value = text[key]
            if type(value) is not int or not 1 <= value <= MAX_LAYERS:
                raise PrunepilotError(f"{folder / 'config.json'}: {key} is {value!r}; expected 1 to {MAX_LAYERS}")
            return value
    return None


def weight_shapes(folder: Path) -> dict[str, list[int]]:
    """{name: shape} of every tensor in the folder's safetensors files (each file's header checked)."""
    shapes: dict[str, list[int]] = {}
    for shard in _shards(folder):
        shapes.update({name: entry["shape"] for name, entry in _safetensors_header(shard).items()})
    return shapes


def _check_width(folder: Path, shapes: dict[str, list[int]]) -> None:
    """hidden_size (n_embd) as wide as the token embedding present: a hostile config cannot make the loader
    build a model far larger than its weights."""
    text = _text_config(folder)
    width = next((text[k] for k in ("word_embed_proj_dim", "hidden_size", "n_embd", "d_model") if k in text), None)
    embed = next((shape for name, shape in shapes.items() if name.endswith(EMBEDDINGS)), None)
    if width is not None and (type(width) is not int or (embed and len(embed) == 2 and embed[1] != width)):
        raise PrunepilotError(f"{folder / 'config.json'}: hidden size {width!r} does not match the token "
                              f"embedding in the weights (shape {embed})")


def check_weights_cover_config(folder: Path, shapes: dict[str, list[int]]) -> None:
    """Refuse weights that leave layers of the config out (transformers would fill them at random) or whose
    embedding width is not the config's."""
    names = shapes.keys()
    if (folder / "config.json").is_file():
        _check_width(folder, shapes)
    declared = _declared_layers(folder) if (folder / "config.json").is_file() else None
    present = {int(m.group(1)) for n in names if (m := _LAYER.search("." + n))}
    if declared and present and not set(range(declared)) <= present:
        missing = sorted(set(range(declared)) - present)
        raise PrunepilotError(f"{folder}: the weights do not cover the model: config.json declares {declared} "
                              f"layers, the weights hold none for layer(s) {_ranges(missing)}")


def _ranges(numbers: list[int]) -> str:
    text = ", ".join(map(str, numbers[:8]))
    return text + (f" ... ({len(numbers)} in all)" if len(numbers) > 8 else "")


def load_error(path, e: Exception) -> PrunepilotError:
    """One line for a model or tokenizer that cannot be loaded, whatever the library raised."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "trust_remote_code" in str(e):
        return PrunepilotError(f"{path} needs its own Python code (trust_remote_code): prunepilot loads only "
                               "architectures that transformers ships")
    if type(e).__name__ == "SafetensorError":
        return PrunepilotError(f"{path}: a weights file is damaged or truncated ({text})")
    return PrunepilotError(f"cannot load {path}: {type(e).__name__}: {text}")


def check_model_input(path: str | Path, gguf_file: str | None = None) -> None:
    """Raise PrunepilotError (one line) for a local model whose files are damaged, hostile or incomplete."""
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            check_gguf(path)
        return
    if not path.is_dir():
        return  # a hub name, or a missing path the loader names
    if gguf_file:
        return check_gguf(path / gguf_file)
    if any(path.glob("*.safetensors")) or (path / INDEX).is_file():
        check_weights_cover_config(path, weight_shapes(path))
    elif not any(path.glob("*.bin")) and len(ggufs := sorted(path.glob("*.gguf"))) >= 1:
        check_gguf(ggufs[0])
    elif (path / "config.json").is_file():
        _declared_layers(path)
