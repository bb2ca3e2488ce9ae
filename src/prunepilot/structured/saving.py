"""Saving and reloading structurally pruned models.

Uniform widths (every layer keeps the same MLP width and head counts) whose shapes the architecture's own
config can express (intermediate_size, num_attention_heads, num_key_value_heads, explicit head_dim, and
attention_bias / mlp_bias for compensation biases) are saved as an ordinary checkpoint that plain
``AutoModelForCausalLM.from_pretrained`` loads. The config flags may create biases the pruned model does
not have (llama's attention_bias also adds q/k/v biases): those are saved as zeros, so the function is
unchanged. Whether the config expresses the model is checked, not assumed: a meta-device model is built
from the candidate config and its parameter shapes compared with ours.

Everything else (per-layer widths, biases the arch cannot declare) is saved with the original config plus
``prunepilot_widths.json``; ``load_pruned`` builds the model from the config, shrinks every block to the
recorded widths, then loads the state dict.
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch

from ..engine import ModelAdapter
from ..engine.layout import is_uniform, model_widths
from ..engine.model_config import text_config
from ..engine.offload import is_offloaded
from ..errors import PrunepilotError
from ..io import atomic_dir
from ..guarded_reader import load_error
from ..modelfiles import gguf_detached, parse_dtype, save_model_files, save_tokenizer
from .slicing import shrink_block

log = logging.getLogger(__name__)

WIDTHS_FILE = "prunepilot_widths.json"
FORMAT = "prunepilot-structured/1"


def write_widths(text_cfg, w: dict) -> dict:
    """Set one layer's widths (block_widths) as the config's model-wide widths; returns the previous values."""
    new = {"intermediate_size": w["intermediate_size"], "num_attention_heads": w["num_heads"],
           "num_key_value_heads": w["num_kv_heads"], "head_dim": w["head_dim"]}
    old = {k: getattr(text_cfg, k, None) for k in new}
    for k, v in new.items():
        setattr(text_cfg, k, v)
    return old


def _meta_shapes(model, cfg) -> dict[str, tuple] | None:
    """Parameter shapes of the model `cfg` describes (built on the meta device), or None if cfg is rejected."""
    try:
        if hasattr(cfg, "validate"):
            cfg.validate()  # e.g. llama needs hidden_size % num_attention_heads == 0
        with torch.device("meta"):
            ref = type(model)._from_config(cfg)
    except Exception as e:  # the config rejects these widths
        log.debug("config rejected: %s", e)
        return None
    return {k: tuple(v.shape) for k, v in ref.state_dict().items()}


def _plain_copy(config):
    cfg = copy.deepcopy(config)
    cfg.__dict__.pop("quantization_config", None)  # GGUF weights are plain floats once loaded
    return cfg


def matches_config(model) -> bool:
    """True when the model has exactly the parameters its own config describes (not resized, no added biases)."""
    expected = _meta_shapes(model, _plain_copy(model.config))
    return expected is not None and expected == {k: tuple(v.shape) for k, v in model.state_dict().items()}


def plain_config(model, widths: list[dict]):
    """(config, zero-filled keys) if plain transformers can rebuild this model exactly, else None.

    """
    if not is_uniform(widths):
        return None
    w = widths[0]
    cfg = _plain_copy(model.config)
    tc = text_config(cfg)
    write_widths(tc, w)
    for flag, needed in (("attention_bias", w["o_bias"]), ("mlp_bias", w["down_bias"])):
        if needed and not getattr(tc, flag, False):
            if not hasattr(tc, flag):
                return None
            setattr(tc, flag, True)
    expected = _meta_shapes(model, cfg)
    if expected is None:
        return None
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if any(expected.get(k) != s for k, s in ours.items()):
        return None
    extra = [k for k in expected if k not in ours]
    if not all(k.endswith(".bias") for k in extra):
        return None
    return cfg, {k: expected[k] for k in extra}


def save_pruned(model, tokenizer, path: str | Path, overwrite: bool = False) -> Path:
    """Save a pruned model (and tokenizer) atomically: a temp folder, then one rename.

    A model that still matches its config (unstructured pruning) is an ordinary save_pretrained; a resized one is
    saved with a config stating its uniform widths when that can express it, else with prunepilot_widths.json."""
    with atomic_dir(path, overwrite=overwrite) as tmp:
        if is_offloaded(model) or matches_config(model):
            save_model_files(model, tokenizer, tmp)
        else:
            _save_resized(model, tmp)
            save_tokenizer(tokenizer, tmp)
    return Path(path)


def _save_resized(model, folder: Path) -> None:
    adapter, head_dim, widths = model_widths(model)
    plain = plain_config(model, widths)
    with gguf_detached(model):
        if plain is not None:
            cfg, zeros = plain
            state = dict(model.state_dict())
            ref = next(iter(state.values()))
            for k, shape in zeros.items():  # biases the config creates but the model lacks: exact zeros
                state[k] = torch.zeros(shape, dtype=ref.dtype, device=ref.device)
            model.save_pretrained(folder, state_dict=state)
            cfg.save_pretrained(folder)  # the shrunk config replaces the one save_pretrained wrote
            log.info("saved %s: uniform widths, loads with plain from_pretrained", folder)
        else:  # prunepilot's own layout: the fused tensors as they are (transformers would unfuse MoE experts)
            model.save_pretrained(folder, save_original_format=False)
            info = {"format": FORMAT, "model_type": adapter.model_type, "head_dim": head_dim, "layers": widths}
            (folder / WIDTHS_FILE).write_text(json.dumps(info, indent=1) + "\n")
            log.info("saved %s: per-layer widths in %s (load with prunepilot load_pruned)", folder, WIDTHS_FILE)


def _load_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = folder / "model.safetensors"
    if single.exists():
        return load_file(single)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(folder / shard))
        return state
    raise PrunepilotError(f"{folder} holds no model.safetensors (or sharded index)")


def load_pruned(path: str | Path, dtype: str | torch.dtype = "float32", device: str = "cpu",
                attn_implementation: str | None = None):
    """Load a model saved by save_pruned (either kind), in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    folder = Path(path)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if not folder.is_dir():
        raise PrunepilotError(f"pruned model folder {folder} does not exist")
    widths_file = folder / WIDTHS_FILE
    if not widths_file.exists():
        try:
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=parse_dtype(dtype),
                                                         trust_remote_code=False, **kwargs)
        except Exception as e:  # noqa: BLE001
            raise load_error(folder, e) from e
        return model.to(device).eval()
    try:
        info = json.loads(widths_file.read_text())
    except json.JSONDecodeError as e:
        raise PrunepilotError(f"{widths_file} is not valid JSON ({e.msg})") from None
    if info.get("format") != FORMAT:
        raise PrunepilotError(f"{widths_file}: unknown format {info.get('format')!r} (expected {FORMAT})")
    config = AutoConfig.from_pretrained(str(folder), **kwargs)
    with no_init_weights():  # built in the target dtype: buffers such as rotary inv_freq stay as from_pretrained keeps them
        model = AutoModelForCausalLM.from_config(config, dtype=parse_dtype(dtype), **kwargs)
    model.tie_weights()  # no_init_weights skips the tying post_init would do
    adapter = ModelAdapter(model)
    if len(info["layers"]) != len(adapter.blocks):
        raise PrunepilotError(f"{widths_file} has {len(info['layers'])} layers, the config {len(adapter.blocks)}")
    for block, widths in zip(adapter.blocks, info["layers"]):
        shrink_block(block, widths, info["head_dim"])
    try:
        state = _load_state(folder)
    except PrunepilotError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged safetensors file
        raise load_error(folder, e) from e
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise PrunepilotError(f"{folder}: weights do not match the recorded widths: {str(e).splitlines()[0]}") from None
    tied = {id(p) for p in (model.get_input_embeddings().weight,)}
    untied = [k for k in missing if id(model.get_parameter(k)) not in tied] if missing else []
    if untied or unexpected:
        raise PrunepilotError(f"{folder}: checkpoint does not match the model: missing {untied[:3]}, "
                              f"unexpected {list(unexpected)[:3]}")
    return model.to(device).eval()
