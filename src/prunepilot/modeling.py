"""Loading models and tokenizers from local folders (safetensors, GGUF, SentencePiece) or hub names."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from .errors import PrunepilotError
from .guarded_reader import check_model_input, load_error
from .modelfiles import parse_dtype
from .structured.saving import WIDTHS_FILE, load_pruned

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
