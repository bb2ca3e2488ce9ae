"""The per-block pipeline of the unstructured and N:M methods (magnitude, Wanda, SparseGPT).

    targets = per-block sparsity (uniform, explicit, or OWL from one statistics-only pass with Wanda's statistics)
    for each block, one at a time:    (engine.blocks: the pruned outputs of a block feed the next)
        state per linear <- inputs of that linear over the calibration batches
        method.prune(W, state, targets[block], pattern)
Data-free methods (magnitude) prune every block where it lies, without a pass.
"""
from __future__ import annotations

import logging
import time

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
    ratios = owl_outlier_ratios(adapter, ids, job.device, a.owl_m, recipe.calibration.batch_size)
    return allocation.owl(ratios, recipe.sparsity, a.owl_lambda)


def shared_state_groups(states: dict) -> list[list[str]]:
    """Names grouped by state object, in order: linears that read the same input share one (engine.blocks)."""
    groups: dict[int, list[str]] = {}
    for name, state in states.items():
        groups.setdefault(id(state), []).append(name)
    return list(groups.values())


def prune_shared(job: PruneJob, names: list[str], lins: list, state, target: float, pattern) -> None:
    """Prune linears that share one input state (one sweep when the method has prune_group), then refine each
    mask when the recipe asks for it (the refiner compares with the dense weights copied here)."""
    method, refiner = job.method, job.refiner
    weights = [weight_2d(lin) for lin in lins]
    dense = [w.detach().clone() if refiner and refiner.applies_to(n) else None for n, w in zip(names, weights)]
    inner = state.inner if refiner else state
    if len(weights) > 1 and hasattr(method, "prune_group"):  # one sweep for linears sharing an input
        found = method.prune_group(weights, inner, target, pattern)
    else:
        found = [method.prune(w, inner, target, pattern) for w in weights]
    for w, d, mask in zip(weights, dense, found):
        if d is not None:
            refiner.refine(w, d, mask, state.moments, pattern)


def prune_blocks(job: PruneJob, adapter: ModelAdapter, ids, targets: list[float]) -> dict[str, int]:
    """Prune every block to its target: one sequential pass when the method (or the refiner) needs data, else in
    place. Returns {expert matrix: routed tokens} for the MoE experts pruned by the weights-only fallback."""
    method, pattern, refiner = job.method, parse_pattern(job.recipe.pattern), job.refiner
    if not method.needs_calibration and refiner is None:
        for i in range(len(adapter)):
            with block_placed(adapter, i, None):  # where it lies; an offloaded block is read from disk
                for lin in adapter.linears(i).values():
                    method.prune(weight_2d(lin), method.init_state(weight_2d(lin)), targets[i], pattern)
        return {}

    def make_state(name, lin):
        state = method.init_state(weight_2d(lin))
        return refiner.wraps(state, weight_2d(lin)) if refiner else state

    fallback, starved = Magnitude(MagnitudeOptions(granularity="row")), {}
    for blk in blocks(adapter, ids, job.device, states=make_state, batch_size=job.recipe.calibration.batch_size,
                      desc=job.name):
        for names in shared_state_groups(blk.states):
            lins = [blk.linears[n] for n in names]
            state = blk.states[names[0]]
            if isinstance(lins[0], ExpertMatrix) and state.n < job.recipe.calibration.min_expert_tokens:
                starved.update({n: state.n for n in names})  # too few routed tokens: |W| alone, row by row
                for lin in lins:
                    fallback.prune(weight_2d(lin), None, targets[blk.index], pattern)
            else:
                prune_shared(job, names, lins, state, targets[blk.index], pattern)
    if starved:
        log.warning("%d MoE expert matrices saw fewer than %d routed calibration tokens and were pruned by weight "
                    "magnitude (row-wise) instead of %s; see report.json coverage.experts_magnitude_fallback",
                    len(starved), job.recipe.calibration.min_expert_tokens, job.name)
    return starved


def run(job: PruneJob) -> PruneReport:
    recipe = job.recipe
    adapter = ModelAdapter(job.model, recipe.include, recipe.ignore)
    coverage = adapter.coverage()  # a block weight no method handles stops here, unless the user excluded it
    if not coverage.eligible_params:
        raise PrunepilotError("no linear layer matches the include/ignore patterns")
    timings: dict[str, float] = {}
    t0 = time.time()
    ids, summary = None, {}
    if job.method.needs_calibration or job.refiner or recipe.allocation.kind == "owl" or job.token_ids is not None:
        ids, summary, _ = job.calibration()
        summary.update(n_samples=int(ids.shape[0]), seqlen=int(ids.shape[1]))
    timings["calibration_data_s"] = time.time() - t0
    t0 = time.time()
    targets = block_targets(job, adapter, ids)
    timings["allocation_s"] = time.time() - t0
    t0 = time.time()
    starved = prune_blocks(job, adapter, ids, targets)
    timings["prune_s"] = time.time() - t0
    report = PruneReport(job.name, recipe.pattern, recipe.sparsity, targets, layer_stats(adapter), summary, timings,
                         coverage=coverage.to_dict() | {"experts_magnitude_fallback": starved})
    log.info("pruned %s: global sparsity %.4f in %.1fs", job.name, report.global_sparsity, timings["prune_s"])
    return report
