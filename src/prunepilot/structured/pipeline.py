"""The structured pipeline: calibration pass(es), channel/head ranking, physical slicing.

    ids    = calibration tokens (FLAP-style seqlen 128 unless the recipe sets one)
    for step in 1..k:                        # k = 1 (wanda_sp, flap) or recipe.structured.steps
        target = dense * kept_fraction(step)  # geometric schedule by default
        one pass over the current model, block by block, recording the input statistics of
        down_proj / o_proj (float32 streaming moments; structured.domain_stats "fused": one set per calibration
        domain, fused as mean Σ w_k μ_k, variance Σ w_k σ²_k, scores.DomainMoments):
          uniform ratios: each block is pruned inside the pass (the next block sees pruned outputs)
          global ranking: a statistics-only pass; all blocks' scores are ranked together, then every block is sliced
    report params before/after, per-layer widths and kept KV groups (outcome.py)
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..engine import ExpertMatrix, ModelAdapter, blocks
from ..engine.layout import BlockLayout, MoEParts, attention_counts, block_layout, linear
from ..errors import PrunepilotError
from ..data import Calibration
from ..job import PruneJob, PruneReport
from ..masks import check_sparsity
from .budget import Ledger, Options
from .expert_scores import expert_score_state
from .methods import StructuredMethod, kept_fraction
from .outcome import ModelBefore, build_report
from .scores import Candidates, DomainMoments, RunningMoments, align_removal, group_scores, head_scores, lowest, \
    select_global, split_uniform_layer, standardize
from .slicing import complement, keep_experts, keep_kv_groups, keep_mlp_channels

log = logging.getLogger(__name__)


@dataclass
class Tracker:
    """Original indices of the channels / KV groups each layer still has (for the report)."""
    channels: list[torch.Tensor]
    groups: list[torch.Tensor]


class StructuredPruner:
    def __init__(self, adapter: ModelAdapter, layouts: list[BlockLayout], head_dim: int, opts: Options,
                 method: StructuredMethod, device: torch.device):
        self.adapter, self.layouts, self.head_dim, self.opts = adapter, layouts, head_dim, opts
        self.method, self.device = method, device
        self.ledger = Ledger(adapter, layouts, head_dim, opts)
        self.tracker = Tracker(channels=[torch.arange(u["mlp"]) for u in self.ledger.dense_units],
                               groups=[torch.arange(u["attn"]) for u in self.ledger.dense_units])
        self.expert_order: dict[int, torch.Tensor] = {}   # MoE layer -> (E, I) each expert's channels, weakest first
        self.starved: dict[str, int] = {}                   # experts scored by weights alone -> routed tokens
        self.min_expert_tokens = 0
        self.tags: list[str] | None = None                  # fused statistics: each calibration row's domain
        self.domain_weights: dict[str, float] = {}

    def use_domains(self, cal: Calibration) -> None:
        """domain_stats "fused": keep per-domain statistics when the calibration rows carry their domains (given
        token ids do not: one domain, for which fused and pooled are the same statistic)."""
        if self.opts.domain_stats == "fused" and cal.domains:
            self.tags, self.domain_weights = cal.domains, cal.weights

    def out_linears(self, i: int) -> dict:
        """The output projections whose inputs are observed: {"mlp": down_proj, "attn": o_proj}; an MoE block's
        experts as {"mlp.<e>": expert e's down_proj} (statistics of the tokens routed to e)."""
        block, lay = self.adapter.blocks[i], self.layouts[i]
        out = {}
        if "mlp" in self.opts.kinds and isinstance(lay.mlp, MoEParts):
            experts = block.get_submodule(lay.mlp.experts)
            out.update({f"mlp.{e}": ExpertMatrix(experts, "down_proj", e) for e in range(experts.down_proj.shape[0])})
        elif "mlp" in self.opts.kinds:
            out["mlp"] = linear(block, lay.mlp.out)
        if "attn" in self.opts.kinds:
            out["attn"] = linear(block, lay.attn.o)
        return out

    def candidates(self, i: int, moments: dict[str, RunningMoments]) -> list[Candidates]:
        """Scores of layer i's MLP channels and KV groups from the input statistics of down_proj / o_proj."""
        block, lay, hd = self.adapter.blocks[i], self.layouts[i], self.head_dim
        out = []
        if "mlp" in moments:
            out.append(Candidates(i, "mlp", self.method.column_scores(linear(block, lay.mlp.out).weight,
                                                                      moments["mlp"]), self.ledger.cost(i, "mlp")))
        elif "mlp" in self.opts.kinds:
            out.append(Candidates(i, "mlp", self.expert_slots(i, moments), self.ledger.cost(i, "mlp")))
        if "attn" in moments:
            gs = attention_counts(block, lay.attn, hd)[2]
            col = self.method.column_scores(linear(block, lay.attn.o).weight, moments["attn"])  # (in,)
            reduce = self.method.group_reduce
            out.append(Candidates(i, "attn", group_scores(head_scores(col, hd, reduce), gs, reduce),  # (kv_heads,)
                                  self.ledger.cost(i, "attn")))
        return out

    def expert_slots(self, i: int, moments: dict[str, RunningMoments]) -> torch.Tensor:
        """Scores of an MoE layer's channel slots: slot r = removing each expert's r-th weakest channel (by its
        own routed-token statistics); its score is the mean over experts of those r-th scores, so slots come in
        ascending order. Experts routed fewer than min_expert_tokens tokens are scored by their weights alone."""
        experts = self.adapter.blocks[i].get_submodule(self.layouts[i].mlp.experts)
        scores = []
        for e in range(experts.down_proj.shape[0]):
            m = moments[f"mlp.{e}"]
            if m.n < self.min_expert_tokens:
                self.starved[f"{self.adapter.block_name(i)}.mlp.experts.{e}"] = m.n
                col = standardize(experts.down_proj[e].detach().float().pow(2).sum(0).cpu())
            else:
                col = self.method.column_scores(experts.down_proj[e], m)
            scores.append(col)
        ordered = torch.stack(scores).sort(dim=1, stable=True)            # (E, I) each expert ascending
        self.expert_order[i] = ordered.indices
        return ordered.values.mean(0)

    def apply(self, i: int, removed: dict[str, torch.Tensor], moments: dict[str, RunningMoments]) -> None:
        """Slice layer i (with bias compensation when on: every output projection gets a bias)."""
        block, lay = self.adapter.blocks[i], self.layouts[i]
        units = self.ledger.units(i)
        for kind in self.opts.kinds:
            gone = removed.get(kind, torch.zeros(0, dtype=torch.long))
            if gone.numel() == 0 and not self.opts.bias_compensation:
                continue
            if kind == "mlp" and isinstance(lay.mlp, MoEParts):  # each expert drops its own weakest len(gone)
                keep_mlp_channels(block, self.expert_order[i][:, gone.numel():], parts=lay.mlp)
                continue
            keep = complement(gone, units[kind])
            mean = moments[kind].mean if self.opts.bias_compensation else None
            if kind == "mlp":
                keep_mlp_channels(block, keep, mean, lay.mlp)
                self.tracker.channels[i] = self.tracker.channels[i][keep]
            else:
                keep_kv_groups(block, keep, self.head_dim, mean, lay.attn)
                self.tracker.groups[i] = self.tracker.groups[i][keep]

    def uniform_removal(self, i: int, cands: list[Candidates], keep_frac: float) -> dict[str, torch.Tensor]:
        by_kind = {c.kind: c for c in cands}
        if self.opts.target == "channels":  # every module type keeps round(keep_frac * dense) units
            ks = {k: max(0, c.n - max(1, round(keep_frac * self.ledger.dense_units[i][k]))) for k, c in by_kind.items()}
        else:
            now = self.ledger.measure(i)
            budget = now + self.ledger.overhead(i) - keep_frac * self.ledger.dense_layer[i]
            # KV groups: floor(removed fraction x dense groups), with the fraction counted cumulatively
            # against the dense layer, so k small iterative steps remove as many groups as one step would
            # (flooring each step's small share of what is left gave 0 groups every step)
            dense_g = self.ledger.dense_units[i]["attn"]
            gone_g = dense_g - (by_kind["attn"].n if "attn" in by_kind else dense_g)
            removed = 1 - (now - max(budget, 0.0)) / self.ledger.dense_layer[i]  # after this step
            groups = math.floor(removed * dense_g + 1e-9) - gone_g
            k_c, k_g = split_uniform_layer(by_kind.get("mlp"), by_kind.get("attn"), max(budget, 0.0), groups)
            ks = {"mlp": k_c, "attn": k_g}
        return {k: lowest(c.scores, ks[k]) for k, c in by_kind.items()}

    def aligned(self, cands: list[Candidates], removed: dict[str, torch.Tensor],
                align: bool) -> dict[str, torch.Tensor]:
        """MLP removals rounded so that the kept width is a multiple of ledger.multiple (channel_multiple; 8 for
        MoE experts), on the last step only (rounding the intermediate steps of flap_iterative would push
        removals to later steps), except for MoE experts, which must stay aligned to run at all."""
        def rounds(c: Candidates) -> bool:
            moe = isinstance(self.layouts[c.layer].mlp, MoEParts)
            return c.kind == "mlp" and (align or moe) and self.ledger.multiple(c.layer) > 1

        return {c.kind: align_removal(c.scores, removed[c.kind], self.ledger.multiple(c.layer)) if rounds(c)
                else removed[c.kind] for c in cands}

    def _pass(self, ids, outputs: str, desc: str, batch_size: int):
        """One block pass recording the output projections' input moments: pooled (RunningMoments), or per
        domain (DomainMoments, told each batch's domain by the pass) when self.tags is set."""
        def state(kind, lin):
            if self.tags is None:
                return RunningMoments(lin.in_features, self.device)
            return DomainMoments(lin.in_features, self.domain_weights, lambda: bp.tag, self.device)

        bp = blocks(self.adapter, ids, self.device, linears=lambda i, block: self.out_linears(i), states=state,
                    outputs=outputs, batch_size=batch_size, desc=desc, tags=self.tags)
        return bp

    def step_uniform(self, ids, keep_frac: float, desc: str, last: bool, batch_size: int = 1) -> None:
        """Uniform ratios: each block is pruned to keep_frac of its dense measure inside the pass."""
        for blk in self._pass(ids, "pruned", desc, batch_size):
            cands = self.candidates(blk.index, blk.states)
            self.apply(blk.index, self.aligned(cands, self.uniform_removal(blk.index, cands, keep_frac), last),
                       blk.states)

    def step_global(self, ids, keep_frac: float, desc: str, last: bool, batch_size: int = 1) -> None:
        """Global ranking: statistics of the unpruned model, one ranking across blocks, then every block sliced."""
        all_cands: list[Candidates] = []
        all_moments: dict[int, dict[str, RunningMoments]] = {}
        for blk in self._pass(ids, "dense", desc, batch_size):
            all_cands.extend(self.candidates(blk.index, blk.states))
            all_moments[blk.index] = blk.states
        n = len(self.layouts)
        budget = sum(self.ledger.measure(i) + self.ledger.overhead(i) for i in range(n)) \
            - keep_frac * self.ledger.dense_total
        removed = select_global(all_cands, max(budget, 0.0))
        for i in range(n):
            cands = [c for c in all_cands if c.layer == i]
            self.apply(i, self.aligned(cands, {c.kind: removed[(i, c.kind)] for c in cands}, last), all_moments[i])


def model_layouts(adapter: ModelAdapter) -> list[BlockLayout]:
    return [block_layout(b, f"{adapter.model_type} block {i}") for i, b in enumerate(adapter.blocks)]


def run_steps(job: PruneJob, pruner: StructuredPruner, ids, sparsity: float) -> list[dict]:
    """Reach the target in opts.steps steps (statistics re-measured each step); one record per step."""
    opts, ledger, name = pruner.opts, pruner.ledger, job.name
    step = pruner.step_uniform if opts.ratios == "uniform" else pruner.step_global
    steps = []
    schedule = range(1, opts.steps + 1)
    for t in (tqdm(schedule, desc=f"{name} steps") if opts.steps > 1 else schedule):
        ts = time.time()
        keep = kept_fraction(sparsity, t, opts.steps, job.method.schedule)
        if sparsity > 0:
            step(ids, keep, f"{name} {t}/{opts.steps}", t == opts.steps, job.recipe.calibration.batch_size)
        achieved = 1 - sum(ledger.measure(i) for i in range(len(pruner.layouts))) / ledger.dense_total
        steps.append({"step": t, "target_kept": keep, "achieved_sparsity": achieved, "seconds": time.time() - ts})
        log.info("%s step %d/%d: kept target %.4f, achieved sparsity %.4f", name, t, opts.steps, keep, achieved)
    if sparsity > 0 and abs(steps[-1]["achieved_sparsity"] - sparsity) > 0.02:
        rounding = f"; channel_multiple {opts.channel_multiple} rounds MLP widths" if opts.channel_multiple > 1 else ""
        log.warning("%s reached sparsity %.3f for a target of %.3f: whole KV groups are coarse units (enable "
                    "prune_channels or use global ratios to fill the gap)%s", name,
                    steps[-1]["achieved_sparsity"], sparsity, rounding)
    return steps


def calibration(job: PruneJob) -> tuple[Calibration, dict]:
    """The calibration data (ids (n, seqlen), per-row domains, domain weights) and its report summary."""
    cal = job.calibration_data()
    n, seqlen = int(cal.ids.shape[0]), int(cal.ids.shape[1])
    stats = {"domain_stats": job.recipe.structured.domain_stats}
    if job.token_ids is not None:
        return cal, {"n_samples": n, "seqlen": seqlen, "sources": "given token ids", **stats}
    if stats["domain_stats"] == "fused":
        stats["domain_weights"] = cal.weights
    return cal, {"sources": job.recipe.calibration.sources, "n_samples": n, "seqlen": seqlen, "domains": cal.summary,
                 **stats}


def run(job: PruneJob) -> PruneReport:
    """Remove whole MLP channels and KV head groups from job.model in place (it becomes physically smaller)."""
    recipe, method = job.recipe, job.method
    sparsity = check_sparsity(recipe.sparsity)
    opts = Options.from_recipe(recipe, method.iterative)
    warn_ignored_settings(job)
    adapter = ModelAdapter(job.model)
    layouts = model_layouts(adapter)
    pruner = StructuredPruner(adapter, layouts, adapter.attention_geometry().head_dim, opts, method, job.device)
    pruner.min_expert_tokens = recipe.calibration.min_expert_tokens
    pruner.ledger.check_feasible(sparsity)
    before = ModelBefore.of(adapter, layouts)
    coverage = adapter.coverage()
    t0 = time.time()
    cal, calib_summary = calibration(job)
    ids = cal.ids
    pruner.use_domains(cal)
    timings = {"calibration_data_s": time.time() - t0}
    t0 = time.time()
    kept_experts = remove_experts(pruner, ids, job.recipe.calibration.batch_size) if opts.remove_experts else {}
    steps = run_steps(job, pruner, ids, sparsity)
    timings["prune_s"] = time.time() - t0
    report = build_report(job, pruner, before, steps, calib_summary, timings)
    report.extra["domain_stats"] = opts.domain_stats
    report.coverage = coverage.to_dict() | ({"experts_scored_by_weights": pruner.starved} if pruner.starved else {})
    for i, kept in kept_experts.items():
        report.extra["layers"][i].update(kept)
    if kept_experts:
        report.extra["expert_score"] = opts.expert_score
    return report


def remove_experts(pruner: StructuredPruner, ids, batch_size: int) -> dict[int, dict]:
    """Before the channel steps: in every MoE layer remove the opts.remove_experts fraction of experts with the
    lowest opts.expert_score (expert_scores.py: routed-token frequency or REAP), the same count in every layer and
    never fewer experts than its top-k; one statistics-only pass. Returns {layer: {"kept_experts", "expert_scores"}}."""
    routers: dict[int, nn.Module] = {}

    def observed(i, block):
        lay = pruner.layouts[i].mlp
        if not isinstance(lay, MoEParts):
            return {}
        ex = block.get_submodule(lay.experts)
        routers[id(ex)] = block.get_submodule(lay.router)
        return {e: ExpertMatrix(ex, "gate_up_proj", e) for e in range(ex.gate_up_proj.shape[0])}

    scores = {}
    for blk in blocks(pruner.adapter, ids, pruner.device, linears=observed, outputs="dense", batch_size=batch_size,
                      states=expert_score_state(pruner.opts.expert_score, routers), desc="expert scores"):
        if blk.states:
            scores[blk.index] = torch.tensor([blk.states[e].score for e in sorted(blk.states)], dtype=torch.float64)
    kept = {}
    for i, s in scores.items():
        block, lay = pruner.adapter.blocks[i], pruner.layouts[i].mlp
        top_k = getattr(block.get_submodule(lay.router), "top_k", 1)
        k = min(int(pruner.opts.remove_experts * s.numel()), s.numel() - top_k)
        keep = torch.argsort(s, descending=True, stable=True)[: s.numel() - k].sort().values
        keep_experts(block, keep, lay)
        kept[i] = {"kept_experts": keep.tolist(), "expert_scores": s.tolist()}
        gone = [e for e in range(s.numel()) if e not in kept[i]["kept_experts"]]
        log.info("layer %d: removed experts %s (%s %s), kept %d", i, gone, pruner.opts.expert_score,
                 s[gone].tolist(), keep.numel())
    return kept


def warn_ignored_settings(job: PruneJob) -> None:
    recipe = job.recipe
    if recipe.pattern not in ("unstructured", "structured"):
        raise PrunepilotError(f"structured method {job.name} does not take an N:M pattern ({recipe.pattern})")
    if recipe.include:
        log.warning("structured pruning ignores include/ignore patterns: every decoder block is pruned")
    if recipe.allocation.kind != "uniform":
        log.warning("structured pruning ignores allocation %s: structured.ratios (global or uniform) decides "
                    "the per-layer amounts", recipe.allocation.kind)
    if job.user_set("structured", "steps") and not job.method.iterative and recipe.structured.steps > 1:
        log.warning("%s prunes in one step; structured.steps applies to flap_iterative", job.name)
