"""A model's files on disk: dtype names, GGUF-loaded models saved as float weights, the tokenizer beside them."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .errors import PrunepilotError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise PrunepilotError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def _is_gguf(model) -> bool:
    q = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(q, "quantization_config", None), "quant_method", None)
    return q is not None and str(getattr(method, "value", method)).lower() == "gguf"


@contextlib.contextmanager
def gguf_detached(model):
    """GGUF checkpoints are dequantized to ordinary float weights at load, but transformers keeps a GGUF
    quantizer attached that makes save_pretrained refuse; detach it (and its config entry) while saving,
    so the saved folder is an ordinary float checkpoint."""
    if not _is_gguf(model):
        yield
        return
    saved = {k: getattr(model, k) for k in ("hf_quantizer", "is_quantized", "quantization_method") if hasattr(model, k)}
    qcfg = model.config.__dict__.pop("quantization_config", None)
    try:
        model.hf_quantizer, model.is_quantized = None, False
        yield
    finally:
        for k, v in saved.items():
            setattr(model, k, v)
        if qcfg is not None:
            model.config.quantization_config = qcfg


def save_tokenizer(tokenizer, folder: str | Path) -> None:
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(folder)


def save_model_files(model, tokenizer, folder: str | Path) -> None:
    """model.save_pretrained + tokenizer into `folder` (GGUF-loaded models are saved as float weights).
    Not atomic by itself: callers write into a temporary folder (io.atomic_dir)."""
    from .engine.offload import is_offloaded, save_offloaded

    if is_offloaded(model):  # blocks on disk: written one at a time
        save_offloaded(model, Path(folder))
    else:
        with gguf_detached(model):
            model.save_pretrained(folder)
    save_tokenizer(tokenizer, folder)
