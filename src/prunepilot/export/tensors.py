"""Model weights as GGUF tensors: llama.cpp names, the rope row order, and the stored type of each tensor.

Names come from the gguf package's own map (gguf.get_tensor_name_map), the one convert_hf_to_gguf uses:
model.layers.i.self_attn.q_proj.weight -> blk.i.attn_q.weight, mlp.down_proj.bias -> blk.i.ffn_down.bias, ...

Types follow convert_hf_to_gguf (conversion/base.py: prepare_tensors): 1-D tensors (norms, biases, rope
factors) stay F32; matrices are F16 or Q8_0; a matrix whose rows cannot be cut into Q8_0's blocks of 32
(FLAP leaves odd MLP widths, so ffn_down rows can be any length) falls back to F16, as the converter does.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ..engine import ModelAdapter
from ..engine.layout import find_attention
from ..errors import PrunepilotError
from .arch import ExportPlan, llama3_rope_factors

FILE_TYPES = ("f16", "q8_0")


def rope_interleave(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows (n_heads*head_dim, ...) from HF's rotate_half layout (head dims [0, d/2) pair
    with [d/2, d)) to GGML's NORM rope layout (adjacent pairs 2j, 2j+1). Same as convert_hf_to_gguf's
    LlamaModel.permute(w, n_head, n_head) per head; works for biases (1-D) too."""
    rows = w.shape[0]
    if n_heads <= 0 or rows % (2 * n_heads):
        raise PrunepilotError(f"cannot split {rows} q/k rows into {n_heads} heads with an even head size")
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tied(model) -> bool:
    out, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and out.weight.data_ptr() == emb.weight.data_ptr()


def rope_heads(model, plan: ExportPlan) -> dict[str, int]:
    """{state-dict name: head count} of every q and k projection weight and bias, whose rows NORM-rope
    architectures need permuted (none for NEOX rope). The projections are the engine layout's attention parts."""
    if not plan.permute_qk:
        return {}
    adapter, heads = ModelAdapter(model), {}
    for i, (block, w) in enumerate(zip(adapter.blocks, plan.widths)):
        prefix, attn = adapter.block_name(i), find_attention(block, adapter.block_name(i))
        for proj, n in ((attn.q, w["num_heads"]), (attn.k, w["num_kv_heads"])):
            heads.update({f"{prefix}.{proj}.{p}": n for p in ("weight", "bias")})
    return heads


def gguf_tensors(model, plan: ExportPlan) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, float32 tensor) for every weight llama.cpp reads, in state-dict order."""
    import gguf

    arch = getattr(gguf.MODEL_ARCH, plan.arch.upper())
    names = gguf.get_tensor_name_map(arch, len(plan.widths))
    skip_output = _tied(model)  # llama.cpp falls back to token_embd when output.weight is absent
    permuted = rope_heads(model, plan)
    for name, t in model.state_dict().items():
        if (skip_output and name == "lm_head.weight") or name.endswith("rotary_emb.inv_freq"):
            continue
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise PrunepilotError(f"cannot map tensor {name} to a llama.cpp {plan.arch} tensor")
        t = t.detach().to(torch.float32).cpu()
        yield new, rope_interleave(t, permuted[name]) if name in permuted else t
    factors = llama3_rope_factors(plan)
    if factors is not None:
        yield "rope_freqs.weight", factors


def encode(name: str, t: torch.Tensor, file_type: str) -> tuple[np.ndarray, object]:
    """(data, GGMLQuantizationType) to store `t` as, following convert_hf_to_gguf's rules."""
    import gguf

    data = t.numpy()
    q = gguf.GGMLQuantizationType
    if data.ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return data.astype(np.float32), q.F32
    qtype = q.Q8_0 if file_type == "q8_0" else q.F16
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError:  # rows not a multiple of the block size
        return gguf.quants.quantize(data, q.F16), q.F16
