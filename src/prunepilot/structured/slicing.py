"""Physical slicing of decoder blocks: keep given MLP channels, experts and KV groups of attention heads, in the
block layouts engine/layout.py finds.

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

import torch
from torch import nn

from ..engine.adapter import submodule
from ..engine.layout import AttnParts, MLPParts, MoEParts, attention_counts, block_layout, find_attention, find_mlp, \
    linear
from ..engine.moe import MATRICES
from ..errors import PrunepilotError


# ---------------------------------------------------------------------------------------------- indices

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
    owner = submodule(block, parts.owner)
    if owner is not None and hasattr(owner, "intermediate_size"):
        owner.intermediate_size = keep.numel()


@torch.no_grad()
def keep_expert_channels(block: nn.Module, keep, parts: MoEParts) -> None:
    """Keep channels keep[e] of every expert e (keep: (E, k), or (k,) for all experts alike): rows j and I + j
    of its gate_up_proj slice, column j of its down_proj slice. The fused tensors become (E, 2k, H), (E, H, k)."""
    ex = submodule(block, parts.experts)
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
    ex, router = submodule(block, parts.experts), submodule(block, parts.router)
    n = ex.gate_up_proj.shape[0]
    keep = _check_keep(keep, n, "expert")
    top_k = getattr(router, "top_k", 1)
    if keep.numel() < top_k:
        raise PrunepilotError(f"cannot keep {keep.numel()} experts: the router picks {top_k} per token")
    for owner, attr in [(ex, m) for m in MATRICES] + [(router, "weight"), (router, "bias")]:
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
    attn = submodule(block, parts.owner)
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


# -------------------------------------------------------------------------------------- recorded widths

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
