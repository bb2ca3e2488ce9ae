"""RIA scores and masks, hand-computed; N:M channel permutations folded into the mask."""
import itertools
import math
import sys

import pytest
import torch

from prunepilot.errors import PrunepilotError
from prunepilot.methods.base import InputNormState
from prunepilot.methods.nm_permutation import permuted_nm_mask, slot_assignment, snake_permutation
from prunepilot.methods.ria import ria_scores
from prunepilot.registry import available, get_method

W = torch.tensor([[1.0, -2.0, 3.0],
                  [4.0, 0.0, -1.0]])
SQ_NORM = torch.tensor([4.0, 1.0, 9.0])  # ‖X_j‖² / n -> ‖X_j‖ = 2, 1, 3
# |W| column sums 5, 2, 4; row sums 6, 5
RELATIVE = torch.tensor([[1 / 5 + 1 / 6, 2 / 2 + 2 / 6, 3 / 4 + 3 / 6],
                         [4 / 5 + 4 / 5, 0.0, 1 / 4 + 1 / 5]])


def state_with(sq_norm):
    s = InputNormState(len(sq_norm), "cpu")
    s.sq_mean, s.n = sq_norm.clone(), 1
    return s


def test_ria_scores_by_hand():
    want_a1 = torch.tensor([[11 / 15, 4 / 3, 15 / 4],
                            [16 / 5, 0.0, 27 / 20]])
    assert torch.allclose(ria_scores(W, SQ_NORM, a=1.0), want_a1)
    default = get_method("ria").scores(W, state_with(SQ_NORM))  # a = 0.5: ‖X_j‖^0.5 = √2, 1, √3
    assert torch.allclose(default, RELATIVE * torch.tensor([math.sqrt(2), 1.0, math.sqrt(3)]))


def test_ria_unstructured_compares_the_whole_layer_by_default():
    # scores (a=1) 0.733 1.333 3.75 / 3.2 0 1.35: the layer's 3 lowest are (1,1), (0,0), (0,1)
    w = W.clone()
    mask = get_method("ria", a=1.0).prune(w, state_with(SQ_NORM), 0.5, None)
    assert mask.tolist() == [[True, True, False], [False, True, False]]
    assert w.tolist() == [[0.0, 0.0, 3.0], [4.0, 0.0, -1.0]]
    row = get_method("ria", a=1.0, granularity="row").prune(W.clone(), state_with(SQ_NORM), 0.5, None)
    assert row.tolist() == [[True, False, False], [False, True, False]]  # one per row


def test_ria_zero_row_or_column_scores_zero():
    w = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    s = ria_scores(w, torch.ones(2))
    assert torch.isfinite(s).all() and s.tolist() == [[0.0, 0.0], [2.0, 0.0]]


def test_ria_is_registered_with_options():
    assert "ria" in available()
    with pytest.raises(PrunepilotError):
        get_method("ria", permute="random")


SCORES_1x8 = torch.tensor([[8.0, 7, 6, 5, 4, 3, 2, 1]])


def test_snake_permutation_by_hand():
    # ascending by score: cols 7 6 | 5 4 | 3 2 | 1 0; chunk k fills slot k, odd chunks reversed
    assert snake_permutation(SCORES_1x8, 4).tolist() == [7, 4, 3, 0, 6, 5, 2, 1]


def test_greedy_permutation_keeps_more_than_plain_nm():
    plain = get_method("ria").prune(torch.ones(1, 8), state_with(torch.ones(8)), 0.5, (2, 4))
    assert plain.sum() == 4
    mask = permuted_nm_mask(SCORES_1x8, 2, 4, "greedy")
    # groups {7,4,3,0} keep cols 0, 3 (8, 5); {6,5,2,1} keep cols 1, 2 (7, 6): 26 kept instead of 8+7+4+3 = 22
    assert mask.tolist() == [[False] * 4 + [True] * 4]
    assert float(SCORES_1x8[~mask].sum()) == 26.0


def kept_score(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Σ over all rows and groups of the n largest scores of each (G, rows, m) group, by brute force."""
    return scores.topk(n, dim=-1).values.sum()


def test_exact_slot_assignment_is_optimal_per_slot():
    """Against every other assignment of one slot's columns (the closed-form gain in slot_assignment)."""
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 12, generator=g)
    perm = snake_permutation(scores, 4)
    for slot in range(4):
        best = slot_assignment(scores, perm, 2, 4, slot)
        value = kept_score(scores[:, best].reshape(3, -1, 4).transpose(0, 1), 2)
        for order in itertools.permutations(range(3)):  # every other assignment of this slot's 3 columns
            trial = perm.clone()
            trial[slot::4] = perm[slot::4][list(order)]
            assert value >= kept_score(scores[:, trial].reshape(3, -1, 4).transpose(0, 1), 2) - 1e-6
        perm = best


@pytest.mark.parametrize("how", ["greedy", "exact"])
def test_permuted_masks_are_nm_in_the_permuted_order(how):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 16, generator=g)
    method = get_method("ria", permute=how)
    scores = method.scores(w, state_with(torch.ones(16)))
    mask = method.prune(w, state_with(torch.ones(16)), 0.5, (2, 4))
    assert (w[mask] == 0).all()
    assert torch.equal(mask, permuted_nm_mask(scores, 2, 4, how))
    perm = snake_permutation(scores, 4)
    if how == "greedy":  # every group of 4 consecutive columns of the permuted order keeps 2
        assert (~mask[:, perm]).reshape(6, 4, 4).sum(-1).eq(2).all()


def test_exact_keeps_at_least_what_greedy_keeps():
    g = torch.Generator().manual_seed(2)
    scores = torch.rand(8, 32, generator=g)
    greedy, exact = permuted_nm_mask(scores, 2, 4, "greedy"), permuted_nm_mask(scores, 2, 4, "exact")
    assert exact.sum() == greedy.sum() == 8 * 16
    assert scores[~exact].sum() >= scores[~greedy].sum() - 1e-6


def test_exact_without_scipy_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)
    with pytest.raises(PrunepilotError, match="scipy"):
        permuted_nm_mask(SCORES_1x8, 2, 4, "exact")
