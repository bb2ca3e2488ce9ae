"""Agent profile math: z-scores, the Wanda percentile s, the extra row-wise mask, the profile pass, gradients."""
import math

import pytest
import torch

from prunepilot.agent import percentile
from prunepilot.agent.profile import Profile, extra_rowwise_mask, gradient_importance, prune_and_profile
from prunepilot.engine import ModelAdapter, blocks, weight_2d
from prunepilot.stats import zscore_list as zscore
from prunepilot.methods.base import InputNormState
from prunepilot.methods.wanda import wanda_scores
from prunepilot.testing.tiny_models import tiny_model

from agent_helpers import tiny_data


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def test_zscore_is_exact():
    z = zscore([1.0, 2.0, 3.0])  # mean 2, population std sqrt(2/3)
    assert z == pytest.approx([-math.sqrt(1.5), 0.0, math.sqrt(1.5)], abs=1e-8)
    assert zscore([5.0, 5.0]) == [0.0, 0.0]  # std 0: the 1e-9 keeps it finite
    assert sum(zscore([0.3, 7.0, -2.0, 11.0])) == pytest.approx(0.0, abs=1e-12)


def test_wanda_percentile_hand_checked_on_a_tiny_layer():
    W = torch.tensor([[1.0, -2.0, 0.0, 4.0],
                      [0.5, 0.0, -3.0, 6.0]])
    sq_mean = torch.tensor([1.0, 4.0, 9.0, 0.25])  # ||X_j|| ∝ 1, 2, 3, 0.5
    scores = wanda_scores(W, sq_mean)               # [[1, 4, 0, 2], [0.5, 0, 9, 3]]
    alive = scores[W != 0]                          # sorted: 0.5 1 2 3 4 9
    # 10th percentile, linear interpolation: position 0.1 * (6 - 1) = 0.5 -> 0.5 + 0.5 * (1 - 0.5)
    assert percentile(alive, 0.10) == pytest.approx(0.75)
    assert percentile(alive, 0.10) == pytest.approx(torch.quantile(alive, 0.10).item())
    assert percentile(alive, 0.0) == 0.5 and percentile(alive, 1.0) == 9.0
    assert percentile(torch.tensor([]), 0.1) == 0.0
    for by_sort in (True, False):  # the sort path (default on CUDA) and the selection path agree exactly
        assert percentile(alive, 0.10, by_sort=by_sort) == pytest.approx(0.75)
        assert percentile(alive, 1.0, by_sort=by_sort) == 9.0
    x = torch.randint(0, 50, (10_001,)).float()  # many ties
    for q in (0.0, 0.1, 0.37, 0.5, 1.0):
        assert percentile(x, q, by_sort=True) == percentile(x, q, by_sort=False) == \
            pytest.approx(torch.quantile(x, q).item())


def test_extra_rowwise_mask_prunes_lowest_alive_per_row_exactly():
    scores = torch.tensor([[5.0, 1.0, 3.0, 2.0, 4.0],
                           [1.0, 2.0, 3.0, 4.0, 5.0]])
    alive = torch.tensor([[True, False, True, True, True],
                          [True, True, True, True, True]])
    m = extra_rowwise_mask(scores, alive, 0.5)
    # 9 alive x 0.5 = 4.5 -> 4 (round half to even); rows: floor(2.0)=2, floor(2.5)=2
    assert m.tolist() == [[False, False, True, True, False], [True, True, False, False, False]]
    assert not (m & ~alive).any()
    m = extra_rowwise_mask(scores, alive, 0.3)  # 2.7 -> 3: rows 1.2 + 1.5 -> 1 + 1, then +1 to row 1
    assert m.sum(1).tolist() == [1, 2]


def test_profile_pass_measures_the_current_model():
    """s = 10th pct of |W|·||X|| over the non-zero weights, norms taken from the (pruned) model's pass."""
    model = tiny_model("llama")
    ad = ModelAdapter(model, ignore=["lm_head"])
    ids, _ = tiny_data()
    s = prune_and_profile(ad, ids, "cpu", {}, 0.1)
    first = next(iter(blocks(ad, ids, "cpu", states=lambda n, m: InputNormState(weight_2d(m).shape[1], "cpu"))))
    lin, states = first.linears, first.states
    for n, m in lin.items():
        sc = wanda_scores(weight_2d(m), states[n].sq_mean)
        assert s[n] == pytest.approx(torch.quantile(sc.flatten(), 0.1).item(), rel=1e-5)
    # prune 30% more of one layer: its new s is over the surviving weights only, so it rises
    name = "model.layers.1.mlp.down_proj"
    s2 = prune_and_profile(ad, ids, "cpu", {name: 0.3}, 0.1)
    w = weight_2d(ad.all_linears()[name])
    assert (w == 0).float().mean().item() == pytest.approx(0.3, abs=1e-3)
    assert s2[name] > s[name]
    prof = Profile(list(s2), *_counts(ad), s2, {n: 1.0 for n in s2})
    rows = prof.rows()
    assert [r["z_s"] for r in rows] == sorted(r["z_s"] for r in rows)
    assert all(r["z_g"] == 0.0 for r in rows)


def _counts(ad):
    from prunepilot.agent.profile import zero_counts
    return zero_counts(ad)


def test_blockwise_gradients_equal_full_backward():
    model = tiny_model("llama")
    ad = ModelAdapter(model, ignore=["lm_head"])
    ids, _ = tiny_data()
    full = gradient_importance(model, ad, ids[:2], "cpu", "full")
    block = gradient_importance(model, ad, ids[:2], "cpu", "blockwise")
    assert set(full) == set(ad.all_linears()) and all(v > 0 for v in full.values())
    for n in full:
        assert block[n] == pytest.approx(full[n], rel=1e-4)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # flags restored
