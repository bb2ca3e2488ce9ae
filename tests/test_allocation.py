import pytest
import torch

from prunepilot import allocation
from prunepilot.api import prune
from prunepilot.engine import ModelAdapter, weight_2d
from prunepilot.errors import PrunepilotError
from prunepilot.testing.tiny_models import tiny_model


def test_owl_hand_computed():
    # outlier ratios 0, 0.5, 1 -> scaled to [0, 0.16] -> densities 0.42, 0.5, 0.58 around 1 - 0.5
    s = allocation.owl([0.0, 0.5, 1.0], 0.5, lam=0.08)
    assert s == pytest.approx([0.58, 0.5, 0.42])
    assert allocation.owl([0.2, 0.2], 0.6) == pytest.approx([0.6, 0.6])  # no spread: uniform
    assert sum(allocation.owl([0.1, 0.4, 0.3, 0.9], 0.7)) / 4 == pytest.approx(0.7)


def test_outlier_ratio():
    scores = [torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 100.0])]
    # mean 10.9; only 100 > 5 * 10.9
    assert allocation.outlier_ratio(scores, m=5) == pytest.approx(0.1)


def test_explicit_allocation():
    assert allocation.explicit({"0": 0.1, "2-3": 0.7}, 5, 0.5) == [0.1, 0.5, 0.7, 0.7, 0.5]
    with pytest.raises(PrunepilotError, match="has 5 blocks"):
        allocation.explicit({"7": 0.1}, 5, 0.5)
    with pytest.raises(PrunepilotError, match="block index"):
        allocation.explicit({"q_proj": 0.1}, 5, 0.5)
    with pytest.raises(PrunepilotError, match="sparsity"):
        allocation.explicit({"1": 1.2}, 5, 0.5)


def test_owl_and_explicit_through_prune():
    ids = torch.randint(3, 128, (4, 16))
    model = tiny_model("llama")
    rep = prune(model, {"method": "wanda", "sparsity": 0.5, "allocation": {"kind": "owl"}, "device": "cpu"},
                calibration=ids)
    assert sum(rep.block_sparsity_target) / 3 == pytest.approx(0.5)
    assert len(set(round(s, 6) for s in rep.block_sparsity_target)) > 1
    model = tiny_model("llama")
    rep = prune(model, {"method": "wanda", "sparsity": 0.5, "device": "cpu",
                        "allocation": {"kind": "explicit", "layers": {"0": 0.25, "2": 0.75}}}, calibration=ids)
    ad = ModelAdapter(model, ignore=["lm_head"])
    for i, target in enumerate([0.25, 0.5, 0.75]):
        for lin in ad.linears(i).values():
            W = weight_2d(lin)
            assert (W == 0).float().mean().item() == pytest.approx(int(W.shape[1] * target) / W.shape[1])
