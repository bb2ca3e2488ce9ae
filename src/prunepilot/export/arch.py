"""Which llama.cpp architecture a (pruned) Hugging Face model is written as, and its GGUF hyperparameters.

llama.cpp (the copy vendored in llama-cpp-python 0.3.36) reads `{arch}.feed_forward_length`,
`{arch}.attention.head_count` and `.head_count_kv` with get_key_or_arr for every architecture
(llama-model.cpp: load_hparams), so per-layer arrays are accepted by the loader. But the `llama`, `qwen2` and
`qwen3` architectures create their tensors and graphs with layer 0's widths (LLAMA_LOAD_LOCALS:
n_ff = hparams.n_ff(), n_head = hparams.n_head()), so a model whose layers differ fails to load there. The
`deci` architecture (models/deci.cpp, Llama-3.1-Nemotron-NAS) reads n_ff(i), n_head(i), n_head_kv(i) per
layer in load_arch_tensors and in its graph, and loads and applies the optional attn_output.bias /
ffn_down.bias (FLAP's compensation biases) and q/k/v biases; everything else is the llama block (RMSNorm,
SwiGLU, NORM rope). Hence:

    HF model_type     widths equal in every layer                 per-layer widths
    llama, mistral    llama                                       deci
    qwen2             qwen2 (plain) / llama (heads or biases      deci
                      changed: qwen2's tensors assume
                      heads x head_dim = hidden and no o/down bias)
    qwen3             qwen3 (no o/down biases)                    refused (deci has no q_norm/k_norm)
    anything else     refused

`llama` and `deci` use NORM rope (rotates adjacent pairs); HF uses rotate_half, so q/k rows are permuted per
head (tensors.rope_interleave, as convert_hf_to_gguf's LlamaModel.permute). qwen2/qwen3 use NEOX rope
(rotate_half): no permutation.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from ..errors import PrunepilotError
from ..engine.layout import is_uniform, model_widths
from ..engine.model_config import text_config

log = logging.getLogger(__name__)

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
NORM_ROPE = ("llama", "deci")   # llama.cpp architectures whose rope rotates adjacent pairs


@dataclass
class ExportPlan:
    arch: str                 # llama.cpp architecture name written to general.architecture
    widths: list[dict]        # per layer: intermediate_size, num_heads, num_kv_heads, head_dim, o_bias, down_bias
    head_dim: int
    rope: dict                # rope_theta, rope_type and the scaling parameters

    @property
    def permute_qk(self) -> bool:
        return self.arch in NORM_ROPE


def _rope(cfg) -> dict:
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    params = params.get("full_attention", params) if isinstance(params.get("full_attention"), dict) else params
    legacy = getattr(cfg, "rope_scaling", None) if not params else None
    params.update(legacy or {})
    params.setdefault("rope_theta", getattr(cfg, "rope_theta", None) or 10000.0)
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def _check_config(model_type: str, cfg, rope: dict) -> None:
    act = getattr(cfg, "hidden_act", "silu")
    if act != "silu":
        raise PrunepilotError(f"cannot export {model_type} with hidden_act {act!r} to GGUF (llama.cpp's llama-"
                              f"family graphs use SiLU)")
    if getattr(cfg, "partial_rotary_factor", 1.0) not in (None, 1.0):
        raise PrunepilotError(f"cannot export {model_type} with partial_rotary_factor to GGUF")
    if rope["rope_type"] not in ("default", "linear", "llama3"):
        raise PrunepilotError(f"cannot export rope_type {rope['rope_type']!r} to GGUF (supported: default, "
                              f"linear, llama3)")
    window = getattr(cfg, "sliding_window", None)
    uses_window = window and (model_type == "mistral" or getattr(cfg, "use_sliding_window", False))
    if uses_window and window < getattr(cfg, "max_position_embeddings", 0):
        log.warning("%s uses a sliding window of %d tokens; llama.cpp's llama-family graphs attend to the whole "
                    "context, so outputs match only for contexts up to %d tokens", model_type, window, window)


def _choose_arch(model_type: str, widths: list[dict], hidden: int) -> str:
    uniform = is_uniform(widths)
    out_bias = any(w["o_bias"] or w["down_bias"] for w in widths)
    w0 = widths[0]
    if model_type in ("llama", "mistral"):
        return "llama" if uniform else "deci"
    if model_type == "qwen2":
        if uniform and not out_bias and w0["num_heads"] * w0["head_dim"] == hidden:
            return "qwen2"
        return "llama" if uniform else "deci"
    if uniform and not out_bias:  # qwen3
        return "qwen3"
    raise PrunepilotError("cannot export this qwen3 model to GGUF: llama.cpp's qwen3 architecture needs the same "
                          "widths in every layer and has no attn_output/ffn_down bias (prune with --ratios uniform "
                          "and structured.bias_compensation: false), and deci has no q_norm/k_norm")


def _unsupported(model_type) -> PrunepilotError:
    return PrunepilotError(f"cannot export model_type {model_type!r} to GGUF: supported are {', '.join(SUPPORTED)} "
                           f"(llama.cpp's llama, deci, qwen2 and qwen3 architectures)")


def check_saved_config(model_dir) -> None:
    """Refuse an unsupported architecture from config.json alone, before the tokenizer or weights are read."""
    import json
    from pathlib import Path

    cfg_file = Path(model_dir) / "config.json"
    if not cfg_file.is_file():
        return
    try:
        model_type = json.loads(cfg_file.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError):
        raise PrunepilotError(f"{cfg_file} is not a valid config.json") from None
    if model_type not in SUPPORTED:
        raise _unsupported(model_type)


def plan_export(model) -> ExportPlan:
    """The llama.cpp architecture and per-layer widths for `model`; PrunepilotError if llama.cpp cannot run it."""
    cfg = text_config(model.config)
    model_type = getattr(cfg, "model_type", "?")
    if model_type not in SUPPORTED:
        raise _unsupported(model_type)
    rope = _rope(cfg)
    _check_config(model_type, cfg, rope)
    _, head_dim, widths = model_widths(model)
    arch = _choose_arch(model_type, widths, cfg.hidden_size)
    if rope["rope_type"] == "llama3" and arch not in NORM_ROPE:
        raise PrunepilotError(f"cannot export llama3 rope scaling for the {arch} architecture")
    return ExportPlan(arch, widths, head_dim, rope)


def _per_layer(widths: list[dict], key: str) -> int | list[int]:
    values = [int(w[key]) for w in widths]
    return values[0] if len(set(values)) == 1 else values


def write_hparams(writer, model, plan: ExportPlan, n_vocab: int) -> None:
    """The {arch}.* keys llama.cpp's load_hparams and the architecture's load_arch_hparams read."""
    import gguf

    cfg = text_config(model.config)
    writer.add_context_length(int(cfg.max_position_embeddings))
    writer.add_embedding_length(int(cfg.hidden_size))
    writer.add_block_count(len(plan.widths))
    writer.add_feed_forward_length(_per_layer(plan.widths, "intermediate_size"))
    writer.add_head_count(_per_layer(plan.widths, "num_heads"))
    writer.add_head_count_kv(_per_layer(plan.widths, "num_kv_heads"))
    writer.add_key_length(plan.head_dim)
    writer.add_value_length(plan.head_dim)
    writer.add_rope_dimension_count(plan.head_dim)
    writer.add_rope_freq_base(float(plan.rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(n_vocab)
    if plan.rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(plan.rope["factor"]))


def llama3_rope_factors(plan: ExportPlan) -> torch.Tensor | None:
    """rope_freqs.weight (head_dim/2,) for llama3 rope scaling, as convert_hf_to_gguf's LlamaModel writes it."""
    rope = plan.rope
    if rope["rope_type"] != "llama3":
        return None
    dim = plan.head_dim
    freqs = 1.0 / (float(rope["rope_theta"]) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_len = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_len / low, old_len / high
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)
