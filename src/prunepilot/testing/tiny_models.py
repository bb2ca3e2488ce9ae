"""Tiny randomly initialised models of each supported architecture, built in-process (no downloads)."""
from __future__ import annotations

import torch
import transformers as tf

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**COMMON),
    "qwen2": lambda: tf.Qwen2Config(**COMMON),
    # Qwen3: head_dim stated in the config, q width (4 x 32 = 128) exceeds hidden size (64)
    "qwen3": lambda: tf.Qwen3Config(**COMMON, head_dim=32),
    "mistral": lambda: tf.MistralConfig(**COMMON, sliding_window=8),
    "gemma2": lambda: tf.Gemma2Config(**COMMON, head_dim=16, sliding_window=8),
    "gemma3": lambda: tf.Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=8),
    "phi3": lambda: tf.Phi3Config(**{**COMMON, "num_key_value_heads": 4}, pad_token_id=0),
    "gpt2": lambda: tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=3, n_head=4, n_positions=256),
    "opt": lambda: tf.OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=96, num_hidden_layers=3,
                                num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64),
}

# mixture-of-experts models: experts stored as fused 3-D parameters, a router per block
MOE = dict(COMMON, num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
MOE_CONFIGS = {
    "qwen3_moe": lambda: tf.Qwen3MoeConfig(**{k: v for k, v in MOE.items() if k != "num_local_experts"},
                                           head_dim=16, decoder_sparse_step=1, mlp_only_layers=[]),
    "mixtral": lambda: tf.MixtralConfig(**{k: v for k, v in MOE.items() if k not in ("num_experts", "moe_intermediate_size")}),
    "olmoe": lambda: tf.OlmoeConfig(**{k: v for k, v in MOE.items() if k not in ("num_local_experts", "moe_intermediate_size")}),
}
CONFIGS.update(MOE_CONFIGS)
DENSE = [a for a in CONFIGS if a not in MOE_CONFIGS]

# architectures whose MLP/attention layout structured pruning supports (gated MLP + q/k/v/o)
GATED = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3"]


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = CONFIGS[arch]()
    cfg._attn_implementation = "eager"
    model = tf.AutoModelForCausalLM.from_config(cfg)
    return model.eval()


class CharTokenizer:
    """Byte-level toy tokenizer with the HF encode/decode surface prunepilot uses."""
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __len__(self):
        return 128

    def encode(self, text, add_special_tokens=True, **_):
        ids = [3 + (b % 125) for b in text.encode()]
        return [self.bos_token_id] + ids if add_special_tokens else ids

    def decode(self, ids, **_):
        return bytes((int(i) - 3) % 256 for i in ids if int(i) >= 3).decode(errors="ignore")

    def __call__(self, text, add_special_tokens=True, return_tensors=None, **_):
        ids = self.encode(text, add_special_tokens)
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}
