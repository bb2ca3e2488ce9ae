"""Structured pruning: hand-computed scores and selection, exact slicing, GQA consistency, bias compensation,
parameter accounting, save/load round trips, clear errors, and a real-model check on stories260K."""
import json
import math

import pytest
import torch
import transformers as tf

from prunepilot.api import prune
from prunepilot.data import Calibration
from prunepilot.engine import ModelAdapter
from prunepilot.engine.layout import block_layout
from prunepilot.errors import PrunepilotError
from prunepilot.modeling import load_pruned, save_pruned
from prunepilot.moments import RunningMoments
from prunepilot.registry import available, get_method
from prunepilot.structured.outcome import warn_unaligned
from prunepilot.structured.saving import WIDTHS_FILE
from prunepilot.structured.scores import fluctuation_scores, group_scores, head_scores, standardize
from prunepilot.structured.selection import Candidates, align_removal, select_global, split_uniform_layer
from prunepilot.structured.slicing import keep_kv_groups, keep_mlp_channels
from prunepilot.eval.speed import measure_speed
from prunepilot.testing.tiny_models import GATED, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


IDS = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def recipe(method="flap", sparsity=0.3, **structured):
    return {"method": method, "sparsity": sparsity, "device": "cpu", "structured": structured}


def attn_of(block):
    return block.self_attn


# ---------------------------------------------------------------------------------------------- statistics

def test_running_moments_equal_torch_on_concatenated_data():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 7, 5, generator=g) * 3 + 100 for n in (1, 3, 2, 5)]  # large offset: stability
    moments = RunningMoments(5)
    for x in batches:
        moments.add(x)
    allx = torch.cat([x.reshape(-1, 5) for x in batches]).double()
    assert moments.n == allx.shape[0]
    torch.testing.assert_close(moments.mean.double(), allx.mean(0), rtol=0, atol=1e-4)
    torch.testing.assert_close(moments.var().double(), allx.var(0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(moments.var(unbiased=False).double(), allx.var(0, unbiased=False), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(moments.l2().double(), allx.norm(dim=0), rtol=1e-5, atol=0)


def test_scores_by_hand():
    W = torch.tensor([[1.0, -2.0, 0.0, 1.0],
                      [3.0, 0.0, -1.0, 1.0]])  # (out 2, in 4): column |W| sums 4, 2, 1, 2; ‖W[:, j]‖² 10, 4, 1, 2
    X = torch.tensor([[3.0, 0.0, 0.0, 1.0],
                      [4.0, 0.0, 2.0, 0.0]])   # tokens: ‖X_j‖ 5, 0, 2, 1; unbiased var 0.5, 0, 2, 0.5
    m = RunningMoments(4)
    m.add(X)
    assert get_method("wanda_sp").column_scores(W, m).tolist() == [20.0, 0.0, 2.0, 2.0]
    assert fluctuation_scores(W, m).tolist() == [5.0, 0.0, 2.0, 1.0]
    cols = torch.arange(12.0)  # 6 heads of head_dim 2, 2 KV groups of 3 heads
    heads = head_scores(cols, head_dim=2)
    assert heads.tolist() == [1.0, 5.0, 9.0, 13.0, 17.0, 21.0]
    assert group_scores(heads, group_size=3).tolist() == [15.0, 51.0]
    assert group_scores(head_scores(cols, 2, "mean"), 3, "mean").tolist() == [2.5, 8.5]
    z = standardize(torch.tensor([1.0, 2.0, 3.0]))
    assert z.tolist() == [-1.0, 0.0, 1.0]
    assert standardize(torch.tensor([4.0])).tolist() == [0.0]  # undefined std: no preference


def test_global_selection_by_hand():
    cands = [Candidates(0, "mlp", torch.tensor([0.5, -1.0, 2.0]), 1.0),
             Candidates(0, "attn", torch.tensor([-2.0, 1.0]), 3.0),
             Candidates(1, "mlp", torch.tensor([-0.5, 0.1, 3.0, -3.0]), 1.0)]
    r = select_global(cands, 5.0)  # ascending: -3 (1), -2 (group, 3), -1 (1) -> budget spent
    assert r[(0, "mlp")].tolist() == [1] and r[(0, "attn")].tolist() == [0] and r[(1, "mlp")].tolist() == [3]
    r = select_global(cands, 2.0)  # the group would overshoot: skipped for the next cheapest channel
    assert r[(0, "attn")].tolist() == [] and r[(0, "mlp")].tolist() == [1] and r[(1, "mlp")].tolist() == [3]
    r = select_global(cands, 8.0)  # the attention module keeps one group
    assert r[(0, "attn")].tolist() == [0] and len(r[(0, "mlp")]) + len(r[(1, "mlp")]) == 5
    with pytest.raises(PrunepilotError, match="at most 8"):
        select_global(cands, 9.0)  # capacity: 2*1 + 1*3 + 3*1 = 8
    mlp, attn = Candidates(0, "mlp", torch.zeros(10), 2.0), Candidates(0, "attn", torch.zeros(3), 10.0)
    assert split_uniform_layer(mlp, attn, 14.0, 1) == (2, 1)   # 1 group (10), channels fill 4
    assert split_uniform_layer(mlp, attn, 14.0, 0) == (7, 0)   # no group: channels only
    assert split_uniform_layer(mlp, attn, 9.0, 1) == (4, 0)    # a group would overshoot
    assert split_uniform_layer(mlp, attn, 38.0, 2) == (9, 2)   # 2 groups + 9 channels = 38
    assert split_uniform_layer(mlp, attn, 38.0, 5) == (9, 2)   # one group is always kept


# ---------------------------------------------------------------------------------------------- slicing

@pytest.mark.parametrize("arch", GATED + ["opt", "phi3"])
def test_slicing_zeroed_channels_and_groups_keeps_logits(arch):
    """Channels whose down_proj column is zero and KV groups whose o_proj columns are zero contribute
    nothing: slicing them away leaves the logits unchanged."""
    model = tiny_model(arch)
    ad = ModelAdapter(model)
    hd = ad.attention_geometry().head_dim
    gs = ad.attention_geometry().group_size
    kv = ad.attention_geometry().num_kv_heads
    plan = []
    with torch.no_grad():
        for i, block in enumerate(ad.blocks):
            lay = block_layout(block)
            down, o = block.get_submodule(lay.mlp.out), block.get_submodule(lay.attn.o)
            gone_c = torch.tensor([0, 5, 17 + i])
            gone_g = i % kv
            down.weight[:, gone_c] = 0
            o.weight[:, gone_g * gs * hd:(gone_g + 1) * gs * hd] = 0
            plan.append((gone_c, gone_g))
    ref = logits(model)
    for block, (gone_c, gone_g) in zip(ad.blocks, plan):
        lay = block_layout(block)
        width = block.get_submodule(lay.mlp.out).in_features
        keep_mlp_channels(block, [c for c in range(width) if c not in gone_c.tolist()])
        keep_kv_groups(block, [g for g in range(kv) if g != gone_g], hd)
    if arch == "phi3":  # the fused gate_up matmul is narrower now: BLAS may round its rows differently (1e-7)
        torch.testing.assert_close(logits(model), ref, rtol=0, atol=1e-6)
    else:
        assert torch.equal(logits(model), ref)


@pytest.mark.parametrize("arch", GATED + ["opt", "phi3"])
def test_gqa_consistency_after_flap(arch):
    model = tiny_model(arch)
    g = ModelAdapter(model).attention_geometry()
    rep = prune(model, recipe("flap", 0.4), calibration=IDS)
    ad = ModelAdapter(model)
    for i, block in enumerate(ad.blocks):
        lay = block_layout(block)
        q, k, v, o = (block.get_submodule(n) for n in (lay.attn.q, lay.attn.k, lay.attn.v, lay.attn.o))
        info = rep.extra["layers"][i]
        if lay.attn.fused:  # phi3: one qkv_proj with rows [q; k; v]
            assert q.out_features == (info["num_heads"] + 2 * info["num_kv_heads"]) * g.head_dim
            assert attn_of(block).config.num_attention_heads == info["num_heads"]
        else:
            assert q.out_features == info["num_heads"] * g.head_dim
            assert k.out_features == v.out_features == info["num_kv_heads"] * g.head_dim
        assert o.in_features == info["num_heads"] * g.head_dim
        assert info["num_heads"] == info["num_kv_heads"] * g.group_size       # whole groups only
        assert len(info["kept_kv_groups"]) == info["num_kv_heads"] >= 1
        assert info["head_dim"] == g.head_dim
        attn = attn_of(block)
        assert getattr(attn, "head_dim", g.head_dim) == g.head_dim
        if hasattr(attn, "q_norm"):  # qwen3 / gemma3: per-head norms untouched
            assert attn.q_norm.weight.shape == (g.head_dim,) and attn.k_norm.weight.shape == (g.head_dim,)
        if hasattr(attn, "num_key_value_groups"):
            assert attn.num_key_value_groups == g.group_size
        if hasattr(attn, "num_heads"):
            assert attn.num_heads == info["num_heads"]
    assert torch.isfinite(logits(model)).all()
    assert rep.extra["block_params_after"] < rep.extra["block_params_before"]
    assert sum(p.numel() for p in model.parameters()) == rep.extra["params_after"]


def test_bias_compensation_preserves_output_for_constant_inputs():
    """Channels / KV groups whose output-projection input is constant are scored lowest (zero variance)
    and removed; their constant contribution moves into the bias, so the logits do not change."""
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, mlp_bias=True, attention_bias=True)
    cfg._attn_implementation = "eager"
    model = tf.LlamaForCausalLM(cfg).eval()
    hd = 16
    with torch.no_grad():
        for block in model.model.layers:
            const = torch.arange(48) * 2  # even channels: gate/up rows 0 with biases -> constant activation
            for lin in (block.mlp.gate_proj, block.mlp.up_proj):
                lin.weight[const] = 0
                lin.bias[const] = torch.randn(48)
            block.self_attn.v_proj.weight[hd:2 * hd] = 0  # KV group 1: constant values -> constant head output
            block.self_attn.v_proj.bias[hd:2 * hd] = torch.randn(hd)
    ref = logits(model)
    rep = prune(model, recipe("flap", 0.5, target="channels", ratios="uniform"), calibration=IDS)
    for i, block in enumerate(model.model.layers):
        assert block.mlp.down_proj.in_features == 48 and rep.extra["layers"][i]["kept_kv_groups"] == [0]
    torch.testing.assert_close(logits(model), ref, rtol=0, atol=2e-5)


@pytest.mark.parametrize("ratios,steps", [("global", 1), ("uniform", 1), ("global", 3)])
def test_parameter_count_matches_target(ratios, steps):
    model = tiny_model("llama")
    method = "flap_iterative" if steps > 1 else "flap"
    s = 0.37
    rep = prune(model, recipe(method, s, ratios=ratios, steps=steps), calibration=IDS)
    before, after = rep.extra["block_params_before"], rep.extra["block_params_after"]
    channel = 3 * 64  # gate row + up row + down column
    n_layers = len(rep.extra["layers"])
    tol = channel if ratios == "global" else channel * n_layers  # uniform: one channel per layer
    assert 0 <= after - (1 - s) * before <= tol
    assert len(rep.extra["steps"]) == steps
    assert rep.extra["achieved_sparsity"] == pytest.approx(1 - after / before)
    if ratios == "uniform":
        assert rep.extra["uniform_widths"]
        assert model.config.intermediate_size == rep.extra["layers"][0]["intermediate_size"]


def test_align_removal_by_hand():
    scores = torch.tensor([5., 1., 4., 2., 3., 0., 6., 7.])
    idx = lambda *i: torch.tensor(i, dtype=torch.long)  # noqa: E731
    # 5 kept -> 4: the lowest-scoring kept unit (index 4, score 3) goes too
    assert align_removal(scores, idx(1, 3, 5), 4).tolist() == [1, 3, 4, 5]
    # 7 kept -> 8 (nearest multiple): the removed unit comes back
    assert align_removal(scores, idx(5), 4).tolist() == []
    # 6 kept: halfway, rounds up to 8
    assert align_removal(scores, idx(1, 5), 4).tolist() == []
    # 1 kept -> at least one multiple: the three highest-scoring removed units return (indices 6, 0, 2)
    assert align_removal(scores, idx(0, 1, 2, 3, 4, 5, 6), 4).tolist() == [1, 3, 4, 5]
    assert align_removal(scores, idx(1, 5), 1).tolist() == [1, 5]  # multiple 1: unchanged
    assert align_removal(scores, idx(), 4).tolist() == []          # untouched module stays untouched


@pytest.mark.parametrize("method", ["flap", "wanda_sp", "flap_iterative"])
def test_channel_multiple_keeps_mlp_widths_aligned(method):
    model = tiny_model("llama")  # 96 MLP channels per layer
    rep = prune(model, {**recipe(method, 0.37, steps=2 if method == "flap_iterative" else 1),
                        "structured": {"channel_multiple": 16, **({"steps": 2} if method == "flap_iterative" else {})}},
                calibration=IDS)
    widths = [layer["intermediate_size"] for layer in rep.extra["layers"]]
    assert all(w % 16 == 0 for w in widths) and min(widths) < 96, widths
    assert rep.extra["channel_multiple"] == 16
    # rounding to multiples of 16 moves each layer by at most 8 channels: 8 x 192 of its 30,720 parameters
    assert rep.extra["achieved_sparsity"] == pytest.approx(0.37, abs=0.05)
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()


def test_iterative_uniform_removes_as_many_kv_groups_as_one_shot():
    """Each of k steps removes a small share of what is left; the KV-group count must still follow the
    cumulative ratio (flooring each step's share alone removed no group and over-pruned the MLP)."""
    widths = {}
    for method, steps in (("flap", 1), ("flap_iterative", 4)):
        torch.manual_seed(0)
        cfg = tf.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                             num_attention_heads=16, num_key_value_heads=8)  # fresh: pruning rewrites the config
        model = tf.LlamaForCausalLM(cfg).eval()
        rep = prune(model, recipe(method, 0.5, ratios="uniform", steps=steps), calibration=IDS)
        widths[method] = [(w["num_kv_heads"], w["intermediate_size"]) for w in rep.extra["layers"]]
    assert widths["flap_iterative"] == widths["flap"] == [(4, widths["flap"][0][1])] * 2


def test_structured_calibration_defaults(monkeypatch):
    """Each method's registered defaults fill what the recipe leaves unset; what the user states wins."""
    import prunepilot.job as job

    seen = {}

    def fake_split(tok, sources, n, seqlen, seed):
        seen.update(sources=sources, seqlen=seqlen)
        return Calibration(torch.randint(3, 128, (n, seqlen)), torch.zeros(0, dtype=torch.long), {})

    monkeypatch.setattr(job, "calibration_split", fake_split)
    tok = object()
    prune(tiny_model("llama"), {"method": "flap_iterative", "sparsity": 0.2, "calibration": {"n_samples": 2}}, tok)
    assert seen == {"sources": ["wiki", "web", "code", "math"], "seqlen": 128}
    prune(tiny_model("llama"), {"method": "flap_iterative", "sparsity": 0.2,
                                "calibration": {"sources": ["web"], "seqlen": 64, "n_samples": 2}}, tok)
    assert seen == {"sources": ["web"], "seqlen": 64}
    prune(tiny_model("llama"), {"method": "flap", "sparsity": 0.2, "calibration": {"n_samples": 2}}, tok)
    assert seen == {"sources": ["web"], "seqlen": 128}
    rep = prune(tiny_model("llama"), {"method": "wanda_sp", "sparsity": 0.2, "calibration": {"n_samples": 2}}, tok)
    assert (rep.extra["ratios"], rep.extra["bias_compensation"]) == ("uniform", False)
    rep = prune(tiny_model("llama"), {"method": "wanda_sp", "sparsity": 0.2, "calibration": {"n_samples": 2},
                                      "structured": {"ratios": "global"}}, tok)
    assert (rep.extra["ratios"], rep.extra["bias_compensation"]) == ("global", False)
    assert {"wanda_sp", "flap", "flap_iterative"} <= set(available())
    assert all(available()[m].pipeline.name == "structured" for m in ("wanda_sp", "flap", "flap_iterative"))
    with pytest.raises(PrunepilotError, match="schedule"):
        get_method("flap_iterative", schedule="cubic")


# ---------------------------------------------------------------------------------------------- save / load

def test_uniform_result_loads_with_plain_transformers(tmp_path):
    for method, bias in (("wanda_sp", False), ("flap", True)):
        model = tiny_model("llama")
        rep = prune(model, recipe(method, 0.4, ratios="uniform"), calibration=IDS)
        assert rep.extra["uniform_widths"] and rep.extra["bias_compensation"] == bias
        assert (model.model.layers[0].mlp.down_proj.bias is not None) == bias
        save_pruned(model, None, tmp_path / method)
        assert not (tmp_path / method / WIDTHS_FILE).exists()
        cfg = json.loads((tmp_path / method / "config.json").read_text())
        assert cfg["intermediate_size"] == rep.extra["layers"][0]["intermediate_size"]
        assert cfg["mlp_bias"] == cfg["attention_bias"] == bias
        plain = tf.AutoModelForCausalLM.from_pretrained(tmp_path / method, attn_implementation="eager")
        assert torch.equal(logits(plain), logits(model))


@pytest.mark.parametrize("arch", ["qwen3", "phi3"])
def test_non_uniform_result_round_trips_with_widths_file(tmp_path, arch):
    from prunepilot.modeling import load_model

    model = tiny_model(arch)
    rep = prune(model, recipe("flap", 0.45), calibration=IDS)
    assert not rep.extra["uniform_widths"]
    save_pruned(model, None, tmp_path / "m")
    widths = json.loads((tmp_path / "m" / WIDTHS_FILE).read_text())
    assert [w["intermediate_size"] for w in widths["layers"]] == [w["intermediate_size"] for w in rep.extra["layers"]]
    again = load_pruned(tmp_path / "m", attn_implementation="eager")
    assert torch.equal(logits(again), logits(model))
    assert torch.allclose(logits(load_model(tmp_path / "m")), logits(model), atol=1e-5)  # default (sdpa) attention
    with pytest.raises(PrunepilotError, match="not empty"):
        save_pruned(model, None, tmp_path / "m")
    save_pruned(model, None, tmp_path / "m", overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left behind


def test_bfloat16_result_reloads_exactly_with_widths_file(tmp_path):
    tiny_model("llama").to(torch.bfloat16).save_pretrained(tmp_path / "dense")
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.bfloat16,
                                                    attn_implementation="eager").eval()
    rep = prune(model, recipe("flap", 0.45), calibration=IDS)
    assert not rep.extra["uniform_widths"]
    save_pruned(model, None, tmp_path / "m")
    again = load_pruned(tmp_path / "m", dtype="bfloat16", attn_implementation="eager")
    assert next(again.parameters()).dtype == torch.bfloat16
    assert again.model.rotary_emb.inv_freq.dtype == model.model.rotary_emb.inv_freq.dtype
    assert torch.equal(logits(again), logits(model))


# ---------------------------------------------------------------------------------------------- errors, speed

def test_bad_inputs_are_clear_errors():
    with pytest.raises(PrunepilotError, match="too high"):
        prune(tiny_model("llama"), recipe("flap", 0.99), calibration=IDS)
    with pytest.raises(PrunepilotError, match="too high"):
        prune(tiny_model("llama"), recipe("flap", 0.8, prune_channels=False), calibration=IDS)  # heads only
    # 0.7 is reachable keeping one channel per layer (max 0.79), not keeping 48 of the 96 (max 0.50)
    with pytest.raises(PrunepilotError, match=r"48 MLP channels \(channel_multiple 48\).* at most 0.496"):
        prune(tiny_model("llama"), recipe("flap", 0.7, channel_multiple=48), calibration=IDS)
    with pytest.raises(PrunepilotError, match="structured pruning needs"):
        prune(tiny_model("gpt2"), recipe("flap", 0.3), calibration=IDS)
    moe = tiny_model("qwen3_moe")
    moe.model.layers[0].mlp.experts.has_bias = True  # gpt-oss-style experts
    with pytest.raises(PrunepilotError, match="experts layout structured pruning does not support"):
        prune(moe, recipe("flap", 0.3), calibration=IDS)
    with pytest.raises(PrunepilotError, match="N:M"):
        prune(tiny_model("llama"), {**recipe("wanda_sp", 0.3), "pattern": "2:4"}, calibration=IDS)
    with pytest.raises(PrunepilotError, match="calibration"):
        prune(tiny_model("llama"), recipe("flap", 0.3))
    with pytest.raises(PrunepilotError, match="keep at least one"):
        keep_kv_groups(tiny_model("llama").model.layers[0], [], 16)
    for bad in (torch.zeros(0, 16, dtype=torch.long), IDS[0], IDS.float(), IDS[:, :1], [[1, 2, 3]]):
        with pytest.raises(PrunepilotError, match="token ids"):  # given ids are checked, never silently used
            prune(tiny_model("llama"), recipe("flap", 0.3), calibration=bad)
        with pytest.raises(PrunepilotError, match="token ids"):
            prune(tiny_model("llama"), {"method": "wanda", "device": "cpu"}, calibration=bad)


def test_measure_speed_reports_throughput():
    r = measure_speed(tiny_model("llama"), seq_len=16, batch=2, new_tokens=4, repeats=2)
    assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["seq_len"] == 16


# ---------------------------------------------------------------------------------------------- real model

def test_stories260k_flap_iterative_real_model(stories, tmp_path):
    from prunepilot.eval.perplexity import perplexity

    make, tok = stories
    model = make()
    dense = perplexity(model, tok, "tinystories#400:", seqlen=256, max_windows=8)["ppl"]
    rep = prune(model, {"method": "flap_iterative", "sparsity": 0.2, "device": "cpu", "structured": {"steps": 2},
                        "calibration": {"sources": ["tinystories#0:400"], "n_samples": 32}}, tok)
    assert rep.calibration["seqlen"] == 128
    assert rep.extra["achieved_sparsity"] == pytest.approx(0.2, abs=0.02)
    assert all(1 <= w["num_kv_heads"] <= 4 and w["num_heads"] == 2 * w["num_kv_heads"] for w in rep.extra["layers"])
    pruned = perplexity(model, tok, "tinystories#400:", seqlen=256, max_windows=8)["ppl"]
    assert math.isfinite(pruned) and dense < pruned < 3 * dense  # damaged, not destroyed
    save_pruned(model, tok, tmp_path / "s")
    again = load_pruned(tmp_path / "s")
    ids = torch.randint(0, 512, (2, 32))
    torch.testing.assert_close(logits(again, ids), logits(model, ids), rtol=0, atol=1e-5)


def test_stories260k_uniform_results_reload(stories, tmp_path):
    """50%: 2 of 4 KV groups left (4 heads) -> a plain checkpoint. 30%: 3 groups = 6 heads, which LlamaConfig
    rejects (hidden 64 % 6 != 0) -> the widths file, loaded by load_pruned."""
    make, tok = stories
    ids = torch.randint(0, 512, (2, 32))
    for sparsity, heads, plain in ((0.5, 4, True), (0.3, 6, False)):
        model = make()
        rep = prune(model, {"method": "wanda_sp", "sparsity": sparsity, "device": "cpu",
                            "structured": {"bias_compensation": True},
                            "calibration": {"sources": ["tinystories#0:200"], "n_samples": 16}}, tok)
        assert rep.extra["uniform_widths"] and rep.extra["layers"][0]["num_heads"] == heads
        out = tmp_path / f"s{sparsity}"
        save_pruned(model, tok, out)
        assert (out / "tokenizer.model").exists() and (out / WIDTHS_FILE).exists() != plain
        again = tf.AutoModelForCausalLM.from_pretrained(out) if plain else load_pruned(out)
        torch.testing.assert_close(logits(again, ids), logits(model, ids), rtol=0, atol=1e-5)


def test_unaligned_widths_are_reported(caplog):
    with caplog.at_level("WARNING"):
        warn_unaligned([{"intermediate_size": 128}, {"intermediate_size": 90}], [128, 128], 1)
    assert "1 layers have MLP widths that are not multiples of 64 (e.g. 90)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        warn_unaligned([{"intermediate_size": 90}], [128], 16)  # the user chose a multiple: quiet
        warn_unaligned([{"intermediate_size": 90}], [100], 1)   # the dense width was not aligned either
    assert not caplog.text
