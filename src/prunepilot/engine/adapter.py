"""Architecture adapter: where a decoder-only HF model keeps its blocks, linears and attention geometry."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import PrunepilotError

# Attribute paths to the ModuleList of decoder blocks, tried in order.
BLOCK_PATHS = ("model.layers", "model.language_model.layers", "transformer.h", "model.decoder.layers",
               "gpt_neox.layers", "transformer.blocks")


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or GPT-2's Conv1D (a linear layer that stores its weight as (in, out))."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def weight_2d(module: nn.Module) -> torch.Tensor:
    """The weight as an (out, in) view: writing into it writes into the module."""
    return module.weight.t() if type(module).__name__ == "Conv1D" else module.weight


@dataclass
class AttentionGeometry:
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:  # query heads per KV head
        return self.num_heads // self.num_kv_heads


class ModelAdapter:
    """Finds decoder blocks and their prunable linears, with include/ignore regex patterns.

    Linear names are full module names (``model.layers.3.mlp.down_proj``); ``include`` keeps only names
    matching one of its patterns, ``ignore`` drops names matching any (re.search semantics).
    """

    def __init__(self, model: nn.Module, include: list[str] | None = None, ignore: list[str] | None = None):
        self.model = model
        self.config = model.config
        for path in BLOCK_PATHS:
            blocks = _get(model, path)
            if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
                self.block_path = path
                self.blocks = blocks
                break
        else:
            raise PrunepilotError(
                f"unsupported architecture {type(model).__name__} ({getattr(self.config, 'model_type', '?')}): "
                f"no decoder blocks found at any of {', '.join(BLOCK_PATHS)}")
        try:
            self.include = [re.compile(p) for p in (include or [])]
            self.ignore = [re.compile(p) for p in (ignore or [])]
        except re.error as e:
            raise PrunepilotError(f"bad include/ignore pattern: {e}") from None

    @property
    def model_type(self) -> str:
        return getattr(self.config, "model_type", type(self.model).__name__)

    def __len__(self) -> int:
        return len(self.blocks)

    def block_name(self, i: int) -> str:
        return f"{self.block_path}.{i}"

    def _wanted(self, name: str) -> bool:
        if self.include and not any(p.search(name) for p in self.include):
            return False
        return not any(p.search(name) for p in self.ignore)

    def linears(self, i: int) -> dict[str, nn.Module]:
        """Prunable linears of block i, keyed by full module name, in module order."""
        prefix = self.block_name(i)
        found = {f"{prefix}.{n}": m for n, m in self.blocks[i].named_modules() if is_linear(m)}
        return {n: m for n, m in found.items() if self._wanted(n)}

    def all_linears(self) -> dict[str, nn.Module]:
        out = {}
        for i in range(len(self.blocks)):
            out.update(self.linears(i))
        return out

    def text_config(self):
        cfg = self.config
        return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg

    def attention_geometry(self) -> AttentionGeometry:
        """Heads, KV heads and head_dim, read from the config (Qwen3/Gemma head_dim may differ from
        hidden_size / num_heads, so it is never derived when the config states it)."""
        cfg = self.text_config()
        heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
        if heads is None:
            raise PrunepilotError(f"{self.model_type}: config has no num_attention_heads")
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return AttentionGeometry(int(heads), int(kv), int(head_dim))
