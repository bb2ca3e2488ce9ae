"""Real-model checks on SmolLM2-135M-Instruct (../shared, GGUF Q4_1 dequantized to float32 at load).

The model is loaded once per session (about 30 s); every test that prunes works on a deep copy.
"""
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prunepilot.api import prune
from prunepilot.engine import ModelAdapter, capture_block_inputs, run_block
from prunepilot.eval.perplexity import perplexity
from prunepilot.modeling import load_pruned
from prunepilot.recipe import Recipe
from prunepilot.report import save_result

pytestmark = pytest.mark.slow

TEXT = ("The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest "
        "structure in Paris. Its base is square, measuring 125 metres on each side.")


def test_adapter_finds_every_block_and_the_gqa_geometry(smollm2):
    model, _ = smollm2
    ad = ModelAdapter(model)
    assert ad.model_type == "llama" and len(ad) == 30
    assert len(ad.all_linears()) == 30 * 7 and "lm_head" not in ad.all_linears()
    g = ad.attention_geometry()
    assert (g.num_heads, g.num_kv_heads, g.head_dim, g.group_size) == (9, 3, 64, 3)


def test_replaying_the_blocks_equals_the_full_forward(smollm2):
    model, tok = smollm2
    ids = tok(TEXT, return_tensors="pt")["input_ids"][:, :32].repeat(2, 1)  # (2, 32)
    ad = ModelAdapter(model)
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True).hidden_states
    inputs = capture_block_inputs(model, ad, ids, "cpu")
    for i, block in enumerate(ad.blocks[:-1]):  # the last hidden state has the final norm applied
        inputs.hidden = run_block(block, i, inputs)
        torch.testing.assert_close(torch.cat(inputs.hidden), ref[i + 1], rtol=1e-5, atol=1e-4)


def test_wanda_half_of_every_row_then_save_and_reload_with_plain_transformers(smollm2, tmp_path):
    base, tok = smollm2
    model = copy.deepcopy(base)
    dense = perplexity(model, tok, "wikitext2", seqlen=256, max_windows=4)
    assert 10 < dense["ppl"] < 60, dense  # ../shared/README.md: about 29 at seqlen 2048
    recipe = Recipe.from_dict({"method": "wanda", "sparsity": 0.5, "device": "cpu",
                               "calibration": {"sources": ["web"], "n_samples": 4, "seqlen": 256}})
    report = prune(model, recipe, tok)
    for name, lin in ModelAdapter(model).all_linears().items():
        zeros_per_row = (lin.weight == 0).sum(1)
        assert int(zeros_per_row.min()) >= lin.in_features // 2, name  # row-wise: half of every output row
    assert report.global_sparsity == pytest.approx(0.5, abs=1e-3)
    pruned = perplexity(model, tok, "wikitext2", seqlen=256, max_windows=4)
    assert dense["ppl"] < pruned["ppl"] < 5 * dense["ppl"], (dense, pruned)

    out = tmp_path / "run"
    save_result(model, tok, out, recipe, report.to_dict())  # GGUF-loaded: saved as float weights
    reloaded = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    for name, stats in report.layers.items():
        assert int((reloaded.get_submodule(name).weight == 0).sum()) == stats["zeros"], name
    assert AutoTokenizer.from_pretrained(out / "model").encode(TEXT) == tok.encode(TEXT)


def test_flap_makes_the_real_model_smaller_and_it_reloads_exactly(smollm2, tmp_path):
    base, tok = smollm2
    model = copy.deepcopy(base)
    recipe = Recipe.from_dict({"method": "flap", "sparsity": 0.2, "device": "cpu",
                               "calibration": {"sources": ["web"], "n_samples": 4, "seqlen": 64}})
    report = prune(model, recipe, tok)
    extra = report.extra
    assert extra["achieved_sparsity"] == pytest.approx(0.2, abs=0.01)
    assert extra["params_after"] < 0.9 * extra["params_before"]
    for layer in extra["layers"]:  # whole KV groups: 3 query heads per KV head, head_dim untouched
        assert layer["num_heads"] == 3 * layer["num_kv_heads"] and layer["head_dim"] == 64
    out = tmp_path / "run"
    save_result(model, tok, out, recipe, report.to_dict())
    reloaded = load_pruned(out / "model")
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    assert sum(p.numel() for p in reloaded.parameters()) == extra["params_after"]
