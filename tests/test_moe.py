"""Mixture-of-experts models (experts in fused 3-D parameters) and the coverage accounting of every block weight."""
import pytest
import torch
import transformers as tf

from prunepilot.api import prune
from prunepilot.engine import ExpertMatrix, ModelAdapter, input_hooks, weight_2d
from prunepilot.errors import PrunepilotError
from prunepilot.methods.base import InputNormState
from prunepilot.methods.wanda import Wanda
from tiny_models import MOE_CONFIGS, tiny_model

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
