"""Models larger than host memory: decoder blocks stay in their safetensors files until the engine visits them.

    model = load_offloaded(folder, dtype)   # embeddings, final norm, head in memory; blocks on the meta device
    with block_placed(adapter, i, device):  # block i read from disk onto `device` ...
        ...                                 # ... and, when released, written to a scratch shard if it changed

`DiskBlocks` knows where every block tensor lives now: the source checkpoint's files, or the scratch shard written
when the block was last released after a change (tensor `_version` counters tell which blocks changed, so a
statistics-only or perplexity pass writes nothing). `save_offloaded` writes an ordinary sharded checkpoint (one
shard for what is in memory, one per block, and the index transformers reads), reading one block at a time. Peak
host memory: the in-memory part plus about one block, whatever the depth.
"""
from __future__ import annotations

import ctypes
import json
import logging
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import PrunepilotError
from ..guarded_reader import load_error

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"


def offload_store(model: nn.Module) -> "DiskBlocks | None":
    """The DiskBlocks of a model loaded by load_offloaded, else None."""
    return getattr(model, "prunepilot_offload", None)


def is_offloaded(model: nn.Module) -> bool:
    return offload_store(model) is not None


def on_meta(module: nn.Module) -> bool:
    """True when the module's parameters are not materialised (an offloaded block between visits)."""
    return any(p.is_meta for p in module.parameters())


def _tensor_files(folder: Path) -> dict[str, Path]:
    """{tensor name: safetensors file} of a checkpoint folder (one file, or shards with an index)."""
    index = folder / INDEX
    if index.is_file():
        return {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise PrunepilotError(f"--offload disk needs safetensors weights: {folder} has neither model.safetensors "
                              f"nor {INDEX}")
    with safe_open(single, "pt") as f:
        return {k: single for k in f.keys()}


def _read(where: dict[str, Path], names: list[str], device, dtype) -> dict[str, torch.Tensor]:
    """Tensors `names` from their files, floating ones cast to dtype, on `device`."""
    by_file: dict[Path, list[str]] = {}
    for n in names:
        by_file.setdefault(where[n], []).append(n)
    out = {}
    for file, keys in by_file.items():
        with safe_open(file, "pt", device="cpu") as f:
            for k in keys:
                t = f.get_tensor(k)
                out[k] = (t.to(dtype) if t.is_floating_point() else t).to(device)
    return out


class DiskBlocks:
    """Where each block's tensors are (source files or scratch shards); loads and releases blocks."""

    def __init__(self, model: nn.Module, folder: Path, dtype: torch.dtype, block_path: str, scratch: Path):
        self.where = _tensor_files(folder)
        self.dtype, self.scratch = dtype, scratch
        blocks = model.get_submodule(block_path)
        self.prefix = {id(b): f"{block_path}.{i}." for i, b in enumerate(blocks)}
        self.versions: dict[int, dict[str, int]] = {}
        self.written = 0

    def load(self, module: nn.Module, device) -> None:
        prefix = self.prefix[id(module)]
        names = list(module.state_dict())
        missing = [prefix + n for n in names if prefix + n not in self.where]
        if missing:
            raise PrunepilotError(f"the checkpoint has no tensor {missing[0]} (and {len(missing) - 1} more)")
        tensors = _read(self.where, [prefix + n for n in names], device, self.dtype)
        try:
            module.load_state_dict({n: tensors[prefix + n] for n in names}, assign=True, strict=True)
        except RuntimeError as e:  # shapes that are not the config's (a resized checkpoint, a damaged file)
            first = str(e).strip().splitlines()[-1].strip()
            raise PrunepilotError(f"block {prefix.rstrip('.')} does not match the model's config: {first}") from None
        module.to(device)  # buffers outside the state dict (non-persistent) follow
        self.versions[id(module)] = {n: t._version for n, t in module.state_dict().items()}

    def release(self, module: nn.Module) -> None:
        """Write the block to a scratch shard if any of its tensors changed since load, then free it."""
        prefix, before = self.prefix[id(module)], self.versions.pop(id(module), {})
        state = module.state_dict()
        if any(t._version != before.get(n, -1) for n, t in state.items()):
            self.scratch.mkdir(parents=True, exist_ok=True)
            file = self.scratch / f"{prefix}safetensors"
            save_file({prefix + n: t.detach().contiguous().cpu() for n, t in state.items()}, str(file))
            self.where.update({prefix + n: file for n in state})
            self.written += 1
        _free(module)
        _return_freed_memory()


def _return_freed_memory() -> None:
    """Give freed heap memory back to the OS (glibc): a released block's tensors (MBs each) land in malloc's heap
    once its adaptive mmap threshold has grown, and without a trim the process keeps them, block after block."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


_LIBC = _libc()


def _free(module: nn.Module) -> None:
    """Parameters and saved buffers to the meta device (memory released); buffers that are not saved (computed
    tables) back to the CPU, where load_offloaded made them."""
    for mod in module.modules():
        for n, p in list(mod._parameters.items()):
            if p is not None:
                mod._parameters[n] = nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad)
        for n, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[n] = b.to("cpu") if n in mod._non_persistent_buffers_set else b.to("meta")


@contextmanager
def block_placed(adapter, i: int, device):
    """Block i on `device` for the duration: moved there and back, or read from disk and released (offloaded).
    device None: where it is (an offloaded block: read onto the CPU)."""
    module = adapter.blocks[i]
    store = offload_store(adapter.model)
    if store is not None and on_meta(module):
        store.load(module, device or "cpu")
        try:
            yield module
        finally:
            store.release(module)
        return
    if device is None:
        yield module
        return
    home = next(module.parameters()).device
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def load_offloaded(folder: str | Path, dtype: torch.dtype, block_path_of, scratch: Path):
    """The model of `folder` with every decoder block left on disk (meta tensors) and the rest in host memory.
    block_path_of(model) -> the dotted path of the block list (ModelAdapter's)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    if not (folder / "config.json").is_file() or not (any(folder.glob("*.safetensors")) or (folder / INDEX).is_file()):
        raise PrunepilotError(f"--offload disk needs a folder with config.json and safetensors weights; {folder} "
                              "lacks one or both")
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary tables) computed
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - an unknown or broken config: one line, as the in-memory load
        raise load_error(folder, e) from e
    block_path = block_path_of(model)
    store = DiskBlocks(model, folder, dtype, block_path, scratch)
    absent = [k for k in model.state_dict() if k.startswith(block_path + ".") and k not in store.where]
    if absent:  # refused now, not as a KeyError when the block is first visited
        raise PrunepilotError(f"the checkpoint in {folder} does not cover the model: no tensor for {absent[0]} "
                              f"({len(absent)} block tensor(s) missing)")
    resident = [k for k in model.state_dict() if not k.startswith(block_path + ".")]
    have = [k for k in resident if k in store.where]
    try:
        model.load_state_dict(_read(store.where, have, "cpu", dtype), strict=False, assign=True)
    except RuntimeError as e:  # shapes of another model than config.json describes
        detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
        raise PrunepilotError(f"the checkpoint in {folder} does not match its config.json: {detail}") from None
    model.tie_weights()  # an lm_head tied to the embeddings follows the loaded embeddings
    left = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(block_path + ".")]
    if left:
        raise PrunepilotError(f"the checkpoint in {folder} has no tensor for {left[0]}")
    model.prunepilot_offload = store
    return model.eval()


def save_offloaded(model: nn.Module, folder: Path) -> None:
    """An ordinary sharded safetensors checkpoint of an offloaded model: shard 1 = what is in memory, then one
    shard per block read from wherever it is now (one block in memory at a time); config and index."""
    store = offload_store(model)
    folder.mkdir(parents=True, exist_ok=True)
    blocks = list(store.prefix.values())  # block order, one prefix each
    n = 1 + len(blocks)
    name = lambda k: f"model-{k:05d}-of-{n:05d}.safetensors"  # noqa: E731
    ptrs, resident = set(), {}
    for k, t in model.state_dict().items():  # tied tensors once (transformers re-ties them on load)
        if not t.is_meta and t.data_ptr() not in ptrs:
            ptrs.add(t.data_ptr())
            resident[k] = t.detach().contiguous().cpu()
    size = lambda ts: sum(t.numel() * t.element_size() for t in ts.values())  # noqa: E731
    weight_map, total = {k: name(1) for k in resident}, size(resident)
    save_file(resident, str(folder / name(1)), metadata={"format": "pt"})
    for j, prefix in enumerate(blocks, start=2):
        tensors = _read(store.where, [k for k in store.where if k.startswith(prefix)], "cpu", store.dtype)
        save_file(tensors, str(folder / name(j)), metadata={"format": "pt"})
        weight_map.update({k: name(j) for k in tensors})
        total += size(tensors)
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)

