"""Mixture-of-experts models (experts in fused 3-D parameters) and the coverage accounting of every block weight."""
import pytest
import torch
import transformers as tf

from prunepilot.api import prune
from prunepilot.engine import ExpertMatrix, ModelAdapter, input_hooks, weight_2d
from prunepilot.errors import PrunepilotError
from prunepilot.methods.base import InputNormState
from prunepilot.methods.wanda import Wanda
from prunepilot.testing.tiny_models import MOE_CONFIGS, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py
IDS = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(0))


def two_expert_toy():
    """Two experts over H=4 (I=2) with all-ones weights; tokens 0, 1 go to expert 0 and tokens 2, 3 to expert 1."""
    cfg = tf.Qwen3MoeConfig(hidden_size=4, moe_intermediate_size=2, num_experts=2, num_experts_per_tok=1)
    experts = tf.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeExperts(cfg)
    with torch.no_grad():
        experts.gate_up_proj.fill_(1.0)
        experts.down_proj.fill_(1.0)
    hidden = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0]))           # token t has only feature t, of value t + 1
    route = torch.tensor([[0], [0], [1], [1]])                          # (tokens, top_k)
    return experts, hidden, route


def test_expert_statistics_come_from_routed_tokens_only():
    experts, hidden, route = two_expert_toy()
    mats = {f"e{e}.{a}": ExpertMatrix(experts, a, e) for e in (0, 1) for a in ("gate_up_proj", "down_proj")}
    states = {n: InputNormState(m.in_features, "cpu") for n, m in mats.items()}
    with input_hooks(mats, lambda n, x: states[n].add(x)):
        experts(hidden, route, torch.ones(4, 1))
    assert not experts._forward_hooks  # removed on exit
    # ‖X_j‖² / n over the routed tokens: expert 0 saw tokens 0, 1 -> features 0, 1; expert 1 features 2, 3
    assert states["e0.gate_up_proj"].sq_mean.tolist() == [0.5, 2.0, 0.0, 0.0]
    assert states["e1.gate_up_proj"].sq_mean.tolist() == [0.0, 0.0, 4.5, 8.0]
    assert states["e0.gate_up_proj"].n == states["e1.down_proj"].n == 2
    act = experts.act_fn(torch.tensor([1.0, 2.0]))  # gate = up = the token's one feature value
    torch.testing.assert_close(states["e0.down_proj"].sq_mean, (act * torch.tensor([1.0, 2.0])).pow(2).mean().repeat(2))
    # Wanda 50% row-wise: each expert keeps the two input features its own tokens use
    wanda = Wanda()
    for e, kept in ((0, [0, 1]), (1, [2, 3])):
        m = mats[f"e{e}.gate_up_proj"]
        wanda.prune(weight_2d(m), states[f"e{e}.gate_up_proj"], 0.5, None)
        assert (experts.gate_up_proj[e] != 0).nonzero()[:, 1].unique().tolist() == kept  # written into the 3-D tensor


@pytest.mark.parametrize("arch", list(MOE_CONFIGS))
@pytest.mark.parametrize("method,pattern", [("magnitude", "unstructured"), ("wanda", "unstructured"),
                                            ("sparsegpt", "unstructured"), ("wanda", "2:4")])
def test_moe_experts_are_pruned_and_routers_kept(arch, method, pattern):
    model = tiny_model(arch)
    router = model.model.layers[0].mlp.gate.weight.detach().clone()
    rep = prune(model, {"method": method, "sparsity": 0.5, "pattern": pattern, "device": "cpu",
                        "calibration": {"min_expert_tokens": 0}}, calibration=IDS)
    experts = model.model.layers[0].mlp.experts
    for p in (experts.gate_up_proj, experts.down_proj):
        for e in range(p.shape[0]):
            assert (p[e] == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert torch.equal(model.model.layers[0].mlp.gate.weight, router)
    cov = rep.coverage
    assert cov["eligible_params"] == sum(v["numel"] for v in rep.layers.values())
    assert set(cov["excluded"]) == {f"model.layers.{i}.mlp.gate.weight" for i in range(3)}
    assert all("router" in r for r in cov["excluded"].values()) and cov["experts_magnitude_fallback"] == {}


def test_experts_with_too_few_routed_tokens_fall_back_to_magnitude_and_are_reported(caplog):
    model = tiny_model("qwen3_moe")
    rep = prune(model, {"method": "wanda", "sparsity": 0.5, "device": "cpu",
                        "calibration": {"min_expert_tokens": 10 ** 6}}, calibration=IDS)
    starved = rep.coverage["experts_magnitude_fallback"]
    assert len(starved) == 3 * 4 * 2 and all(isinstance(n, int) for n in starved.values())
    assert "pruned by weight magnitude" in caplog.text
    w = weight_2d(ExpertMatrix(model.model.layers[1].mlp.experts, "down_proj", 2))
    assert (w == 0).sum(1).tolist() == [w.shape[1] // 2] * w.shape[0]  # row-wise |W|


def test_a_block_weight_no_method_handles_is_an_error_unless_excluded():
    model = tiny_model("llama")
    model.model.layers[1].mlp.scale = torch.nn.Parameter(torch.ones(8, 8))  # a matrix that is no linear's weight
    with pytest.raises(PrunepilotError, match=r"model\.layers\.1\.mlp\.scale is a \(8, 8\) parameter.*--ignore"):
        prune(model, {"method": "magnitude", "sparsity": 0.5})
    rep = prune(model, {"method": "magnitude", "sparsity": 0.5, "ignore": ["lm_head", r"mlp\.scale"]})
    assert rep.coverage["excluded"] == {"model.layers.1.mlp.scale": "excluded by include/ignore (a (8, 8) parameter "
                                                                     "that is not a linear layer's weight)"}
    assert rep.coverage["excluded_params"] == 64


def test_user_exclusions_are_named_with_their_size():
    model = tiny_model("llama")
    rep = prune(model, {"method": "magnitude", "sparsity": 0.5, "ignore": ["down_proj"]})
    down = {n for n in rep.coverage["excluded"] if n.endswith("down_proj")}
    assert len(down) == 3 and rep.coverage["excluded_params"] == 3 * 64 * 96
    assert rep.coverage["eligible_params"] + rep.coverage["excluded_params"] == ModelAdapter(
        tiny_model("llama")).coverage().eligible_params


def test_unsupported_expert_layouts_are_refused_by_name():
    model = tiny_model("qwen3_moe")
    model.model.layers[0].mlp.experts.has_bias = True  # as gpt-oss's experts: a layout the hooks do not compute
    with pytest.raises(PrunepilotError, match=r"layers\.0\.mlp\.experts is a set of fused experts in an unsupported "
                                              r"layout \(has_bias=True\)"):
        prune(model, {"method": "wanda", "sparsity": 0.5, "device": "cpu"}, calibration=IDS)


# ---------------------------------------------------------------------------------------------- structured


def test_slicing_each_experts_own_zeroed_channels_keeps_logits():
    from prunepilot.engine.layout import block_layout
    from prunepilot.structured.slicing import keep_mlp_channels

    model = tiny_model("qwen3_moe")
    x = torch.randint(3, 128, (2, 16))
    keeps = []
    with torch.no_grad():
        for block in model.model.layers:
            ex = block.mlp.experts
            gone = torch.stack([torch.randperm(32, generator=torch.Generator().manual_seed(e))[:8] for e in range(4)])
            for e in range(4):
                ex.down_proj[e][:, gone[e]] = 0  # each expert loses other channels
            keeps.append(torch.stack([torch.tensor([c for c in range(32) if c not in gone[e]]) for e in range(4)]))
        ref = model(x).logits
        for block, keep in zip(model.model.layers, keeps):
            keep_mlp_channels(block, keep, parts=block_layout(block).mlp)
            assert block.mlp.experts.gate_up_proj.shape == (4, 48, 64) and block.mlp.experts.down_proj.shape == (4, 64, 24)
        torch.testing.assert_close(model(x).logits, ref, rtol=0, atol=1e-6)


def test_structured_experts_drop_their_own_weakest_channels_by_routed_statistics():
    """flap on an MoE block: every expert keeps the same number of channels (the tensors stay 3-D), each
    removing the channels with its lowest FLAP scores over the tokens routed to it."""
    from prunepilot.engine import blocks
    from prunepilot.moments import RunningMoments
    from prunepilot.structured.scores import fluctuation_scores, standardize

    dense = tiny_model("qwen3_moe")
    observed = {}
    for blk in blocks(ModelAdapter(dense), IDS, "cpu", states=lambda n, m: RunningMoments(m.in_features),
                      linears=lambda i, b: {e: ExpertMatrix(b.mlp.experts, "down_proj", e) for e in range(4)},
                      outputs="dense"):
        w = blk.module.mlp.experts.down_proj
        observed[blk.index] = [standardize(fluctuation_scores(w[e], blk.states[e])).argsort(stable=True)
                               for e in range(4)]
    model = tiny_model("qwen3_moe")
    rep = prune(model, {"method": "flap", "sparsity": 0.3, "device": "cpu", "structured": {"prune_heads": False},
                        "calibration": {"min_expert_tokens": 0}}, calibration=IDS)
    for i, block in enumerate(model.model.layers):
        width = rep.extra["layers"][i]["intermediate_size"]
        assert width % 8 == 0 and width < 32  # aligned for transformers' grouped_mm experts kernel
        for e in range(4):
            kept = observed[i][e][32 - width:].sort().values  # all but its 32 - width weakest
            dense_down = dense.model.layers[i].mlp.experts.down_proj[e]
            assert torch.equal(block.mlp.experts.down_proj[e], dense_down[:, kept])


@pytest.mark.parametrize("arch", list(MOE_CONFIGS))
@pytest.mark.parametrize("method", ["flap", "wanda_sp", "flap_iterative"])
def test_structured_moe_reloads(arch, method, tmp_path):
    from prunepilot.modeling import load_model, save_pruned
    from prunepilot.structured.saving import WIDTHS_FILE

    model = tiny_model(arch)
    rep = prune(model, {"method": method, "sparsity": 0.4, "device": "cpu", "calibration": {"min_expert_tokens": 0}},
                calibration=IDS)
    assert 0.3 < rep.extra["achieved_sparsity"] < 0.5
    assert rep.extra["params_after"] == sum(p.numel() for p in model.parameters())
    save_pruned(model, None, tmp_path / "m")
    uniform = len({w["intermediate_size"] for w in rep.extra["layers"]}) == 1 and not rep.extra["bias_compensation"]
    if not uniform:  # per-layer widths (or compensation biases): prunepilot's widths file; else a plain checkpoint
        assert (tmp_path / "m" / WIDTHS_FILE).exists()
    again = load_model(tmp_path / "m")
    x = torch.randint(3, 128, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, model(x).logits, rtol=0, atol=1e-5)


def test_structured_experts_with_too_few_routed_tokens_are_scored_by_weights_and_reported():
    model = tiny_model("mixtral")
    rep = prune(model, {"method": "flap", "sparsity": 0.3, "device": "cpu",
                        "calibration": {"min_expert_tokens": 10 ** 6}}, calibration=IDS)
    starved = rep.coverage["experts_scored_by_weights"]
    assert len(starved) == 3 * 4 and all(isinstance(n, int) for n in starved.values())


def test_removing_the_least_routed_experts_keeps_the_router_consistent(tmp_path):
    """remove_experts: each layer drops the experts the router sends the fewest calibration tokens (never
    leaving fewer than its top-k); the router loses their rows, so it scores and picks among the kept ones."""
    from prunepilot.engine import blocks
    from prunepilot.modeling import load_model, save_pruned
    from prunepilot.structured.expert_scores import TokenCount

    dense = tiny_model("qwen3_moe")
    routed = {}
    for blk in blocks(ModelAdapter(dense), IDS, "cpu", states=lambda n, m: TokenCount(), outputs="dense",
                      linears=lambda i, b: {e: ExpertMatrix(b.mlp.experts, "gate_up_proj", e) for e in range(4)}):
        routed[blk.index] = [blk.states[e].n for e in range(4)]
    model = tiny_model("qwen3_moe")
    rep = prune(model, {"method": "flap", "sparsity": 0.45, "device": "cpu", "calibration": {"min_expert_tokens": 0},
                        "structured": {"remove_experts": 0.9}}, calibration=IDS)
    for i, block in enumerate(model.model.layers):
        kept = rep.extra["layers"][i]["kept_experts"]
        assert len(kept) == 2 == block.mlp.gate.top_k  # 90% of 4 would leave fewer than top-k = 2
        assert sorted(kept) == sorted(sorted(range(4), key=lambda e: -routed[i][e])[:2])  # the most routed stay
        assert torch.equal(block.mlp.gate.weight, dense.model.layers[i].mlp.gate.weight[kept])
        assert block.mlp.experts.num_experts == 2 and block.mlp.experts.gate_up_proj.shape[0] == 2
    save_pruned(model, None, tmp_path / "m")
    x = torch.randint(3, 128, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "m")(x).logits, model(x).logits, rtol=0, atol=1e-5)


def test_reap_score_by_hand():
    """REAP S_j = mean over the tokens routed to j of g_j(x)·‖f_j(x)‖₂. Toy: all-ones experts, so a token whose one
    feature is v gives gate = up = v and f(x) = 2·silu(v)·v in each of the 4 outputs: ‖f‖ = 4·v·silu(v); expert 1's
    down_proj is scaled by 0.01. The router sends tokens 0, 1 (v = 1, 2) to expert 0 with logits (v, 0) and tokens
    2, 3 (v = 3, 4) to expert 1 with logits (0, v): g = e^v / (e^v + 1) (top-1, not renormalised)."""
    from prunepilot.structured.expert_scores import ReapScore, TokenCount

    experts, hidden, _ = two_expert_toy()
    cfg = tf.Qwen3MoeConfig(hidden_size=4, num_experts=2, num_experts_per_tok=1, norm_topk_prob=False)
    router = tf.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeTopKRouter(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]))
        experts.down_proj[1].mul_(0.01)
    mats = {e: ExpertMatrix(experts, "gate_up_proj", e) for e in (0, 1)}
    reap = {e: ReapScore(m, router) for e, m in mats.items()}
    freq = {e: TokenCount() for e in mats}
    _, weights, index = router(hidden)
    assert index.flatten().tolist() == [0, 0, 1, 1]
    with input_hooks(mats, lambda e, x: (reap[e].add(x), freq[e].add(x))):
        experts(hidden, index, weights)
    v = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    g, norm = v.exp() / (v.exp() + 1), 4 * v * torch.nn.functional.silu(v) * torch.tensor([1, 1, 0.01, 0.01])
    assert [freq[e].score for e in (0, 1)] == [2.0, 2.0]
    for e in (0, 1):
        assert reap[e].score == pytest.approx(float((g * norm)[2 * e: 2 * e + 2].mean()), rel=1e-6)


def moe_layer_inputs(model, layer: int) -> torch.Tensor:
    """The hidden states (tokens, H) the MoE block of `layer` receives over IDS (one forward per row, as the pass)."""
    seen = []
    handle = model.model.layers[layer].mlp.register_forward_pre_hook(lambda m, args: seen.append(args[0].flatten(0, 1)))
    with torch.no_grad():
        for row in IDS:
            model(row[None])
    handle.remove()
    return torch.cat(seen)


@torch.no_grad()
def reap_by_hand(block, x: torch.Tensor) -> list[float]:
    """REAP of every expert of an MoE block, written out: softmax router, top-k, g·‖down(silu(gate)·up)‖ averaged
    over each expert's routed tokens (this tiny config does not renormalise the top-k weights)."""
    probs = torch.softmax(x @ block.mlp.gate.weight.T, dim=-1)                          # (T, E)
    top = probs.topk(block.mlp.gate.top_k, dim=-1).indices                              # (T, k)
    ex, out = block.mlp.experts, []
    for e in range(probs.shape[1]):
        routed = (top == e).any(-1)
        gate, up = (x[routed] @ ex.gate_up_proj[e].T).chunk(2, dim=-1)
        norm = ((torch.nn.functional.silu(gate) * up) @ ex.down_proj[e].T).norm(dim=-1)
        out.append(float((probs[routed, e] * norm).mean()))
    return out


def test_reap_removes_a_frequent_but_silent_expert(tmp_path):
    """Layer 0's most routed expert is made nearly silent (down_proj x 1e-3): frequency keeps it, REAP removes it.
    REAP's scores equal the hand-written ones; the pruned model reloads equal."""
    from prunepilot.modeling import load_model, save_pruned

    def model_with_silent_expert():
        m = tiny_model("qwen3_moe")
        counts = torch.bincount(m.model.layers[0].mlp.gate(moe_layer_inputs(m, 0))[2].flatten(), minlength=4)
        with torch.no_grad():
            m.model.layers[0].mlp.experts.down_proj[int(counts.argmax())].mul_(1e-3)
        return m, int(counts.argmax())

    dense, silent = model_with_silent_expert()
    expected = reap_by_hand(dense.model.layers[0], moe_layer_inputs(dense, 0))
    kept = {}
    for score in ("frequency", "reap"):
        model, _ = model_with_silent_expert()
        rep = prune(model, {"method": "flap", "sparsity": 0.45, "device": "cpu",
                            "calibration": {"min_expert_tokens": 0},
                            "structured": {"remove_experts": 0.5, "expert_score": score}}, calibration=IDS)
        kept[score] = rep.extra["layers"][0]["kept_experts"]
        assert rep.extra["expert_score"] == score and len(kept[score]) == 2
    assert silent in kept["frequency"] and silent not in kept["reap"]
    assert rep.extra["layers"][0]["expert_scores"] == pytest.approx(expected, rel=1e-4)
    assert kept["reap"] == sorted(sorted(range(4), key=lambda e: -expected[e])[:2])
    assert torch.equal(model.model.layers[0].mlp.gate.weight, dense.model.layers[0].mlp.gate.weight[kept["reap"]])
    save_pruned(model, None, tmp_path / "m")
    x = torch.randint(3, 128, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "m")(x).logits, model(x).logits, rtol=0, atol=1e-5)
