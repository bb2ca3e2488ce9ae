"""The per-block pipeline of the unstructured and N:M methods (magnitude, Wanda, SparseGPT).

    targets = per-block sparsity (uniform, explicit, or OWL from one statistics-only pass with Wanda's statistics),
              or per-linear sparsity from the evolutionary search (evo_allocation.py, search.py)
    for each block, one at a time:    (engine.blocks: the pruned outputs of a block feed the next)
        state per linear <- inputs of that linear over the calibration batches
        method.prune(W, state, targets[block], pattern)
Data-free methods (magnitude) prune every block where it lies, without a pass.
"""
from __future__ import annotations

import logging
import math
import time

import torch

from . import allocation
from .engine import ModelAdapter, blocks, weight_2d
from .engine.moe import ExpertMatrix
from .engine.offload import block_placed
from .errors import PrunepilotError
from .job import PruneJob, PruneReport
from .masks import parse_pattern
from .methods.magnitude import Magnitude, MagnitudeOptions
from .methods.wanda import Wanda

log = logging.getLogger(__name__)


def layer_stats(adapter: ModelAdapter) -> dict[str, dict]:
    """Zero count and shape of every prunable linear (an offloaded block is read from disk to count)."""
    out = {}
    for i in range(len(adapter)):
        with block_placed(adapter, i, None):
            for name, lin in adapter.linears(i).items():
                w = weight_2d(lin)
                zeros = int((w == 0).sum())
                out[name] = {"shape": list(w.shape), "numel": w.numel(), "zeros": zeros, "sparsity": zeros / w.numel()}
    return out


def owl_outlier_ratios(adapter: ModelAdapter, ids, device, m: float, batch_size: int = 1) -> list[float]:
    """One statistics-only pass over the dense model: per block, the share of Wanda scores above m x mean (OWL)."""
    wanda, ratios = Wanda(), []
    for blk in blocks(adapter, ids, device, states=lambda name, lin: wanda.init_state(weight_2d(lin)),
                      outputs="dense", batch_size=batch_size, desc="OWL outliers"):
        ratios.append(allocation.outlier_ratio(
            [wanda.scores(weight_2d(lin), blk.states[n]) for n, lin in blk.linears.items()], m))
    return ratios


def owl_block_sparsities(adapter: ModelAdapter, ids, device, sparsity: float, a, batch_size: int = 1) -> list[float]:
    """OWL's sparsity per block at mean `sparsity`, with the allocation settings `a` (owl_m, owl_lambda)."""
    ratios = owl_outlier_ratios(adapter, ids, device, a.owl_m, batch_size)
    return allocation.owl(ratios, sparsity, a.owl_lambda)


def block_targets(job: PruneJob, adapter: ModelAdapter, ids) -> list[float]:
    """Sparsity of every block: the N:M ratio, or the recipe's allocation (uniform, explicit, OWL)."""
    recipe, n = job.recipe, len(adapter)
    a = recipe.allocation
    pattern = parse_pattern(recipe.pattern)
    if pattern is not None:
        nm_sparsity = (pattern[1] - pattern[0]) / pattern[1]
        if a.kind != "uniform":
            log.warning("N:M pattern %s fixes every layer's sparsity at %.2f; allocation %s ignored",
                        recipe.pattern, nm_sparsity, a.kind)
        return [nm_sparsity] * n
    if a.kind == "uniform":
        return allocation.uniform(n, recipe.sparsity)
    if a.kind == "explicit":
        return allocation.explicit(a.layers, n, recipe.sparsity)
    return owl_block_sparsities(adapter, ids, job.device, recipe.sparsity, a, recipe.calibration.batch_size)


def shared_state_groups(states: dict) -> list[list[str]]:
    """Names grouped by state object, in order: linears that read the same input share one (engine.blocks)."""
    groups: dict[int, list[str]] = {}
    for name, state in states.items():
        groups.setdefault(id(state), []).append(name)
    return list(groups.values())


def prune_shared(job: PruneJob, names: list[str], lins: list, state, goals: list[float], pattern) -> None:
    """Prune linears that share one input state, each to its goal (method.prune_group when the goals agree),
    then refine each mask when the recipe asks for it (against the dense weights copied here)."""
    method, refiner = job.method, job.refiner
    weights = [weight_2d(lin) for lin in lins]
    dense = [w.detach().clone() if refiner and refiner.applies_to(n) else None for n, w in zip(names, weights)]
    inner = state.inner if refiner else state
    if len(set(goals)) == 1:  # one call for the shared input (SparseGPT: one sweep)
        found = method.prune_group(weights, inner, goals[0], pattern)
    else:
        found = [method.prune(w, inner, goal, pattern) for w, goal in zip(weights, goals)]
    for w, d, mask in zip(weights, dense, found):
        if d is not None:
            refiner.refine(w, d, mask, state.moments, pattern)


def prune_blocks(job: PruneJob, adapter: ModelAdapter, ids, targets: list[float],
                 linear_targets: dict[str, float] | None = None) -> dict[str, int]:
    """Prune every block to its target (or each linear to linear_targets[name]): one sequential pass when the
    method (or the refiner) needs data, else in place. Returns {expert matrix: routed tokens} for the MoE experts
    pruned by the weights-only fallback."""
    method, pattern, refiner = job.method, parse_pattern(job.recipe.pattern), job.refiner
    target = (lambda name, i: linear_targets[name]) if linear_targets else (lambda name, i: targets[i])
    if not method.needs_calibration and refiner is None:
        for i in range(len(adapter)):
            with block_placed(adapter, i, None):  # where it lies; an offloaded block is read from disk
                for name, lin in adapter.linears(i).items():
                    method.prune(weight_2d(lin), method.init_state(weight_2d(lin)), target(name, i), pattern)
        return {}

    def make_state(name, lin):
        state = method.init_state(weight_2d(lin))
        return refiner.wraps(state, weight_2d(lin)) if refiner else state

    fallback, starved = Magnitude(MagnitudeOptions(granularity="row")), {}
    for blk in blocks(adapter, ids, job.device, states=make_state, batch_size=job.recipe.calibration.batch_size,
                      desc=job.name):
        for names in shared_state_groups(blk.states):
            lins = [blk.linears[n] for n in names]
            state, goals = blk.states[names[0]], [target(n, blk.index) for n in names]
            if isinstance(lins[0], ExpertMatrix) and state.n < job.recipe.calibration.min_expert_tokens:
                starved.update({n: state.n for n in names})  # too few routed tokens: |W| alone, row by row
                for lin, goal in zip(lins, goals):
                    fallback.prune(weight_2d(lin), None, goal, pattern)
            else:
                prune_shared(job, names, lins, state, goals, pattern)
    if starved:
        log.warning("%d MoE expert matrices saw fewer than %d routed calibration tokens and were pruned by weight "
                    "magnitude (row-wise) instead of %s; see report.json coverage.experts_magnitude_fallback",
                    len(starved), job.recipe.calibration.min_expert_tokens, job.name)
    return starved


def evo_data(job: PruneJob) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(calibration ids, held-out fitness windows (w, seqlen), summary) for allocation evo: the fitness tokens are
    the tail of every calibration source, or with given token ids the last rows, never a calibration window."""
    opts = job.recipe.allocation.evo
    if job.token_ids is None:
        windows = max(1, math.ceil(max(opts.tokens) / opts.seqlen))
        cal = job.calibration_data(windows, opts.seqlen)
        return cal.ids, cal.held_out.view(-1, opts.seqlen), cal.summary
    ids, _, _ = job.calibration()
    rows = max(1, math.ceil(max(opts.tokens) / ids.shape[1]))
    if rows >= ids.shape[0]:
        raise PrunepilotError(f"allocation evo holds out the last {rows} of the given calibration rows for its "
                              f"fitness ({max(opts.tokens)} tokens): give more than {rows} rows")
    return ids[:-rows], ids[-rows:], {}


def evo_search(job: PruneJob, adapter: ModelAdapter, ids, held) -> tuple[list[float], dict[str, float], dict]:
    """Per-block mean targets (for the report), per-linear targets, and the report's evo section."""
    from .evo_allocation import evo_targets

    recipe = job.recipe
    if parse_pattern(recipe.pattern) is not None:
        raise PrunepilotError(f"allocation evo searches unstructured sparsities; the N:M pattern {recipe.pattern} "
                              "fixes every layer's")
    linear, result = evo_targets(job.model, adapter, job.method, ids, held, recipe.sparsity, recipe.allocation.evo,
                                 recipe.calibration.seed, job.device, recipe.calibration.batch_size)
    per_block = []
    for i in range(len(adapter)):
        numel = {n: weight_2d(lin).numel() for n, lin in adapter.linears(i).items() if n in linear}
        per_block.append(sum(linear[n] * k for n, k in numel.items()) / max(sum(numel.values()), 1))
    extra = {"fitness_kl": result.fitness, "uniform_kl": result.uniform_fitness, "generations": len(result.history),
             "held_out_tokens": int(held.numel()), "log": recipe.allocation.evo.log, "linear_targets": linear}
    return per_block, linear, extra


def run(job: PruneJob) -> PruneReport:
    recipe = job.recipe
    adapter = ModelAdapter(job.model, recipe.include, recipe.ignore)
    coverage = adapter.coverage()  # a block weight no method handles stops here, unless the user excluded it
    if not coverage.eligible_params:
        raise PrunepilotError("no linear layer matches the include/ignore patterns")
    timings: dict[str, float] = {}
    t0 = time.time()
    ids, held, summary, evo = None, None, {}, recipe.allocation.kind == "evo"
    if evo:
        ids, held, summary = evo_data(job)
    elif job.method.needs_calibration or job.refiner or recipe.allocation.kind == "owl" or job.token_ids is not None:
        ids, summary, _ = job.calibration()
    if ids is not None:
        summary.update(n_samples=int(ids.shape[0]), seqlen=int(ids.shape[1]))
    timings["calibration_data_s"] = time.time() - t0
    t0 = time.time()
    targets, linear_targets, extra = evo_search(job, adapter, ids, held) if evo else \
        (block_targets(job, adapter, ids), None, None)
    timings["allocation_s"] = time.time() - t0
    t0 = time.time()
    starved = prune_blocks(job, adapter, ids, targets, linear_targets)
    timings["prune_s"] = time.time() - t0
    report = PruneReport(job.name, recipe.pattern, recipe.sparsity, targets, layer_stats(adapter), summary, timings,
                         extra={"evo": extra} if evo else {},
                         coverage=coverage.to_dict() | {"experts_magnitude_fallback": starved})
    log.info("pruned %s: global sparsity %.4f in %.1fs", job.name, report.global_sparsity, timings["prune_s"])
    return report
