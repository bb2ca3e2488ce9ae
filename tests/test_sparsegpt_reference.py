"""prunepilot's SparseGPT equals a plain transcription of the reference algorithm (IST-DASLab/sparsegpt,
SparseGPT.fasterprune) on a small matrix: the same mask exactly and the same weights within 1e-5.

The transcription below follows the reference step by step, in float64 and one column at a time:
    H ← H + λ·mean(diag H)·I,  U = upper Cholesky factor of H⁻¹  (H⁻¹ = UᵀU)
    per block of `blocksize` columns [i1, i2):
        unstructured: the block's mask is chosen at the block start from the *updated* weights W[:, i1:i2],
                      saliency W² / diag(U)²
        N:M:          when the sweep reaches a group's first column (block-local index i % M == 0), the group's
                      mask is chosen from the updated weights W[:, i:i+M], saliency W² / diag(U)[i:i+M]²
        per column i: e = (w - q) / U_ii,  W[:, i:i2] -= e ⊗ U[i, i:i2]   (inside the block)
        after the block: W[:, i2:] -= E · U[i1:i2, i2:]                  (the block's errors, lazily)
One deliberate difference: the reference prunes every entry <= the value at sorted index int(numel·s), i.e.
int(numel·s) + 1 entries per block; prunepilot prunes exactly int(numel·s) so the sparsity is exact, and the
transcription does the same (the k lowest saliencies, ties by index order).
"""
import pytest
import torch

from prunepilot.registry import get_method


def reference_sparsegpt(W, H, sparsity, pattern, blocksize, percdamp, select_on_dense=False):
    """(pruned and updated W, mask). select_on_dense: the wrong rule (saliencies of the dense weights), to show
    the test tells the two apart."""
    dense = W.clone().double()
    W, H = W.clone().double(), H.clone().double()
    cols = W.shape[1]
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    mask = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        S1 = dense[:, i1:i2] if select_on_dense else W1  # what the saliencies read (W1: updated, in place)
        d = torch.diag(U1)
        E1 = torch.zeros_like(W1)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if pattern is None:
            sal = (S1 ** 2 / d.unsqueeze(0) ** 2).flatten()
            k = int(sal.numel() * sparsity)
            order = sorted(range(sal.numel()), key=lambda t: (float(sal[t]), t))
            mask1.view(-1)[order[:k]] = True
        for i in range(i2 - i1):
            if pattern is not None and i % pattern[1] == 0:
                n, m = pattern
                sal = S1[:, i:i + m] ** 2 / d[i:i + m].unsqueeze(0) ** 2
                for r in range(W1.shape[0]):
                    lowest = sorted(range(sal.shape[1]), key=lambda t: float(sal[r, t]))[: m - n]
                    mask1[r, [i + t for t in lowest]] = True
            w = W1[:, i]
            q = torch.where(mask1[:, i], torch.zeros_like(w), w)
            e = (w - q) / U1[i, i]
            W1[:, i:] -= e.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            W1[:, i] = q
            E1[:, i] = e
        W[:, i1:i2] = W1
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
        mask[:, i1:i2] = mask1
    return W, mask


def random_problem(seed, rows=8, cols=32):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(200, cols, generator=g) @ torch.randn(cols, cols, generator=g) * 0.3  # correlated inputs
    X = X + torch.randn(200, cols, generator=g)                                            # ... and full rank
    return W, X


@pytest.mark.parametrize("pattern", [None, (2, 4), (4, 8)])
@pytest.mark.parametrize("blocksize", [8, 16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparsegpt_equals_the_reference_transcription(pattern, blocksize, seed):
    W, X = random_problem(seed)
    method = get_method("sparsegpt", blocksize=blocksize, percdamp=0.01)
    state = method.init_state(W)
    state.add(X)
    H = (2.0 / X.shape[0]) * X.double().t() @ X.double()   # the same H = (2/n) Σ x xᵀ, SPD
    want_W, want_mask = reference_sparsegpt(W, H, 0.5, pattern, blocksize, 0.01)
    got_W = W.clone()
    got_mask = method.prune(got_W, state, 0.5, pattern)
    assert torch.equal(got_mask, want_mask)
    assert torch.allclose(got_W.double(), want_W, atol=1e-5, rtol=0)
    if pattern is not None:  # every group of M keeps exactly N
        n, m = pattern
        assert (~got_mask).reshape(W.shape[0], -1, m).sum(-1).eq(n).all()


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_the_transcription_tells_updated_from_dense_selection(pattern):
    """Not vacuous: choosing the masks from the dense weights gives another mask on the same problem."""
    W, X = random_problem(0)
    H = (2.0 / X.shape[0]) * X.double().t() @ X.double()
    _, updated = reference_sparsegpt(W, H, 0.5, pattern, 8, 0.01)
    _, dense = reference_sparsegpt(W, H, 0.5, pattern, 8, 0.01, select_on_dense=True)
    assert not torch.equal(updated, dense)


def test_nm_groups_may_not_straddle_blocks():
    from prunepilot.errors import PrunepilotError

    W, X = random_problem(0, cols=24)
    method = get_method("sparsegpt", blocksize=6)
    state = method.init_state(W)
    state.add(X)
    with pytest.raises(PrunepilotError, match="blocksize"):
        method.prune(W, state, 0.5, (2, 4))
