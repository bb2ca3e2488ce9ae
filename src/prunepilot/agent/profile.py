"""Per-layer sensitivity profile (one row per prunable linear) and the pruning pass that refreshes it.

Two signals, each z-scored across layers, z = (x - mean) / (std + 1e-9) with the population std:

- s: the 10th percentile of the Wanda scores |W_ij| * ||X_j||_2 over the layer's *still non-zero*
  weights: what the cheapest remaining weights are worth. Activation norms come from a sequential pass
  over the current (partly pruned) model, one block on the device at a time.
- g: mean |dL/dW| over the still non-zero weights, averaged over calibration samples (one sample per
  backward, so it is the mean of per-sample absolute gradients). Two ways to compute it:
    * "full": whole-model backward per sample with the model on the device (fine for small models);
    * "blockwise": memory-bounded manual checkpointing: a forward pass keeps only block-boundary
      activations (on CPU), then blocks are back-propagated one at a time, last to first, each
      recomputing its forward. Only one block is ever on the device.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import distributed
from ..engine import (ModelAdapter, block_output, blocks, blocks_bypassed, grad_2d, kept_placement, leaf_parameter,
                      move_outside_blocks, weight_2d)
from ..methods.wanda import Wanda
from ..stats import order_stats, zscore_list

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- math

def percentile(x: torch.Tensor, q: float, by_sort: bool | None = None) -> float:
    """q-quantile with linear interpolation between order statistics (numpy's default); works on tensors too
    large for torch.quantile. Empty input -> 0.

    by_sort: see stats.order_stats (default: a full sort on CUDA, where two kthvalue selections per linear made
    each profile pass of an 8B model take minutes). Both give the same value."""
    x = x.flatten().float()
    n = x.numel()
    if n == 0:
        return 0.0
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    need_hi = pos != lo and lo + 1 < n
    values = [v.item() for v in order_stats(x, [lo + 1, lo + 2] if need_hi else [lo + 1], by_sort)]
    v_lo, v_hi = values[0], values[-1]
    return v_lo + (pos - lo) * (v_hi - v_lo)


def extra_rowwise_mask(scores: torch.Tensor, alive: torch.Tensor, fraction: float) -> torch.Tensor:
    """Newly pruned weights: in every row, the lowest-scoring `fraction` of that row's alive weights.

    scores, alive: (out, in). Row counts are floor(fraction * alive_r) plus one for the rows with the
    largest remainders, so the layer loses exactly round(fraction * alive) weights. Ties: lowest index.
    """
    rem = alive.sum(1)                                        # (out,)
    raw = rem.double() * fraction                             # (out,)
    k = raw.floor().long()
    extra = int(round(float(raw.sum()))) - int(k.sum())
    if extra > 0:
        order = torch.argsort(raw - k.double(), descending=True, stable=True)
        k[order[:extra]] += 1
    k = torch.minimum(k, rem)
    s = scores.float().masked_fill(~alive, float("inf"))      # dead weights sort last, never re-chosen
    order = torch.argsort(s, dim=1, stable=True)              # (out, in) ascending
    chosen = torch.arange(s.shape[1], device=s.device).unsqueeze(0) < k.unsqueeze(1)  # (out, in) in sorted order
    return torch.zeros_like(alive).scatter_(1, order, chosen)


# ------------------------------------------------------------------------------------------ profile

@dataclass
class Profile:
    """Sensitivity table: per prunable linear, its size, zeros, s and g (raw) and their z-scores."""
    names: list[str]
    numel: dict[str, int]
    zeros: dict[str, int]
    s: dict[str, float]
    g: dict[str, float] = field(default_factory=dict)

    def z_s(self) -> dict[str, float]:
        return dict(zip(self.names, zscore_list([self.s[n] for n in self.names])))

    def z_g(self) -> dict[str, float]:
        if not self.g:
            return {n: 0.0 for n in self.names}
        return dict(zip(self.names, zscore_list([self.g.get(n, 0.0) for n in self.names])))

    def sparsity(self, name: str) -> float:
        return self.zeros[name] / self.numel[name]

    @property
    def global_sparsity(self) -> float:
        return sum(self.zeros.values()) / max(1, sum(self.numel.values()))

    def rows(self) -> list[dict]:
        """One dict per layer, sorted by z_s ascending (least sensitive by Wanda score first)."""
        zs, zg = self.z_s(), self.z_g()
        rows = [{"layer": n, "numel": self.numel[n], "alive": self.numel[n] - self.zeros[n],
                 "sparsity": self.sparsity(n), "s": self.s[n], "g": self.g.get(n, 0.0),
                 "z_s": zs[n], "z_g": zg[n]} for n in self.names]
        return sorted(rows, key=lambda r: (r["z_s"], r["layer"]))


def zero_counts(adapter: ModelAdapter) -> tuple[dict[str, int], dict[str, int]]:
    numel, zeros = {}, {}
    for name, lin in adapter.all_linears().items():
        w = weight_2d(lin)
        numel[name], zeros[name] = w.numel(), int((w == 0).sum())
    return numel, zeros


@torch.no_grad()
def prune_and_profile(adapter: ModelAdapter, ids, device, extras: dict[str, float], q: float = 0.10,
                      desc: str = "agent pass", batch_size: int = 1) -> dict[str, float]:
    """One sequential pass over the current model: in each block, measure input norms of every linear (Wanda's
    statistics), prune `extras[name]` of the remaining weights of the chosen linears (Wanda scores, row-wise),
    and record s = q-percentile of the Wanda scores of the weights left. The pruned block's outputs feed the
    next block. ids: (n, seq) calibration token ids. Returns {name: s}."""
    wanda, s = Wanda(), {}
    for blk in blocks(adapter, ids, device, states=lambda name, lin: wanda.init_state(weight_2d(lin)),
                      batch_size=batch_size, desc=desc):
        for name, lin in blk.linears.items():
            W = weight_2d(lin)                                  # (out, in) view
            scores = wanda.scores(W, blk.states[name])          # (out, in)
            alive = W != 0
            if extras.get(name, 0.0) > 0:
                mask = extra_rowwise_mask(scores, alive, extras[name])
                W[mask] = 0
                alive &= ~mask
            s[name] = percentile(scores[alive], q)
    return s


# ---------------------------------------------------------------------------------------- gradients

def _nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL. logits (b, seq, vocab), ids (b, seq)."""
    logits = logits.float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _alive_abs_mean(lin) -> float:
    """Mean |grad| over the non-zero entries of a prunable matrix's weight (gradient in the same layout)."""
    alive = weight_2d(lin).detach() != 0
    g = grad_2d(lin).detach().float().abs()
    return g[alive].mean().item() if alive.any() else 0.0


def _clear_grads(linears) -> None:
    for lin in linears:
        leaf_parameter(lin).grad = None


class _GradOnly:
    """Context: only the given weights require grad (restores every flag on exit)."""

    def __init__(self, model, weights):
        self.params = list(model.parameters())
        self.weights = weights

    def __enter__(self):
        self.flags = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(False)
            p.grad = None
        for w in self.weights:
            w.requires_grad_(True)
        return self

    def __exit__(self, *exc):
        for p, f in zip(self.params, self.flags):
            p.grad = None
            p.requires_grad_(f)


def gradient_importance(model, adapter: ModelAdapter, ids: torch.Tensor, device, mode: str = "full") -> dict[str, float]:
    """g per prunable linear: mean over samples of mean |dL/dW| over the non-zero weights. ids: (n, seq).
    Every tensor ends where it was (the full mode moves the whole model to the device while it runs)."""
    if ids.shape[0] == 0:
        return {}
    if mode not in ("full", "blockwise"):
        raise ValueError(f"unknown gradient mode {mode!r}")
    was_training = model.training
    model.eval()
    mine = distributed.shard(ids)  # torchrun: this rank's samples; the sums are all-reduced
    try:
        with kept_placement(model):
            sums = (_gradient_full if mode == "full" else _gradient_blockwise)(model, adapter, mine, device)
    finally:
        model.train(was_training)
    names = list(sums)
    total = distributed.all_reduce_(torch.tensor([sums[n] for n in names], dtype=torch.float64))
    return {n: v / ids.shape[0] for n, v in zip(names, total.tolist())}


def _gradient_full(model, adapter, ids, device) -> dict[str, float]:
    linears = adapter.all_linears()
    acc = {n: 0.0 for n in linears}
    model.to(device)
    with _GradOnly(model, [leaf_parameter(lin) for lin in linears.values()]), torch.enable_grad():
        for b in tqdm(range(ids.shape[0]), desc="gradients", leave=False):
            x = ids[b:b + 1].to(device)                          # (1, seq)
            _nll(model(x, use_cache=False).logits, x).backward()
            for n, lin in linears.items():
                acc[n] += _alive_abs_mean(lin)
            _clear_grads(linears.values())
    return acc  # summed over the samples


def _gradient_blockwise(model, adapter, ids, device) -> dict[str, float]:
    """Manual checkpointing, one block on the device at a time; block-boundary activations of all
    samples are kept on CPU: (n_blocks + 1) x n x seq x hidden floats."""
    n, modules = ids.shape[0], adapter.blocks
    fwd = blocks(adapter, ids, device, storage_device="cpu", desc="gradients fwd", shard=False)
    acts = [blk.inputs.hidden for blk in fwd]                    # acts[i][b]: input of block i, (1, seq, hidden)
    acts.append(fwd.hidden)                                      # the last block's outputs
    inputs = fwd.inputs

    acc = {name: 0.0 for name in adapter.all_linears()}
    with _GradOnly(model, [leaf_parameter(lin) for lin in adapter.all_linears().values()]), torch.enable_grad():
        # dL/d(last hidden): the final norm and head (whatever the architecture) on the injected last state
        move_outside_blocks(model, adapter, device)
        grads = []
        with blocks_bypassed(adapter, inputs.block_returns_tuple) as injected:
            for b in range(n):
                injected["h"] = acts[-1][b].to(device).requires_grad_(True)
                x = ids[b:b + 1].to(device)
                _nll(model(x, use_cache=False).logits, x).backward()
                grads.append(injected["h"].grad.to("cpu"))
        # then each block, last to first, recomputing its forward with grad
        for i in tqdm(reversed(range(len(modules))), total=len(modules), desc="gradients bwd", leave=False):
            home = next(modules[i].parameters()).device
            block = modules[i].to(device)
            linears = adapter.linears(i)
            for b in range(n):
                x = acts[i][b].to(device).requires_grad_(True)
                out = block_output(block(x, *inputs.args[b][i], **inputs.kwargs[b][i]))
                out.backward(grads[b].to(device))
                grads[b] = x.grad.to("cpu")
                for name, lin in linears.items():
                    acc[name] += _alive_abs_mean(lin)
                _clear_grads(linears.values())
            block.to(home)
    return acc  # summed over the samples
