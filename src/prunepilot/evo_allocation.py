"""allocation: evo for the per-block pipeline: search.search_allocation over the model's linears (or blocks), with

    levels:   one statistics pass over the dense model with the base method's statistics (the recipe's method when
              it scores weights, e.g. magnitude or Wanda; Wanda for SparseGPT, whose final pass then prunes to the
              found sparsities); each linear keeps its score order, so any level is the top-k of that order
              (row-wise or whole-matrix as the method compares), built on demand from a dense copy of the weight
    fitness:  KL(dense ‖ pruned) of the next-token distributions, mean over the held-out fitness tokens:
              Σ_t Σ_v p_t(v) (log p_t(v) - log q_t(v)) / T; the dense log-probabilities are computed once
    data:     held-out windows never used for calibration (the tail of every calibration source, or with given
              token ids their last rows); never an evaluation split
"""
from __future__ import annotations

import logging
import math

import torch

from .engine import ModelAdapter, blocks, weight_2d
from .errors import PrunepilotError
from .methods.base import PruningMethod
from .methods.wanda import Wanda
from .search import EvoOptions, SearchResult, Unit, search_allocation

log = logging.getLogger(__name__)


def scoring_method(method: PruningMethod) -> PruningMethod:
    """The method whose score order builds the levels: the recipe's own when it scores weights, else Wanda."""
    if type(method).scores is not PruningMethod.scores:
        return method
    log.info("allocation evo: %s has no per-weight scores; levels are built from Wanda's", type(method).__name__)
    return Wanda()


class LevelMasks:
    """Every linear's dense weight and score order; set(name, s) rewrites the live weight at sparsity s."""

    def __init__(self, adapter: ModelAdapter, method: PruningMethod, ids, device, batch_size: int):
        self.granularity = getattr(method, "granularity", "row")
        self.linears, self.dense, self.order, self.current = {}, {}, {}, {}
        states = (lambda n, lin: method.init_state(weight_2d(lin))) if method.needs_calibration else None
        for blk in blocks(adapter, ids, device, states=states, outputs="dense", batch_size=batch_size,
                          desc="evo levels"):
            for name, lin in blk.linears.items():
                w = weight_2d(lin)
                scores = method.scores(w, blk.states.get(name))                                # (out, in)
                order = scores.argsort(dim=1) if self.granularity == "row" else scores.flatten().argsort()
                small = int(order.max()) < 2 ** 15
                self.order[name] = order.to(torch.int16 if small else torch.int32).cpu()
                self.linears[name], self.dense[name], self.current[name] = lin, w.detach().cpu().clone(), 0.0

    @torch.no_grad()
    def set(self, name: str, sparsity: float) -> None:
        if self.current[name] == sparsity:
            return
        w, order = weight_2d(self.linears[name]), self.order[name]  # looked up now: the block may have moved
        if self.dense[name].device != w.device:
            self.dense[name] = self.dense[name].to(w.device)
        w.copy_(self.dense[name])
        if self.granularity == "row":
            k = int(w.shape[1] * sparsity)                  # as masks.rowwise_mask: k lowest of every row
            if k:
                w.scatter_(1, order[:, :k].to(w.device, torch.long), 0.0)
        else:
            k = int(w.numel() * sparsity)                   # as masks.layer_mask
            if k:
                w.view(-1).scatter_(0, order[:k].to(w.device, torch.long), 0.0)
        self.current[name] = sparsity

    def restore(self) -> None:
        for name in self.linears:
            self.set(name, 0.0)


class KLFitness:
    """fitness(sparsities, stage): mean KL(dense ‖ pruned) over the first stage_windows[stage] held-out windows."""

    def __init__(self, model, masks: LevelMasks, windows: torch.Tensor, stage_windows: list[int],
                 members: dict[str, list[str]]):
        self.model, self.masks, self.windows, self.stage_windows = model, masks, windows, stage_windows
        self.members = members                          # unit -> its linears
        self.device = next(model.parameters()).device
        self.dense = [self._log_probs(w).cpu() for w in windows]   # once: (seq, vocab) per window
        self.evaluations = 0

    @torch.no_grad()
    def _log_probs(self, window: torch.Tensor) -> torch.Tensor:
        logits = self.model(window[None].to(self.device), use_cache=False).logits[0]      # (seq, vocab)
        return torch.log_softmax(logits.float(), dim=-1)

    @torch.no_grad()
    def __call__(self, sparsities: dict[str, float], stage: int) -> float:
        for unit, s in sparsities.items():
            for name in self.members[unit]:
                self.masks.set(name, s)
        total, tokens = 0.0, 0
        for k in range(self.stage_windows[stage]):
            dense = self.dense[k].to(self.device)
            kl = (dense.exp() * (dense - self._log_probs(self.windows[k]))).sum(-1)        # (seq,)
            total, tokens = total + float(kl.sum()), tokens + kl.numel()
        self.evaluations += 1
        return total / tokens


def search_units(adapter: ModelAdapter, masks: LevelMasks, granularity: str) -> tuple[list[Unit], dict]:
    """Units (a linear each, or a block each) and {unit: its linears}."""
    if granularity == "linear":
        return [Unit(n, w.numel()) for n, w in masks.dense.items()], {n: [n] for n in masks.dense}
    units, members = [], {}
    for i in range(len(adapter)):
        names = [n for n in adapter.linears(i) if n in masks.dense]
        units.append(Unit(f"block.{i}", sum(masks.dense[n].numel() for n in names)))
        members[units[-1].name] = names
    return units, members


def fitness_windows(opts: EvoOptions) -> list[int]:
    return [max(1, math.ceil(t / opts.seqlen)) for t in opts.tokens]


def evo_targets(model, adapter: ModelAdapter, method, ids, held: torch.Tensor, target: float, opts: EvoOptions,
                seed: int, device, batch_size: int = 1) -> tuple[dict[str, float], SearchResult]:
    """{linear name: sparsity} found by the search (parameter-weighted mean = target), and the search result.
    held: (windows, seqlen) held-out fitness tokens. The model's weights are dense again on return."""
    from .engine.offload import is_offloaded

    if is_offloaded(model):
        raise PrunepilotError("allocation evo runs the whole model for its fitness: it does not work with "
                              "--offload disk")
    masks = LevelMasks(adapter, scoring_method(method), ids, device, batch_size)
    units, members = search_units(adapter, masks, opts.granularity)
    stage_windows = [min(w, held.shape[0]) for w in fitness_windows(opts)]
    fitness = KLFitness(model, masks, held, stage_windows, members)
    try:
        result = search_allocation(units, target, fitness, opts, seed)
    finally:
        masks.restore()
    log.info("allocation evo: KL %.5f (uniform %.5f) after %d generations, %d fitness evaluations", result.fitness,
             result.uniform_fitness, len(result.history), fitness.evaluations)
    return {n: result.sparsities[u] for u, names in members.items() for n in names}, result
