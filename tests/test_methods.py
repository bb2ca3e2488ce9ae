"""Unstructured / N:M methods: exact behaviour on hand-made layers, invariants across architectures."""
import pytest
import torch

from prunepilot.api import prune
from prunepilot.engine import ModelAdapter, weight_2d
from prunepilot.errors import PrunepilotError
from prunepilot.registry import available, get_method
from prunepilot.testing.tiny_models import CONFIGS, tiny_model


def test_registry_lists_builtin_methods_and_rejects_unknown():
    assert {"magnitude", "wanda", "sparsegpt"} <= set(available())
    with pytest.raises(PrunepilotError, match="unknown method 'nope'"):
        get_method("nope")
    with pytest.raises(PrunepilotError, match="invalid options of method wanda: colour"):
        get_method("wanda", colour="red")


def test_sparsegpt_with_white_inputs_equals_magnitude_and_keeps_weights():
    """With H ∝ I the OBS saliency is w² and the update is zero: SparseGPT = magnitude (per block)."""
    torch.manual_seed(0)
    W = torch.randn(6, 16)
    m = get_method("sparsegpt", blocksize=16, percdamp=0.0)
    st = m.init_state(W)
    m.add_batch(st, torch.eye(16))
    W2 = W.clone()
    mask = m.prune(W2, st, 0.5, None)
    expected = get_method("magnitude")
    W3 = W.clone()
    emask = expected.prune(W3, None, 0.5, None)
    assert torch.equal(mask, emask)
    torch.testing.assert_close(W2, W3)


def test_sparsegpt_reconstructs_better_than_wanda_on_correlated_inputs():
    torch.manual_seed(0)
    W = torch.randn(32, 64)
    X = torch.randn(512, 8) @ torch.randn(8, 64) + 0.1 * torch.randn(512, 64)  # low-rank, correlated
    errs = {}
    for name in ("wanda", "sparsegpt"):
        m = get_method(name)
        st = m.init_state(W)
        m.add_batch(st, X)
        Wp = W.clone()
        m.prune(Wp, st, 0.5, None)
        assert (Wp == 0).float().mean().item() == pytest.approx(0.5, abs=1e-6)
        errs[name] = ((X @ (W - Wp).t()) ** 2).sum().item()
    assert errs["sparsegpt"] < 0.5 * errs["wanda"]


def test_sparsegpt_sink_weight_counts_each_windows_first_token_w_times():
    """Σ x xᵀ with the first token of each (batch, seq, in) window counted w times; (tokens, in) inputs, whose
    positions are unknown, are added plainly and counted as unweighted."""
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [2.0, 0.0]]])  # 2 windows x 2 tokens x 2 inputs
    m = get_method("sparsegpt", sink_weight=4.0)
    st = m.init_state(torch.zeros(3, 2))
    m.add_batch(st, x)
    # first tokens (1,0), (1,1) weighted 4: 4*[[1,0],[0,0]] + 4*[[1,1],[1,1]]; others (0,1), (2,0) once
    assert torch.equal(st.xxt, torch.tensor([[8.0 + 4.0, 4.0], [4.0, 4.0 + 1.0]]))
    assert st.n == 4 and st.unweighted == 0
    m.add_batch(st, torch.tensor([[0.0, 3.0]]))
    assert torch.equal(st.xxt, torch.tensor([[12.0, 4.0], [4.0, 14.0]])) and st.unweighted == 1
    plain = get_method("sparsegpt").init_state(torch.zeros(3, 2))
    plain.add(x)
    assert torch.equal(plain.xxt, torch.tensor([[6.0, 1.0], [1.0, 2.0]]))


def test_sparsegpt_sink_weight_reconstructs_the_first_token_better():
    """Weighting the first token in H trades the other tokens' output error for its own."""
    torch.manual_seed(0)
    W = torch.randn(32, 64)
    X = torch.randn(8, 16, 8) @ torch.randn(8, 64) + 0.3 * torch.randn(8, 16, 64)
    X[:, 0] = 5 * torch.randn(64)  # a sink: the same unusual input at every window's start
    first, rest = {}, {}
    for w in (1.0, 64.0):
        m = get_method("sparsegpt", sink_weight=w)
        st = m.init_state(W)
        m.add_batch(st, X)
        Wp = W.clone()
        m.prune(Wp, st, 0.5, None)
        err = (X @ (W - Wp).t()).pow(2).sum(-1)  # (windows, seq)
        first[w], rest[w] = err[:, 0].mean().item(), err[:, 1:].mean().item()
    assert first[64.0] < 0.5 * first[1.0]
    assert rest[64.0] > rest[1.0]


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_nm_patterns_are_exact(method):
    torch.manual_seed(1)
    W = torch.randn(8, 32)
    m = get_method(method)
    st = m.init_state(W)
    m.add_batch(st, torch.randn(64, 32))
    for n, mm in ((2, 4), (4, 8)):
        Wp = W.clone()
        m.prune(Wp, st, 0.5, (n, mm))
        groups = (Wp != 0).reshape(8, 32 // mm, mm).sum(-1)
        assert (groups == n).all()


def test_streaming_statistics_match_one_shot():
    torch.manual_seed(0)
    xs = [torch.randn(2, 5, 7) for _ in range(3)]
    allx = torch.cat([x.reshape(-1, 7) for x in xs])
    w = get_method("wanda")
    st = w.init_state(torch.zeros(3, 7))
    for x in xs:
        w.add_batch(st, x)
    torch.testing.assert_close(st.sq_mean, (allx ** 2).mean(0))
    s = get_method("sparsegpt")
    st = s.init_state(torch.zeros(3, 7))
    for x in xs:
        s.add_batch(st, x)
    torch.testing.assert_close(st.H, 2 * allx.t() @ allx / allx.shape[0])


CASES = [(a, m, p) for a in sorted(CONFIGS) for m in ("magnitude", "wanda", "sparsegpt", "ria")
         for p in ("unstructured", "2:4")]


@pytest.mark.parametrize("arch,method,pattern", CASES)
def test_method_architecture_invariants(arch, method, pattern):
    model = tiny_model(arch)
    ids = torch.randint(3, 128, (4, 16))
    head = model.get_output_embeddings().weight.detach().clone()
    rep = prune(model, {"method": method, "sparsity": 0.5, "pattern": pattern, "device": "cpu"},
                calibration=ids)
    ad = ModelAdapter(model, ignore=["lm_head"])
    for name, lin in ad.all_linears().items():
        W = weight_2d(lin)
        if pattern == "2:4":
            assert ((W != 0).reshape(W.shape[0], -1, 4).sum(-1) <= 2).all(), name
        elif method == "magnitude":
            assert (W == 0).sum().item() >= int(W.numel() * 0.5), name
        else:  # row-wise (wanda) or 128-column-block-wise (sparsegpt) selection, exact counts
            assert (W == 0).sum().item() == pytest.approx(W.numel() * 0.5, abs=W.shape[0]), name
    assert rep.global_sparsity == pytest.approx(0.5, abs=0.01)
    assert rep.layers.keys() == ad.all_linears().keys()
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    assert torch.equal(model.get_output_embeddings().weight, head)  # lm_head is ignored by default


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_sparsegpt_group_sweep_equals_one_linear_at_a_time(pattern):
    """Rows are reconstructed independently: q/k/v (or gate/up) swept as one stack of rows give each matrix the
    masks and weights of its own sweep, each matrix keeping its own selection rule (its own k per block)."""
    torch.manual_seed(0)
    X = torch.randn(512, 8) @ torch.randn(8, 64) + 0.1 * torch.randn(512, 64)  # correlated inputs
    Ws = [torch.randn(32, 64), torch.randn(16, 64), 3 * torch.randn(16, 64)]   # different scales: own selection
    m = get_method("sparsegpt", blocksize=16)
    st = m.init_state(Ws[0])
    m.add_batch(st, X)
    alone = [w.clone() for w in Ws]
    masks_alone = [m.prune(w, st, 0.5, pattern) for w in alone]
    together = [w.clone() for w in Ws]
    masks_together = m.prune_group(together, st, 0.5, pattern)
    for a, b, wa, wb in zip(masks_alone, masks_together, alone, together):
        assert (a != b).float().mean().item() <= 0.001 and b.float().mean().item() == pytest.approx(0.5)
        torch.testing.assert_close(wa, wb, rtol=1e-4, atol=1e-5)


def test_lowest_k_picks_exactly_k_smallest_ties_in_index_order():
    from prunepilot.methods.sparsegpt import lowest_k

    v = torch.tensor([3.0, 1.0, 2.0, 1.0, 5.0, 1.0])
    assert lowest_k(v, 1).tolist() == [False, True, False, False, False, False]
    assert lowest_k(v, 2).tolist() == [False, True, False, True, False, False]
    assert lowest_k(v, 4).tolist() == [False, True, True, True, False, True]
    assert lowest_k(v, 6).all()


def test_inverse_cholesky_is_the_upper_factor_of_the_damped_inverse():
    from prunepilot.methods.sparsegpt import _inverse_cholesky

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g, dtype=torch.float64)
    H = x.t() @ x
    U = _inverse_cholesky(H, 0.01)
    damped = H + 0.01 * H.diag().mean() * torch.eye(16, dtype=torch.float64)
    assert torch.equal(U, U.triu()) and (U.diag() > 0).all()
    torch.testing.assert_close(U.t() @ U, torch.linalg.inv(damped))
    torch.testing.assert_close(U, torch.linalg.cholesky(torch.linalg.inv(damped), upper=True))


def test_lowest_k_is_the_same_through_a_sort():
    """The CUDA path (order statistic from a full sort) selects exactly what the CPU path (kthvalue) selects."""
    from prunepilot.stats import order_stats

    g = torch.Generator().manual_seed(0)
    v = torch.randint(0, 50, (1000,), generator=g).float()  # many ties
    for k in (1, 333, 500, 1000):
        assert order_stats(v, [k], by_sort=True)[0] == order_stats(v, [k], by_sort=False)[0] == v.sort().values[k - 1]


def test_a_second_method_under_one_name_is_refused():
    from prunepilot.registry import get_spec, register

    with pytest.raises(PrunepilotError, match="'wanda' is already registered"):
        register(get_spec("wanda"))
