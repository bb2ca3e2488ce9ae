"""Exact, hand-computed masks (True = pruned)."""
import pytest
import torch

from prunepilot import masks
from prunepilot.errors import PrunepilotError
from prunepilot.methods.wanda import wanda_scores


def T(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_rowwise_mask_prunes_lowest_per_row():
    s = T([[4, 1, 3, 2], [0.5, 9, 8, 0.1]])
    assert masks.rowwise_mask(s, 0.5).tolist() == [[False, True, False, True], [True, False, False, True]]
    assert not masks.rowwise_mask(s, 0.0).any()
    assert masks.rowwise_mask(s, 0.25).tolist() == [[False, True, False, False], [False, False, False, True]]


def test_layer_mask_compares_whole_matrix():
    s = T([[4, 1, 3, 2], [0.5, 9, 8, 0.1]])
    # 8 weights, 50% -> the 4 lowest of the matrix: 0.1, 0.5, 1, 2
    assert masks.layer_mask(s, 0.5).tolist() == [[False, True, False, True], [True, False, False, True]]
    s2 = T([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert masks.layer_mask(s2, 0.5).tolist() == [[True] * 4, [False] * 4]


def test_nm_mask_keeps_n_of_every_m():
    s = T([[1, 5, 2, 7, 9, 0, 3, 4]])
    assert masks.nm_mask(s, 2, 4).tolist() == [[True, False, True, False, False, True, True, False]]
    s8 = T([[8, 1, 7, 2, 6, 3, 5, 4]])
    assert masks.nm_mask(s8, 4, 8).tolist() == [[False, True, False, True, False, True, False, True]]
    with pytest.raises(PrunepilotError, match="divisible"):
        masks.nm_mask(T([[1, 2, 3, 4, 5, 6]]), 2, 4)


def test_wanda_score_is_abs_weight_times_input_norm():
    W = T([[1, -2], [-3, 0.5]])
    sq_mean = T([4, 0.25])  # mean x^2 -> sqrt: [2, 0.5]
    assert wanda_scores(W, sq_mean).tolist() == [[2, 1], [6, 0.25]]
    # activation-aware: the large-input column survives even with the smaller weight
    assert masks.rowwise_mask(wanda_scores(W, sq_mean), 0.5).tolist() == [[False, True], [False, True]]


def test_pattern_parsing_and_bad_values():
    assert masks.parse_pattern("unstructured") is None
    assert masks.parse_pattern("2:4") == (2, 4)
    for bad in ("2-4", "4:2", "0:4", "a:b"):
        with pytest.raises(PrunepilotError):
            masks.parse_pattern(bad)
    for bad in (-0.1, 1.0, 2):
        with pytest.raises(PrunepilotError, match="sparsity"):
            masks.check_sparsity(bad)


def test_lowest_k():
    assert masks.lowest_k(T([3, 1, 2, 0]), 2).tolist() == [False, True, False, True]
    assert not masks.lowest_k(T([3, 1]), 0).any()
