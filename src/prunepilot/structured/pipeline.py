"""The structured pipeline: calibration data, optional expert removal, the steps, the report.

    ids    = calibration tokens (FLAP-style seqlen 128 unless the recipe sets one)
    remove_experts (MoE, options.remove_experts > 0): whole experts first (expert_removal.py)
    for step in 1..k:                        # k = method.options.steps (1 for wanda_sp, flap)
        target = dense * method.kept_fraction(step)  # geometric schedule by default
        one pass over the current model, block by block, recording the input statistics of
        down_proj / o_proj (observation.py: float32 streaming moments; options.domain_stats "fused": one set per
        calibration domain, fused as mean Σ w_k μ_k, variance Σ w_k σ²_k, moments.DomainMoments), then scoring
        (candidates.py), choosing (selection.py: uniform or global) and slicing (removal.py): steps.py
    report params before/after, per-layer widths and kept KV groups (outcome.py)
"""
from __future__ import annotations

import logging
import time

from ..data import Calibration
from ..engine import ModelAdapter
from ..engine.layout import BlockLayout, block_layout
from ..errors import PrunepilotError
from ..job import PruneJob, PruneReport
from ..masks import check_sparsity, parse_pattern
from .budget import Ledger
from .candidates import Scorer
from .expert_removal import remove_experts
from .observation import Domains
from .outcome import ModelBefore, build_report
from .removal import Remover
from .steps import Steps, run_steps

log = logging.getLogger(__name__)


def model_layouts(adapter: ModelAdapter) -> list[BlockLayout]:
    return [block_layout(b, f"{adapter.model_type} block {i}") for i, b in enumerate(adapter.blocks)]


def calibration(job: PruneJob) -> tuple[Calibration, dict]:
    """The calibration data (ids (n, seqlen), per-row domains, domain weights) and its report summary."""
    cal = job.calibration_data()
    n, seqlen = int(cal.ids.shape[0]), int(cal.ids.shape[1])
    stats = {"domain_stats": job.method.options.domain_stats}
    if job.token_ids is not None:
        return cal, {"n_samples": n, "seqlen": seqlen, "sources": "given token ids", **stats}
    if stats["domain_stats"] == "fused":
        stats["domain_weights"] = cal.weights
    return cal, {"sources": job.recipe.calibration.sources, "n_samples": n, "seqlen": seqlen, "domains": cal.summary,
                 **stats}


def run(job: PruneJob) -> PruneReport:
    """Remove whole MLP channels and KV head groups from job.model in place (it becomes physically smaller)."""
    options, batch_size = job.method.options, job.recipe.calibration.batch_size
    sparsity = check_sparsity(job.recipe.sparsity)
    warn_ignored_settings(job)
    adapter = ModelAdapter(job.model)
    layouts = model_layouts(adapter)
    ledger = Ledger(adapter, layouts, adapter.attention_geometry().head_dim, options)
    ledger.check_feasible(sparsity)
    before, coverage = ModelBefore.of(adapter, layouts), adapter.coverage()
    t0 = time.time()
    cal, calib_summary = calibration(job)
    timings = {"calibration_data_s": time.time() - t0}
    t0 = time.time()
    kept_experts = remove_experts(ledger, cal.ids, job.device, batch_size) if options.remove_experts else {}
    steps = Steps(ledger, Scorer(ledger, job.method, job.recipe.calibration.min_expert_tokens), Remover(ledger),
                  job.device, Domains.of(options, cal), batch_size)
    records = run_steps(job.name, job.method, steps, cal.ids, sparsity)
    timings["prune_s"] = time.time() - t0
    report = build_report(job, ledger, steps.remover, before, records, calib_summary, timings)
    report.extra["domain_stats"] = options.domain_stats
    starved = steps.scorer.starved
    report.coverage = coverage.to_dict() | ({"experts_scored_by_weights": starved} if starved else {})
    for i, kept in kept_experts.items():
        report.extra["layers"][i].update(kept)
    if kept_experts:
        report.extra["expert_score"] = options.expert_score
    return report


def warn_ignored_settings(job: PruneJob) -> None:
    recipe = job.recipe
    if parse_pattern(recipe.pattern) is not None:
        raise PrunepilotError(f"structured method {job.name} does not take an N:M pattern ({recipe.pattern})")
    if recipe.include:
        log.warning("structured pruning ignores include/ignore patterns: every decoder block is pruned")
    if recipe.allocation.kind != "uniform":
        log.warning("structured pruning ignores allocation %s: structured.ratios (global or uniform) decides "
                    "the per-layer amounts", recipe.allocation.kind)
