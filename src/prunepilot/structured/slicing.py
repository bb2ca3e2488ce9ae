"""Physical slicing of decoder blocks: keep given MLP channels and given KV groups of attention heads.

Supported block layouts (anything else is a PrunepilotError, never a shape error deep inside torch):

    MLP        gated:  mlp.gate_proj / mlp.up_proj rows  +  mlp.down_proj columns   (llama, qwen, mistral, gemma)
               fused:  mlp.gate_up_proj rows j and I + j +  mlp.down_proj column j  (phi3: [gate; up] in one linear)
               plain:  fc1 rows (+bias)                  +  fc2 columns             (opt-style, block.fc1 or mlp.fc1)
    attention  self_attn.{q,k,v}_proj rows  +  self_attn.{o_proj|out_proj} columns
               fused:  self_attn.qkv_proj rows [q (H*hd); k (KV*hd); v (KV*hd)]  (phi3)

GQA rule: the unit of attention pruning is one **KV group** = one KV head and the `group_size` query heads
that read it (HF's repeat_kv maps query head h to KV head h // group_size). Removing group g removes q
rows [g*gs*hd, (g+1)*gs*hd), k/v rows [g*hd, (g+1)*hd) and the matching o_proj columns. head_dim never
changes, so per-head norms (Qwen3/Gemma3 q_norm/k_norm act on head_dim) and rotary tables are untouched.
The v5 attention forwards reshape with ``(*input_shape, -1, head_dim)`` and repeat KV heads by
``num_key_value_groups`` (= group_size, unchanged); attributes that count heads (``num_heads``,
``num_key_value_heads`` where a module has them, e.g. OPT's view uses ``self.num_heads``) are updated.

Bias compensation (FLAP): removing input channels J of an output projection W changes its output by
-W[:, J] @ x_J; replacing x_J by its calibration mean gives the bias b += W[:, J] @ mean(x_J).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..engine.moe import fused_experts, layout_problem
from ..errors import PrunepilotError

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


def _sub(module: nn.Module, path: str) -> nn.Module | None:
    for part in filter(None, path.split(".")):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _join(owner: str, name: str) -> str:
    return f"{owner}.{name}" if owner else name


def _is_plain_linear(m) -> bool:
    return isinstance(m, nn.Linear)


def find_mlp(block: nn.Module, where: str = "block") -> MLPParts:
    mlp = getattr(block, "mlp", None)
    if mlp is not None and all(_is_plain_linear(getattr(mlp, n, None)) for n in GATED_MLP):
        return MLPParts("mlp", ["mlp.gate_proj", "mlp.up_proj"], "mlp.down_proj")
    if mlp is not None and all(_is_plain_linear(getattr(mlp, n, None)) for n in ("gate_up_proj", "down_proj")):
        return MLPParts("mlp", ["mlp.gate_up_proj"], "mlp.down_proj", fused=True)
    if mlp is not None and fused_experts(getattr(mlp, "experts", None)) and layout_problem(mlp.experts) is None:
        if any(_is_plain_linear(getattr(mlp, n, None)) for n in ("shared_expert", "shared_experts")) or any(
                isinstance(getattr(mlp, n, None), nn.Module) for n in ("shared_expert", "shared_experts")):
            raise PrunepilotError(f"{where}: MoE blocks with shared experts are not supported by structured pruning; "
                                  f"use an unstructured method")
        return MoEParts("mlp", "mlp.experts")
    if mlp is not None and any(fused_experts(m) for m in mlp.modules()):
        raise PrunepilotError(f"{where} is a mixture-of-experts block whose experts layout structured pruning does "
                              f"not support; use an unstructured method (magnitude, wanda, sparsegpt) or the agent")
    for owner in ("mlp", ""):
        m = _sub(block, owner)
        if m is not None and _is_plain_linear(getattr(m, "fc1", None)) and _is_plain_linear(getattr(m, "fc2", None)):
            return MLPParts(owner, [_join(owner, "fc1")], _join(owner, "fc2"))
    found = sorted(n for n, m in block.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")
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


@dataclass
class BlockLayout:
    mlp: MLPParts
    attn: AttnParts


def block_layout(block: nn.Module, where: str = "block") -> BlockLayout:
    return BlockLayout(find_mlp(block, where), find_attention(block, where))


def linear(block: nn.Module, name: str) -> nn.Linear:
    return _sub(block, name)


# ---------------------------------------------------------------------------------------------- geometry

def attention_counts(block: nn.Module, parts: AttnParts, head_dim: int) -> tuple[int, int, int]:
    """(num_heads, num_kv_heads, group_size) of this block, read from the projection widths (a fused qkv_proj:
    its KV head count from the attention module, the query heads from what is left of its rows)."""
    if parts.fused:
        kv = _sub(block, parts.owner).num_key_value_heads
        heads = linear(block, parts.q).out_features // head_dim - 2 * kv
    else:
        heads = linear(block, parts.q).out_features // head_dim
        kv = linear(block, parts.k).out_features // head_dim
    if kv == 0 or heads % kv:
        raise PrunepilotError(f"inconsistent attention widths: {heads} query heads, {kv} KV heads")
    return heads, kv, heads // kv


def mlp_width(block: nn.Module, parts: MLPParts | MoEParts) -> int:
    if isinstance(parts, MoEParts):
        return _sub(block, parts.experts).down_proj.shape[2]
    return linear(block, parts.out).in_features


def mlp_params(block: nn.Module, parts: MLPParts | MoEParts) -> int:
    """Parameters of the MLP projections (all experts' matrices for an MoE block; the router is not pruned)."""
    if isinstance(parts, MoEParts):
        ex = _sub(block, parts.experts)
        return ex.gate_up_proj.numel() + ex.down_proj.numel()
    return sum(p.numel() for n in parts.ins + [parts.out] for p in linear(block, n).parameters())


def channel_cost(block: nn.Module, parts: MLPParts | MoEParts) -> float:
    """Parameters removed with one MLP channel: gate + up rows and the down column (weights and biases);
    for an MoE block one channel of every expert."""
    if isinstance(parts, MoEParts):
        e, _, h = _sub(block, parts.experts).gate_up_proj.shape
        return float(e * 3 * h)
    rows = sum(linear(block, n).in_features + (linear(block, n).bias is not None) for n in parts.ins)
    return float(parts.rows_per_channel() * rows + linear(block, parts.out).out_features)


def group_columns(groups: torch.Tensor, group_size: int, head_dim: int) -> torch.Tensor:
    """Indices of the q rows / o_proj columns of KV groups `groups`. (len(groups) * gs * hd,)"""
    width = group_size * head_dim
    offs = torch.arange(width, device=groups.device)
    return (groups.unsqueeze(1) * width + offs.unsqueeze(0)).reshape(-1)


def kv_rows(groups: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Indices of the k/v rows of KV heads `groups`. (len(groups) * hd,)"""
    offs = torch.arange(head_dim, device=groups.device)
    return (groups.unsqueeze(1) * head_dim + offs.unsqueeze(0)).reshape(-1)


def complement(keep: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[keep.cpu()] = False
    return mask.nonzero().flatten()


# ---------------------------------------------------------------------------------------------- slicing

def _check_keep(keep, n: int, what: str) -> torch.Tensor:
    keep = torch.as_tensor(keep, dtype=torch.long).flatten().cpu()
    if keep.numel() == 0:
        raise PrunepilotError(f"cannot remove every {what} of a layer: keep at least one")
    if keep.min() < 0 or keep.max() >= n or keep.unique().numel() != keep.numel():
        raise PrunepilotError(f"bad {what} indices to keep: need distinct values in [0, {n})")
    return keep.sort().values


@torch.no_grad()
def keep_rows(lin: nn.Linear, idx: torch.Tensor) -> None:
    """Keep output features idx (weight rows and bias entries)."""
    idx = idx.to(lin.weight.device)
    lin.weight = nn.Parameter(lin.weight.index_select(0, idx).contiguous(), requires_grad=lin.weight.requires_grad)
    if lin.bias is not None:
        lin.bias = nn.Parameter(lin.bias.index_select(0, idx).contiguous(), requires_grad=lin.bias.requires_grad)
    lin.out_features = idx.numel()


@torch.no_grad()
def keep_columns(lin: nn.Linear, idx: torch.Tensor) -> None:
    """Keep input features idx (weight columns; the bias is per output and stays)."""
    idx = idx.to(lin.weight.device)
    lin.weight = nn.Parameter(lin.weight.index_select(1, idx).contiguous(), requires_grad=lin.weight.requires_grad)
    lin.in_features = idx.numel()


@torch.no_grad()
def add_bias(lin: nn.Linear, delta: torch.Tensor | None = None) -> None:
    """Give `lin` a bias if it has none (zeros, registered as a Parameter so state_dict saves it), add delta."""
    if lin.bias is None:
        lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device),
                                requires_grad=lin.weight.requires_grad)
    if delta is not None:
        lin.bias.add_(delta.to(device=lin.bias.device, dtype=lin.bias.dtype))


@torch.no_grad()
def compensation(weight: torch.Tensor, mean: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """W[:, removed] @ mean[removed] in float32: the expected output of the removed inputs. (out,)"""
    removed = removed.to(weight.device)
    w = weight.index_select(1, removed).float()          # (out, r)
    return w @ mean.to(weight.device).float()[removed]   # (out,)


@torch.no_grad()
def keep_mlp_channels(block: nn.Module, keep, mean: torch.Tensor | None = None,
                      parts: MLPParts | None = None) -> None:
    """Keep MLP intermediate channels `keep`: gate/up (or fc1) rows, down (or fc2) columns.

    mean: (width,) calibration mean of the down_proj input; when given, the removed channels' expected
    contribution moves into down_proj's bias (added if absent, even when nothing is removed).
    """
    parts = parts or find_mlp(block)
    if isinstance(parts, MoEParts):
        return keep_expert_channels(block, keep, parts)
    out = linear(block, parts.out)
    width = out.in_features
    keep = _check_keep(keep, width, "MLP channel")
    if mean is not None:
        add_bias(out, compensation(out.weight, mean, complement(keep, width)))
    rows = torch.cat([keep, keep + width]) if parts.fused else keep  # fused [gate; up]: both halves
    for name in parts.ins:
        keep_rows(linear(block, name), rows)
    keep_columns(out, keep)
    owner = _sub(block, parts.owner)
    if owner is not None and hasattr(owner, "intermediate_size"):
        owner.intermediate_size = keep.numel()


@torch.no_grad()
def keep_expert_channels(block: nn.Module, keep, parts: MoEParts) -> None:
    """Keep channels keep[e] of every expert e (keep: (E, k), or (k,) for all experts alike): rows j and I + j
    of its gate_up_proj slice, column j of its down_proj slice. The fused tensors become (E, 2k, H), (E, H, k)."""
    ex = _sub(block, parts.experts)
    e, two_i, _ = ex.gate_up_proj.shape
    width = two_i // 2
    keep = torch.as_tensor(keep, dtype=torch.long)
    keep = keep.expand(e, -1) if keep.dim() == 1 else keep
    if keep.shape[0] != e or len({k.numel() for k in keep}) != 1:
        raise PrunepilotError(f"expert channels to keep must be one row of equal length per expert ({e})")
    keep = torch.stack([_check_keep(k, width, "expert channel") for k in keep])      # (E, k), sorted rows
    rows = torch.cat([keep, keep + width], dim=1).to(ex.gate_up_proj.device)          # (E, 2k)
    gu = torch.gather(ex.gate_up_proj, 1, rows.unsqueeze(2).expand(-1, -1, ex.gate_up_proj.shape[2]))
    down = torch.gather(ex.down_proj, 2, keep.to(ex.down_proj.device).unsqueeze(1).expand(-1, ex.down_proj.shape[1], -1))
    ex.gate_up_proj = nn.Parameter(gu.contiguous(), requires_grad=ex.gate_up_proj.requires_grad)
    ex.down_proj = nn.Parameter(down.contiguous(), requires_grad=ex.down_proj.requires_grad)
    for attr in ("intermediate_dim", "intermediate_size"):
        if isinstance(getattr(ex, attr, None), int):
            setattr(ex, attr, keep.shape[1])


@torch.no_grad()
def keep_experts(block: nn.Module, keep, parts: MoEParts) -> None:
    """Keep experts `keep` of an MoE block: their slices of the fused tensors and their router rows, so the
    router scores (and its top-k chooses among) the kept experts only."""
    ex, router = _sub(block, parts.experts), _sub(block, parts.router)
    n = ex.gate_up_proj.shape[0]
    keep = _check_keep(keep, n, "expert")
    top_k = getattr(router, "top_k", 1)
    if keep.numel() < top_k:
        raise PrunepilotError(f"cannot keep {keep.numel()} experts: the router picks {top_k} per token")
    for owner, attr in ((ex, "gate_up_proj"), (ex, "down_proj"), (router, "weight"), (router, "bias")):
        p = getattr(owner, attr, None)
        if isinstance(p, torch.Tensor) and p.shape[0] == n:
            setattr(owner, attr, nn.Parameter(p[keep.to(p.device)].contiguous(), requires_grad=p.requires_grad))
    for owner in (ex, router):
        if isinstance(getattr(owner, "num_experts", None), int):
            owner.num_experts = keep.numel()


@torch.no_grad()
def keep_kv_groups(block: nn.Module, keep, head_dim: int, mean: torch.Tensor | None = None,
                   parts: AttnParts | None = None) -> None:
    """Keep the KV groups `keep` (KV head g and its query heads), GQA-consistently.

    mean: (num_heads * head_dim,) calibration mean of the o_proj input, for bias compensation.
    """
    parts = parts or find_attention(block)
    heads, kv, gs = attention_counts(block, parts, head_dim)
    keep = _check_keep(keep, kv, "KV head group")
    q_idx = group_columns(keep, gs, head_dim)    # (kept * gs * hd,)
    kv_idx = kv_rows(keep, head_dim)              # (kept * hd,)
    o = linear(block, parts.o)
    if mean is not None:
        add_bias(o, compensation(o.weight, mean, complement(q_idx, heads * head_dim)))
    if parts.fused:  # one qkv_proj: rows [q; k; v]
        keep_rows(linear(block, parts.q), torch.cat([q_idx, heads * head_dim + kv_idx,
                                                     (heads + kv) * head_dim + kv_idx]))
    else:
        keep_rows(linear(block, parts.q), q_idx)
        keep_rows(linear(block, parts.k), kv_idx)
        keep_rows(linear(block, parts.v), kv_idx)
    keep_columns(o, q_idx)
    attn = _sub(block, parts.owner)
    if parts.fused:  # phi3 splits qkv by config.num_attention_heads: this layer gets its own copy of the config
        attn.config = copy.copy(attn.config)
        attn.config.num_attention_heads, attn.config.num_key_value_heads = keep.numel() * gs, keep.numel()
    for attr, value in (("num_heads", keep.numel() * gs), ("num_attention_heads", keep.numel() * gs),
                        ("num_key_value_heads", keep.numel()), ("num_kv_heads", keep.numel())):
        if isinstance(getattr(attn, attr, None), int):
            setattr(attn, attr, value)
    if getattr(attn, "num_key_value_groups", gs) != gs:  # heads per KV head: unchanged by construction
        raise PrunepilotError(f"attention module has num_key_value_groups={attn.num_key_value_groups}, but its "
                              f"projections give {gs} query heads per KV head")


# ---------------------------------------------------------------------------------------------- widths

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
        **({"experts": _sub(block, layout.mlp.experts).gate_up_proj.shape[0]} if moe else {}),
    }


def shrink_block(block: nn.Module, widths: dict, head_dim: int) -> None:
    """Reshape a freshly built dense block to recorded widths (contents are overwritten by a state dict)."""
    layout = block_layout(block)
    if widths.get("experts"):
        keep_experts(block, torch.arange(widths["experts"]), layout.mlp)
    keep_mlp_channels(block, torch.arange(widths["intermediate_size"]), parts=layout.mlp)
    keep_kv_groups(block, torch.arange(widths["num_kv_heads"]), head_dim, parts=layout.attn)
    heads, kv, _ = attention_counts(block, layout.attn, head_dim)
    if (heads, kv) != (widths["num_heads"], widths["num_kv_heads"]):
        raise PrunepilotError(f"recorded widths {widths} do not fit this architecture's group size")
    if widths.get("o_bias"):
        add_bias(linear(block, layout.attn.o))
    if widths.get("down_bias"):
        add_bias(linear(block, layout.mlp.out))
