"""The Qwen2.5-Coder models of `prunepilot fetch-model`: the 0.5B loads for pruning through transformers' GGUF path,
the 1.5B answers as an agent controller behind llama-cpp-python's server. Skipped when not fetched (never fetched
here: `prunepilot fetch-model NAME` downloads them once into the cache)."""
import pytest
import torch

from prunepilot.model_store import cached_model

pytestmark = pytest.mark.slow


def _fetched(name: str):
    folder = cached_model(name)
    if folder is None:
        pytest.skip(f"{name} is not in the model cache: run `prunepilot fetch-model {name}` once")
    return folder


def test_qwen_05b_loads_for_pruning_and_prunes_one_block(one_thread):
    from prunepilot.engine import ModelAdapter, weight_2d
    from prunepilot.modeling import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(_fetched("qwen2.5-coder-0.5b-instruct"))
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == ("qwen2", 24, 896, 4864)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (14, 2)
    ids = torch.tensor([tok("def add(a, b):\n    return a + b\n")["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    # the next token after "return a +" should be " b" for a coder model
    prompt = torch.tensor([tok("def add(a, b):\n    return a +")["input_ids"]])
    with torch.no_grad():
        nxt = model(prompt).logits[0, -1].argmax().item()
    assert tok.decode([nxt]).strip() == "b"
    linears = ModelAdapter(model).all_linears()
    assert len(linears) == 24 * 7 and weight_2d(linears["model.layers.0.mlp.down_proj"]).shape == (896, 4864)


def test_qwen_15b_answers_as_a_block_controller():
    from prunepilot.agent import AgentConfig
    from prunepilot.agent.controllers import make_controller
    from prunepilot.agent.decision import Observation
    from prunepilot.testing.llama_server import LlamaServer

    folder = _fetched("qwen2.5-coder-1.5b-instruct")
    gguf = next(folder.glob("*.gguf"))
    names = [f"model.layers.{b}.{p}" for b in range(6) for p in ("self_attn.q_proj", "mlp.down_proj")]
    rows = [{"layer": n, "numel": 1000, "alive": 1000, "sparsity": 0.0, "s": 1.0, "g": 1.0,
             "z_s": (k // 2 - 2.5) / 2, "z_g": 0.0} for k, n in enumerate(names)]
    obs = Observation(0, 10, 0.4, 0.0, rows, 12.0, 12.0, 0.15, pace_gain=0.05)
    with LlamaServer(gguf, threads=2, startup_timeout=180) as server:
        cfg = AgentConfig(target_sparsity=0.4, controller={
            "kind": "openai", "base_url": server.url, "model_name": "local", "timeout_s": 300, "retries": 0,
            "granularity": "block", "max_layers_per_reply": 3, "reasoning_chars": 60, "max_tokens": 160})
        decision = make_controller(cfg).decide(obs)
    assert decision.source == "openai", decision.warnings  # a valid answer, not the fallback
    chosen = {n.rsplit(".", 2)[0] for n in decision.extras()}
    assert chosen and chosen <= {f"model.layers.{b}" for b in range(6)}
