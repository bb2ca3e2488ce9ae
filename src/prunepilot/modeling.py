"""Loading models and tokenizers from local folders (safetensors, GGUF, SentencePiece) or hub names, and saving
(structurally) pruned models so that they load again.

A pruned model with uniform widths (every layer keeps the same MLP width and head counts) whose shapes the
architecture's own config can express (intermediate_size, num_attention_heads, num_key_value_heads, explicit
head_dim, and attention_bias / mlp_bias for compensation biases) is saved as an ordinary checkpoint that plain
``AutoModelForCausalLM.from_pretrained`` loads. The config flags may create biases the pruned model does not have
(llama's attention_bias also adds q/k/v biases): those are saved as zeros, so the function is unchanged. Whether
the config expresses the model is checked, not assumed: a meta-device model is built from the candidate config
and its parameter shapes compared with ours. Everything else is saved in the per-layer widths format
(structured/saving.py), which ``load_pruned`` reads.
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch

from .engine.layout import is_uniform, model_widths
from .engine.model_config import text_config
from .engine.offload import is_offloaded
from .errors import PrunepilotError
from .guarded_reader import check_model_input, load_error
from .io import atomic_dir
from .modelfiles import gguf_detached, parse_dtype, save_model_files, save_tokenizer
from .structured.saving import WIDTHS_FILE, read_widths_file, shrink_to_widths, write_widths, write_widths_file

log = logging.getLogger(__name__)

class SentencePieceTokenizer:
    """Minimal tokenizer over a SentencePiece .model file (llama2.c models such as stories260K).

    Offers the small part of the Hugging Face tokenizer interface prunepilot uses:
    ``encode``, ``decode``, ``__call__`` (returning input_ids), bos/eos/pad ids and ``len``.
    """

    def __init__(self, model_file: str | Path):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.bos_token_id = self.sp.bos_id()
        self.eos_token_id = self.sp.eos_id()
        self.pad_token_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_token_id
        self.padding_side = "right"
        self.name_or_path = str(model_file)

    def __len__(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str, add_special_tokens: bool = True, **_) -> list[int]:
        ids = self.sp.encode(text)
        return [self.bos_token_id] + ids if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = True, **_) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.sp.decode([int(i) for i in ids])

    def __call__(self, text, add_special_tokens: bool = True, return_tensors=None, **_):
        if isinstance(text, str):
            ids = self.encode(text, add_special_tokens)
            return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}
        return {"input_ids": [self.encode(t, add_special_tokens) for t in text]}

    def save_pretrained(self, path: str | Path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "tokenizer.model").write_bytes(self.sp.serialized_model_proto())


def _find_gguf(folder: Path) -> str | None:
    files = sorted(folder.glob("*.gguf"))
    return files[0].name if files else None


def load_tokenizer(path: str | Path, gguf_file: str | None = None):
    """Tokenizer for a local folder (HF files, GGUF, or a SentencePiece .model) or a hub name."""
    from transformers import AutoTokenizer

    folder = Path(path)
    if folder.is_dir():
        has_hf = any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
        gguf_file = gguf_file or (None if has_hf else _find_gguf(folder))
        if not has_hf and gguf_file is None:
            sp_files = sorted(folder.glob("*.model"))
            if sp_files:
                return SentencePieceTokenizer(sp_files[0])
            raise PrunepilotError(f"no tokenizer found in {folder} (expected tokenizer.json, a .gguf or a .model)")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise load_error(path, e) from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str | Path, dtype: str | torch.dtype = "float32", device: str = "cpu",
               gguf_file: str | None = None):
    """Load a causal LM from a local folder (safetensors or GGUF) or a hub name, in eval mode."""
    from transformers import AutoModelForCausalLM

    folder = Path(path)
    if not folder.exists() and (str(path).startswith((".", "/", "~")) or str(path).count("/") > 1):
        raise PrunepilotError(f"model path {path} does not exist")
    check_model_input(folder, gguf_file)  # damaged, hostile or incomplete files: one line, before loading
    if folder.is_dir():
        if (folder / WIDTHS_FILE).exists():
            return load_pruned(folder, dtype=dtype, device=device)
        has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))
        if not has_weights:
            gguf_file = gguf_file or _find_gguf(folder)
            if gguf_file is None:
                raise PrunepilotError(f"{folder} holds no model weights (*.safetensors, *.bin or *.gguf)")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:  # never run a checkpoint's own code, and never prompt for it
        model, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=parse_dtype(dtype),
                                                           trust_remote_code=False, output_loading_info=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - transformers / safetensors raise many kinds; the user gets one line
        raise load_error(path, e) from e
    if info.get("missing_keys"):  # transformers would have filled them at random
        missing = sorted(info["missing_keys"])
        raise PrunepilotError(f"{path}: the weights do not cover the model: {len(missing)} weight(s) missing, "
                              f"e.g. {', '.join(missing[:3])}")
    return model.to(device).eval()


def load_model_and_tokenizer(path: str | Path, dtype: str | torch.dtype = "float32", device: str = "cpu",
                             gguf_file: str | None = None):
    model = load_model(path, dtype=dtype, device=device, gguf_file=gguf_file)
    return model, load_tokenizer(path, gguf_file=gguf_file)


# ---------------------------------------------------------------------------------------------- pruned models

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
    """(config, zero-filled keys) if plain transformers can rebuild this model exactly, else None."""
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
            write_widths_file(folder, adapter.model_type, head_dim, widths)
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


def _load_recorded_state(model, folder: Path) -> None:
    """Load the saved weights into a model already shrunk to the recorded widths."""
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


def load_pruned(path: str | Path, dtype: str | torch.dtype = "float32", device: str = "cpu",
                attn_implementation: str | None = None):
    """Load a model saved by save_pruned (either kind), in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    folder = Path(path)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if not folder.is_dir():
        raise PrunepilotError(f"pruned model folder {folder} does not exist")
    if not (folder / WIDTHS_FILE).exists():
        try:
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=parse_dtype(dtype),
                                                         trust_remote_code=False, **kwargs)
        except Exception as e:  # noqa: BLE001
            raise load_error(folder, e) from e
        return model.to(device).eval()
    info = read_widths_file(folder)
    config = AutoConfig.from_pretrained(str(folder), **kwargs)
    with no_init_weights():  # built in the target dtype: buffers such as rotary inv_freq stay as from_pretrained keeps them
        model = AutoModelForCausalLM.from_config(config, dtype=parse_dtype(dtype), **kwargs)
    model.tie_weights()  # no_init_weights skips the tying post_init would do
    shrink_to_widths(model, info, folder)
    _load_recorded_state(model, folder)
    return model.to(device).eval()
