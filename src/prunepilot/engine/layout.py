"""Where a decoder block keeps its parts: the MLP, attention and MoE roles of its modules, and the widths and head
counts read from them. Structured pruning slices these parts, FLOP counting and GGUF export read them; a new
architecture is taught here.

Supported block layouts (anything else is a PrunepilotError, never a shape error deep inside torch):

    MLP        gated:  mlp.gate_proj / mlp.up_proj rows  +  mlp.down_proj columns   (llama, qwen, mistral, gemma)
               fused:  mlp.gate_up_proj rows j and I + j +  mlp.down_proj column j  (phi3: [gate; up] in one linear)
               plain:  fc1 rows (+bias)                  +  fc2 columns             (opt-style, block.fc1 or mlp.fc1)
               MoE:    mlp.experts as fused 3-D gate_up_proj / down_proj (engine/moe.py), router mlp.gate
    attention  self_attn.{q,k,v}_proj rows  +  self_attn.{o_proj|out_proj} columns
               fused:  self_attn.qkv_proj rows [q (H*hd); k (KV*hd); v (KV*hd)]  (phi3)
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import PrunepilotError
from .adapter import ModelAdapter, is_linear, submodule
from .moe import fused_experts, layout_problem

GATED_MLP = ("gate_proj", "up_proj", "down_proj")
ATTN_NAMES = ("self_attn", "attn", "self_attention")
O_NAMES = ("o_proj", "out_proj")


@dataclass
class MLPParts:
    owner: str            # module holding the MLP linears, relative to the block ("mlp" or "")
    ins: list[str]        # projections whose output rows are channels: gate_proj, up_proj (or fc1, or gate_up_proj)
    out: str              # projection whose input columns are channels: down_proj (or fc2)
    fused: bool = False   # ins is one [gate; up] linear: channel j is its rows j and width + j

    def rows_per_channel(self) -> int:
        return 2 if self.fused else 1


@dataclass
class MoEParts:
    """Experts kept as fused 3-D parameters: gate_up_proj (E, 2I, H), down_proj (E, H, I) (engine/moe.py).
    Every expert keeps the same number of channels (the tensors stay 3-D), each expert choosing its own."""
    owner: str            # "mlp"
    experts: str          # "mlp.experts"
    router: str = "mlp.gate"

    fused = False

    @property
    def out(self) -> str:  # no bias to compensate into: fused experts have none
        return ""


@dataclass
class AttnParts:
    owner: str            # attention module, relative to the block ("self_attn")
    q: str
    k: str
    v: str
    o: str

    @property
    def fused(self) -> bool:  # q, k and v are row ranges of one qkv_proj
        return self.q == self.k == self.v

    def projections(self) -> list[str]:
        return list(dict.fromkeys((self.q, self.k, self.v, self.o)))


@dataclass
class BlockLayout:
    mlp: MLPParts | MoEParts
    attn: AttnParts


def linear(block: nn.Module, name: str) -> nn.Linear:
    return submodule(block, name)


def _join(owner: str, name: str) -> str:
    return f"{owner}.{name}" if owner else name


def _is_plain_linear(m) -> bool:
    return isinstance(m, nn.Linear)


def _moe_parts(mlp: nn.Module, where: str) -> MoEParts | None:
    """The MoE parts of an MLP whose experts are fused in the supported layout; None when it has no fused experts."""
    if fused_experts(getattr(mlp, "experts", None)) and layout_problem(mlp.experts) is None:
        if any(isinstance(getattr(mlp, n, None), nn.Module) for n in ("shared_expert", "shared_experts")):
            raise PrunepilotError(f"{where}: MoE blocks with shared experts are not supported by structured pruning; "
                                  f"use an unstructured method")
        return MoEParts("mlp", "mlp.experts")
    if any(fused_experts(m) for m in mlp.modules()):
        raise PrunepilotError(f"{where} is a mixture-of-experts block whose experts layout structured pruning does "
                              f"not support; use an unstructured method (magnitude, wanda, sparsegpt) or the agent")
    return None


def find_mlp(block: nn.Module, where: str = "block") -> MLPParts | MoEParts:
    mlp = getattr(block, "mlp", None)
    if mlp is not None and all(_is_plain_linear(getattr(mlp, n, None)) for n in GATED_MLP):
        return MLPParts("mlp", ["mlp.gate_proj", "mlp.up_proj"], "mlp.down_proj")
    if mlp is not None and all(_is_plain_linear(getattr(mlp, n, None)) for n in ("gate_up_proj", "down_proj")):
        return MLPParts("mlp", ["mlp.gate_up_proj"], "mlp.down_proj", fused=True)
    moe = _moe_parts(mlp, where) if mlp is not None else None
    if moe is not None:
        return moe
    for owner in ("mlp", ""):
        m = submodule(block, owner)
        if m is not None and _is_plain_linear(getattr(m, "fc1", None)) and _is_plain_linear(getattr(m, "fc2", None)):
            return MLPParts(owner, [_join(owner, "fc1")], _join(owner, "fc2"))
    found = sorted(n for n, m in block.named_modules() if is_linear(m))
    raise PrunepilotError(
        f"structured pruning needs a gated MLP (gate_proj/up_proj/down_proj) or fc1/fc2 nn.Linear layers; "
        f"{where} has {', '.join(found) or 'no linears'} (GPT-2's Conv1D projections are not supported)")


def find_attention(block: nn.Module, where: str = "block") -> AttnParts:
    for owner in ATTN_NAMES:
        attn = getattr(block, owner, None)
        if attn is None:
            continue
        o = next((n for n in O_NAMES if _is_plain_linear(getattr(attn, n, None))), None)
        if o and all(_is_plain_linear(getattr(attn, n, None)) for n in ("q_proj", "k_proj", "v_proj")):
            return AttnParts(owner, f"{owner}.q_proj", f"{owner}.k_proj", f"{owner}.v_proj", f"{owner}.{o}")
        if o and _is_plain_linear(getattr(attn, "qkv_proj", None)) and isinstance(
                getattr(attn, "num_key_value_heads", None), int):
            qkv = f"{owner}.qkv_proj"
            return AttnParts(owner, qkv, qkv, qkv, f"{owner}.{o}")
    raise PrunepilotError(
        f"structured pruning needs separate q_proj/k_proj/v_proj and o_proj (or out_proj) nn.Linear layers in "
        f"{where}'s attention (or phi3's qkv_proj); GPT-2's fused Conv1D c_attn is not supported")


def block_layout(block: nn.Module, where: str = "block") -> BlockLayout:
    return BlockLayout(find_mlp(block, where), find_attention(block, where))


# ---------------------------------------------------------------------------------------------- widths

def attention_counts(block: nn.Module, parts: AttnParts, head_dim: int) -> tuple[int, int, int]:
    """(num_heads, num_kv_heads, group_size) of this block, read from the projection widths (a fused qkv_proj:
    its KV head count from the attention module, the query heads from what is left of its rows)."""
    if parts.fused:
        kv = submodule(block, parts.owner).num_key_value_heads
        heads = linear(block, parts.q).out_features // head_dim - 2 * kv
    else:
        heads = linear(block, parts.q).out_features // head_dim
        kv = linear(block, parts.k).out_features // head_dim
    if kv == 0 or heads % kv:
        raise PrunepilotError(f"inconsistent attention widths: {heads} query heads, {kv} KV heads")
    return heads, kv, heads // kv


def query_width(block: nn.Module, head_dim: int) -> int | None:
    """Query heads x head_dim of this block (structured pruning removes heads per layer); None when its attention
    is not a layout find_attention knows (then nothing can have resized it)."""
    try:
        parts = find_attention(block)
    except PrunepilotError:
        return None
    if parts.fused:
        return attention_counts(block, parts, head_dim)[0] * head_dim
    return linear(block, parts.q).out_features


def mlp_width(block: nn.Module, parts: MLPParts | MoEParts) -> int:
    if isinstance(parts, MoEParts):
        return submodule(block, parts.experts).down_proj.shape[2]
    return linear(block, parts.out).in_features


def mlp_params(block: nn.Module, parts: MLPParts | MoEParts) -> int:
    """Parameters of the MLP projections (all experts' matrices for an MoE block; the router is not pruned)."""
    if isinstance(parts, MoEParts):
        ex = submodule(block, parts.experts)
        return ex.gate_up_proj.numel() + ex.down_proj.numel()
    return sum(p.numel() for n in parts.ins + [parts.out] for p in linear(block, n).parameters())


def channel_cost(block: nn.Module, parts: MLPParts | MoEParts) -> float:
    """Parameters removed with one MLP channel: gate + up rows and the down column (weights and biases);
    for an MoE block one channel of every expert."""
    if isinstance(parts, MoEParts):
        e, _, h = submodule(block, parts.experts).gate_up_proj.shape
        return float(e * 3 * h)
    rows = sum(linear(block, n).in_features + (linear(block, n).bias is not None) for n in parts.ins)
    return float(parts.rows_per_channel() * rows + linear(block, parts.out).out_features)


def block_widths(block: nn.Module, head_dim: int, layout: BlockLayout | None = None) -> dict:
    """What a reloader needs to rebuild this block: widths, head counts and which outputs have biases."""
    layout = layout or block_layout(block)
    heads, kv, _ = attention_counts(block, layout.attn, head_dim)
    moe = isinstance(layout.mlp, MoEParts)
    return {
        "intermediate_size": mlp_width(block, layout.mlp),
        "num_heads": heads,
        "num_kv_heads": kv,
        "head_dim": head_dim,
        "o_bias": linear(block, layout.attn.o).bias is not None,
        "down_bias": not moe and linear(block, layout.mlp.out).bias is not None,
        **({"experts": submodule(block, layout.mlp.experts).gate_up_proj.shape[0]} if moe else {}),
    }


def model_widths(model) -> tuple[ModelAdapter, int, list[dict]]:
    """(adapter, head_dim, block_widths of every block)."""
    adapter = ModelAdapter(model)
    head_dim = adapter.attention_geometry().head_dim
    return adapter, head_dim, [block_widths(b, head_dim) for b in adapter.blocks]


def is_uniform(widths: list[dict]) -> bool:
    return all(w == widths[0] for w in widths)
