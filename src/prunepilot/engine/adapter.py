"""Architecture adapter: where a decoder-only HF model keeps its blocks, linears and attention geometry."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import PrunepilotError
from .model_config import text_config
from .moe import ExpertMatrix, expert_matrices, fused_experts, layout_problem

# Attribute paths to the ModuleList of decoder blocks, tried in order.
BLOCK_PATHS = ("model.layers", "model.language_model.layers", "transformer.h", "model.decoder.layers",
               "gpt_neox.layers", "transformer.blocks")


def submodule(module, path: str):
    """The attribute at dotted `path` below `module` ("" is module itself), None if absent."""
    for part in filter(None, path.split(".")):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def is_conv1d(module) -> bool:
    """GPT-2's Conv1D: a linear layer that stores its weight as (in, out)."""
    return type(module).__name__ == "Conv1D"


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or GPT-2's Conv1D."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def weight_2d(module: nn.Module | ExpertMatrix) -> torch.Tensor:
    """The weight as an (out, in) view: writing into it writes into the module (or the fused expert parameter)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def grad_2d(module: nn.Module | ExpertMatrix) -> torch.Tensor | None:
    """The gradient of weight_2d(module), same layout."""
    if isinstance(module, ExpertMatrix):
        return module.grad
    g = module.weight.grad
    return None if g is None else (g.t() if is_conv1d(module) else g)


def leaf_parameter(module: nn.Module | ExpertMatrix) -> nn.Parameter:
    """The parameter that holds the weight (for an expert: the whole fused 3-D parameter)."""
    return module.parameter if isinstance(module, ExpertMatrix) else module.weight


def is_router(name: str, module: nn.Module, block: nn.Module) -> bool:
    """An MoE router: a module named router / *_expert_gate, a *Router class, or a `gate` beside `experts`."""
    parent, _, last = name.rpartition(".")
    if type(module).__name__.lower().endswith("router") or last == "router" or last.endswith("expert_gate"):
        return True
    return last == "gate" and hasattr(block.get_submodule(parent) if parent else block, "experts")


@dataclass
class Coverage:
    """Every weight matrix inside the decoder blocks: pruned (eligible) or excluded, with the reason."""
    eligible_params: int = 0
    excluded_params: int = 0
    excluded: dict[str, str] = field(default_factory=dict)   # weight name -> reason

    def to_dict(self) -> dict:
        return {"eligible_params": self.eligible_params, "excluded_params": self.excluded_params,
                "excluded": dict(self.excluded),
                "denominator": "global_sparsity counts zeros among the eligible parameters only"}


@dataclass
class BlockScan:
    """What block i holds: prunable matrices (linears, experts), MoE routers, and weights no method handles."""
    prunable: dict[str, nn.Module | ExpertMatrix] = field(default_factory=dict)
    routers: dict[str, int] = field(default_factory=dict)      # weight name -> numel
    unhandled: dict[str, str] = field(default_factory=dict)    # weight name -> what it is
    sizes: dict[str, int] = field(default_factory=dict)        # weight name -> numel, for unhandled ones


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
            blocks = submodule(model, path)
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

    def scan(self, i: int) -> BlockScan:
        """Every weight matrix of block i (parameters with 2 or more dimensions), sorted into what can be pruned
        (nn.Linear / Conv1D, experts in fused 3-D parameters), MoE routers and anything else."""
        prefix, block, out = self.block_name(i), self.blocks[i], BlockScan()
        seen: set[int] = set()
        for name, mod in block.named_modules():
            full = f"{prefix}.{name}" if name else prefix
            if is_linear(mod) or (name and is_router(name, mod, block)):
                if name and is_router(name, mod, block):
                    out.routers.update({f"{full}.{n}": p.numel() for n, p in mod.named_parameters() if p.dim() >= 2})
                else:
                    out.prunable[full] = mod
                seen.update(id(p) for p in mod.parameters())
            elif fused_experts(mod):
                seen.update((id(mod.gate_up_proj), id(mod.down_proj)))
                problem = layout_problem(mod)
                if problem is None:
                    out.prunable.update(expert_matrices(mod, full))
                else:
                    out.unhandled[full] = f"a set of fused experts in an unsupported layout ({problem})"
                    out.sizes[full] = mod.gate_up_proj.numel() + mod.down_proj.numel()
        for name, p in block.named_parameters():
            if p.dim() >= 2 and id(p) not in seen:
                out.unhandled[f"{prefix}.{name}"] = f"a {tuple(p.shape)} parameter that is not a linear layer's weight"
                out.sizes[f"{prefix}.{name}"] = p.numel()
        return out

    def linears(self, i: int) -> dict[str, nn.Module | ExpertMatrix]:
        """Prunable matrices of block i (linears; one entry per expert matrix of fused MoE experts), keyed by full
        name, in module order, after include/ignore."""
        return {n: m for n, m in self.scan(i).prunable.items() if self._wanted(n)}

    def coverage(self) -> Coverage:
        """Where every block weight goes. A weight no method handles stops the run unless include/ignore
        excludes it explicitly."""
        cov = Coverage()
        for i in range(len(self.blocks)):
            sc = self.scan(i)
            for name, m in sc.prunable.items():
                if self._wanted(name):
                    cov.eligible_params += weight_2d(m).numel()
                else:
                    cov.excluded[name], cov.excluded_params = "excluded by include/ignore", \
                        cov.excluded_params + weight_2d(m).numel()
            for name, n in sc.routers.items():
                cov.excluded[name], cov.excluded_params = "MoE router (kept dense by design)", cov.excluded_params + n
            for name, what in sc.unhandled.items():
                if self._wanted(name):
                    raise PrunepilotError(f"{name} is {what}: no prunepilot method handles it; exclude it "
                                          f"explicitly with --ignore '{re.escape(name)}' (or a pattern for all layers)")
                cov.excluded[name] = f"excluded by include/ignore ({what})"
                cov.excluded_params += sc.sizes[name]
        return cov

    def all_linears(self) -> dict[str, nn.Module]:
        out = {}
        for i in range(len(self.blocks)):
            out.update(self.linears(i))
        return out

    def attention_geometry(self) -> AttentionGeometry:
        """Heads, KV heads and head_dim, read from the config (Qwen3/Gemma head_dim may differ from
        hidden_size / num_heads, so it is never derived when the config states it)."""
        cfg = text_config(self.config)
        heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
        if heads is None:
            raise PrunepilotError(f"{self.model_type}: config has no num_attention_heads")
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return AttentionGeometry(int(heads), int(kv), int(head_dim))
