"""prune_structured: calibration pass(es), channel/head ranking, physical slicing, report.

    ids    = calibration tokens (FLAP-style seqlen 128 unless the recipe sets one)
    for step in 1..k:                        # k = 1 (wanda_sp, flap) or recipe.structured.steps
        target = dense * kept_fraction(step)  # geometric schedule by default
        sequential pass over the current model, block by block, recording the input statistics of
        down_proj / o_proj (float32 streaming moments)
          uniform ratios: each block is pruned inside the pass (the next block sees pruned outputs)
          global ranking: scores of all blocks are ranked together after the pass, then every block is sliced
    report params before/after, per-layer widths and kept KV groups

What `sparsity` counts (recipe.structured.target):
    "params":   the fraction of the decoder blocks' linear parameters (weights + biases) removed; biases
                added by compensation count against it, so params_after = (1 - s) * params_before up to
                one MLP channel.
    "channels": the mean over module types of the fraction of MLP channels / KV groups removed.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..api import PruneReport, resolve_device
from ..data import calibration_blocks, check_token_ids
from ..engine import (BlockInputs, ModelAdapter, capture_block_inputs, collect, input_hooks, keeps_placement,
                      run_block, sequential_pass)
from ..errors import PrunepilotError
from ..masks import check_sparsity
from .methods import StructuredMethod, kept_fraction
from .scores import SCORES, Candidates, RunningMoments, align_removal, group_scores, head_scores, lowest, \
    select_global, split_uniform_layer, standardize
from .slicing import BlockLayout, attention_counts, block_layout, block_widths, complement, keep_kv_groups, \
    keep_mlp_channels, linear, mlp_width

log = logging.getLogger(__name__)

FLAP_SEQLEN = 128  # DESIGN.md: calibration seqlen for FLAP-style methods


@dataclass
class Options:
    ratios: str
    target: str
    bias_compensation: bool
    kinds: tuple[str, ...]          # ("mlp", "attn") minus what the recipe switches off
    steps: int
    schedule: str
    score: str
    standardize: bool
    channel_multiple: int = 1       # MLP widths kept at a multiple of this


def resolve_options(recipe, method: StructuredMethod) -> Options:
    """Recipe values win when the recipe states them; otherwise the method's defaults apply."""
    st = recipe.structured
    given = st.model_fields_set
    kinds = tuple(k for k, on in (("mlp", st.prune_channels), ("attn", st.prune_heads)) if on)
    if not kinds:
        raise PrunepilotError("structured pruning with prune_heads and prune_channels both off removes nothing")
    return Options(
        ratios=st.ratios if "ratios" in given else method.default_ratios,
        target=st.target,
        bias_compensation=st.bias_compensation if "bias_compensation" in given else method.default_bias_compensation,
        kinds=kinds,
        steps=st.steps if method.iterative else 1,
        schedule=method.schedule,
        score=method.score,
        standardize=method.standardize,
        channel_multiple=st.channel_multiple)


def structured_calibration(recipe, method: StructuredMethod, tokenizer) -> tuple[torch.Tensor, dict]:
    """Calibration blocks: the method's default sources (flap_iterative: wiki+web+code+math) and seqlen 128
    unless the recipe sets them."""
    c = recipe.calibration
    given = c.model_fields_set
    sources = c.sources if ("sources" in given or not method.default_sources) else list(method.default_sources)
    seqlen = c.seqlen if "seqlen" in given else FLAP_SEQLEN
    if tokenizer is None:
        raise PrunepilotError("structured pruning needs calibration data: pass a tokenizer or calibration token ids")
    ids, summary = calibration_blocks(tokenizer, sources, c.n_samples, seqlen, c.seed)
    return ids, {"sources": sources, "n_samples": int(ids.shape[0]), "seqlen": int(ids.shape[1]), "domains": summary}


# ---------------------------------------------------------------------------------------------- accounting

def linear_params(block, layout: BlockLayout) -> int:
    names = [layout.attn.q, layout.attn.k, layout.attn.v, layout.attn.o, *layout.mlp.ins, layout.mlp.out]
    return sum(p.numel() for n in names for p in linear(block, n).parameters())


class Ledger:
    """Counts what `sparsity` measures and what each removable unit is worth, on the current model."""

    def __init__(self, adapter: ModelAdapter, layouts: list[BlockLayout], head_dim: int, opts: Options):
        self.adapter, self.layouts, self.head_dim, self.opts = adapter, layouts, head_dim, opts
        self.dense_units = [self.units(i) for i in range(len(layouts))]
        self.dense_layer = [self.measure(i) for i in range(len(layouts))]
        self.dense_total = sum(self.dense_layer)
        self.dense_params = [linear_params(adapter.blocks[i], lay) for i, lay in enumerate(layouts)]

    def units(self, i: int) -> dict[str, int]:
        block, lay = self.adapter.blocks[i], self.layouts[i]
        return {"mlp": mlp_width(block, lay.mlp), "attn": attention_counts(block, lay.attn, self.head_dim)[1]}

    def measure(self, i: int) -> float:
        if self.opts.target == "params":
            return float(linear_params(self.adapter.blocks[i], self.layouts[i]))
        now = self.units(i)
        return sum(now[k] / self.dense_units[i][k] for k in self.opts.kinds)

    def cost(self, i: int, kind: str) -> float:
        """What removing one MLP channel / one KV group of layer i saves."""
        if self.opts.target == "channels":
            return 1.0 / self.dense_units[i][kind]
        block, lay, hd = self.adapter.blocks[i], self.layouts[i], self.head_dim

        def row(name):  # one output row: a weight row plus its bias entry
            lin = linear(block, name)
            return lin.in_features + (lin.bias is not None)

        if kind == "mlp":  # gate + up rows, down column
            return float(sum(row(n) for n in lay.mlp.ins) + linear(block, lay.mlp.out).out_features)
        gs = attention_counts(block, lay.attn, hd)[2]  # q rows + k/v rows + o columns of one KV group
        return float(gs * hd * row(lay.attn.q) + hd * (row(lay.attn.k) + row(lay.attn.v))
                     + gs * hd * linear(block, lay.attn.o).out_features)

    def overhead(self, i: int) -> float:
        """Parameters bias compensation will add to layer i (a bias on each bias-less output projection)."""
        if self.opts.target != "params" or not self.opts.bias_compensation:
            return 0.0
        block, lay = self.adapter.blocks[i], self.layouts[i]
        outs = {"mlp": lay.mlp.out, "attn": lay.attn.o}
        return float(sum(linear(block, outs[k]).out_features for k in self.opts.kinds
                         if linear(block, outs[k]).bias is None))

    def min_kept(self, i: int, kind: str) -> int:
        """Fewest units a module can keep: one, or one multiple of channel_multiple for an MLP wide enough
        to be rounded (align_removal never rounds a kept width down to zero)."""
        m = self.opts.channel_multiple
        return m if kind == "mlp" and 1 < m <= self.dense_units[i]["mlp"] else 1

    def capacity(self, i: int) -> float:
        now = self.units(i)
        return sum(max(0, now[k] - self.min_kept(i, k)) * self.cost(i, k) for k in self.opts.kinds)

    def mlp_floor_words(self) -> str:
        m = self.opts.channel_multiple
        return f"{m} MLP channels (channel_multiple {m})" if m > 1 else "one MLP channel"

    def check_feasible(self, sparsity: float) -> None:
        """Fail before any work when keeping the fewest units per layer (one KV group; one MLP channel, or one
        channel_multiple) cannot reach the target."""
        need = [self.dense_layer[i] * sparsity + self.overhead(i) for i in range(len(self.layouts))]
        cap = [self.capacity(i) for i in range(len(self.layouts))]
        short = sum(need) > sum(cap) + 1e-6 if self.opts.ratios == "global" else any(
            n > c + 1e-6 for n, c in zip(need, cap))
        if short:
            most = max(0.0, sum(c - o for c, o in zip(cap, (self.overhead(i) for i in range(len(cap))))))
            raise PrunepilotError(
                f"sparsity {sparsity:g} is too high for structured pruning ({self.opts.ratios} ratios, kinds "
                f"{'+'.join(self.opts.kinds)}): keeping one KV head group and {self.mlp_floor_words()} per layer allows "
                f"removing at most {most / self.dense_total:.3f} of the block {self.opts.target}")


# ---------------------------------------------------------------------------------------------- one step

@dataclass
class Tracker:
    """Original indices of the channels / KV groups each layer still has (for the report)."""
    channels: list[torch.Tensor]
    groups: list[torch.Tensor]


class StructuredPruner:
    def __init__(self, adapter: ModelAdapter, layouts: list[BlockLayout], head_dim: int, opts: Options,
                 device: torch.device):
        self.adapter, self.layouts, self.head_dim, self.opts, self.device = adapter, layouts, head_dim, opts, device
        self.ledger = Ledger(adapter, layouts, head_dim, opts)
        self.tracker = Tracker(channels=[torch.arange(u["mlp"]) for u in self.ledger.dense_units],
                               groups=[torch.arange(u["attn"]) for u in self.ledger.dense_units])

    def out_linears(self, i: int) -> dict:
        block, lay = self.adapter.blocks[i], self.layouts[i]
        outs = {"mlp": lay.mlp.out, "attn": lay.attn.o}
        return {k: linear(block, outs[k]) for k in self.opts.kinds}

    def candidates(self, i: int, moments: dict[str, RunningMoments]) -> list[Candidates]:
        """Scores of layer i's MLP channels and KV groups from the input statistics of down_proj / o_proj."""
        block, lay, hd = self.adapter.blocks[i], self.layouts[i], self.head_dim
        fn = SCORES[self.opts.score]
        out = []
        for kind, lin in self.out_linears(i).items():
            col = fn(lin.weight, moments[kind]).cpu()  # (in,)
            if self.opts.standardize:  # FLAP: z-score the columns, then average per head and group
                col = standardize(col)
            if kind == "attn":
                gs = attention_counts(block, lay.attn, hd)[2]
                reduce = "mean" if self.opts.standardize else "sum"
                col = group_scores(head_scores(col, hd, reduce), gs, reduce)  # (kv_heads,)
            out.append(Candidates(i, kind, col, self.ledger.cost(i, kind)))
        return out

    def apply(self, i: int, removed: dict[str, torch.Tensor], moments: dict[str, RunningMoments]) -> None:
        """Slice layer i (with bias compensation when on: every output projection gets a bias)."""
        block, lay = self.adapter.blocks[i], self.layouts[i]
        units = self.ledger.units(i)
        for kind in self.opts.kinds:
            gone = removed.get(kind, torch.zeros(0, dtype=torch.long))
            if gone.numel() == 0 and not self.opts.bias_compensation:
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
        """MLP removals rounded so that the kept width is a multiple of opts.channel_multiple (on the last step
        only: rounding the intermediate steps of flap_iterative would push removals to later steps)."""
        if self.opts.channel_multiple <= 1 or not align:
            return removed
        return {c.kind: align_removal(c.scores, removed[c.kind], self.opts.channel_multiple) if c.kind == "mlp"
                else removed[c.kind] for c in cands}

    def step(self, inputs: BlockInputs, keep_frac: float, desc: str, last: bool = True) -> None:
        """One calibration pass over the current model, then pruning to keep_frac of the dense measure."""
        uniform = self.opts.ratios == "uniform"
        all_cands: list[Candidates] = []
        all_moments: dict[int, dict[str, RunningMoments]] = {}

        def visit(i, block, inp):
            linears = self.out_linears(i)
            moments = {k: RunningMoments(lin.in_features, self.device) for k, lin in linears.items()}
            add = lambda k, x: moments[k].add(x)  # noqa: E731
            if uniform:  # prune this block now; the next block sees its pruned outputs
                collect(block, i, linears, inp, add)
                cands = self.candidates(i, moments)
                self.apply(i, self.aligned(cands, self.uniform_removal(i, cands, keep_frac), last), moments)
                inp.hidden = run_block(block, i, inp)
            else:  # record statistics of the unpruned block; rank globally after the pass
                with input_hooks(linears, add):
                    inp.hidden = run_block(block, i, inp)
                all_cands.extend(self.candidates(i, moments))
                all_moments[i] = moments

        sequential_pass(self.adapter, inputs, self.device, visit, desc=desc, propagate=False)
        if not uniform:
            n = len(self.layouts)
            budget = sum(self.ledger.measure(i) + self.ledger.overhead(i) for i in range(n)) \
                - keep_frac * self.ledger.dense_total
            removed = select_global(all_cands, max(budget, 0.0))
            for i in range(n):
                cands = [c for c in all_cands if c.layer == i]
                self.apply(i, self.aligned(cands, {c.kind: removed[(i, c.kind)] for c in cands}, last), all_moments[i])


# ---------------------------------------------------------------------------------------------- entry point

def model_layouts(adapter: ModelAdapter) -> list[BlockLayout]:
    return [block_layout(b, f"{adapter.model_type} block {i}") for i, b in enumerate(adapter.blocks)]


def warn_unaligned(widths: list[dict], dense_mlp: list[int], multiple: int, align: int = 64) -> None:
    """Odd MLP widths cost GPU speed: say so when the dense widths were aligned and the pruned ones are not."""
    odd = [w["intermediate_size"] for w, d in zip(widths, dense_mlp)
           if d % align == 0 and w["intermediate_size"] % align]
    if multiple == 1 and odd:
        log.warning("%d layers have MLP widths that are not multiples of %d (e.g. %d): GPU matrix kernels lose their "
                    "fast paths (docs/RESULTS.md: an 8B model with 20%% removed prefilled at half the dense speed on "
                    "an H100); structured.channel_multiple: 128 (--channel-multiple 128) rounds them", len(odd), align,
                    odd[0])


def update_config(adapter: ModelAdapter, widths: list[dict]) -> bool:
    """When every layer has the same widths, write them into the config if it accepts them: it must have an
    explicit head_dim field (OPT-style configs derive head_dim from the head count) and pass its own
    validation (llama's requires hidden_size % num_attention_heads == 0). Otherwise the config keeps its
    dense values and saving records the widths next to it. Returns whether the widths are uniform."""
    keys = ("intermediate_size", "num_heads", "num_kv_heads")
    uniform = all(tuple(w[k] for k in keys) == tuple(widths[0][k] for k in keys) for w in widths)
    cfg = adapter.text_config()
    if not (uniform and hasattr(cfg, "head_dim") and hasattr(cfg, "intermediate_size")):
        return uniform
    new = {"intermediate_size": widths[0]["intermediate_size"], "num_attention_heads": widths[0]["num_heads"],
           "num_key_value_heads": widths[0]["num_kv_heads"], "head_dim": widths[0]["head_dim"]}
    old = {k: getattr(cfg, k) for k in new}
    for k, v in new.items():
        setattr(cfg, k, v)
    try:
        if hasattr(cfg, "validate"):
            cfg.validate()
    except Exception as e:  # the config cannot state these widths: keep it dense
        log.info("config keeps its dense widths (%s)", str(e).splitlines()[-1].strip())
        for k, v in old.items():
            setattr(cfg, k, v)
    return uniform


@keeps_placement
def prune_structured(model, recipe, method: StructuredMethod, tokenizer=None,
                     calibration: torch.Tensor | None = None) -> PruneReport:
    """Remove whole MLP channels and KV head groups from `model` in place (it becomes physically smaller)."""
    sparsity = check_sparsity(recipe.sparsity)
    opts = resolve_options(recipe, method)
    if recipe.pattern not in ("unstructured", "structured"):
        raise PrunepilotError(f"structured method {method.name} does not take an N:M pattern ({recipe.pattern})")
    if recipe.include:
        log.warning("structured pruning ignores include/ignore patterns: every decoder block is pruned")
    if recipe.allocation.kind != "uniform":
        log.warning("structured pruning ignores allocation %s: structured.ratios (global or uniform) decides "
                    "the per-layer amounts", recipe.allocation.kind)
    if "steps" in recipe.structured.model_fields_set and not method.iterative and recipe.structured.steps > 1:
        log.warning("%s prunes in one step; structured.steps applies to flap_iterative", method.name)
    device = resolve_device(recipe.device)
    adapter = ModelAdapter(model)
    layouts = model_layouts(adapter)
    head_dim = adapter.attention_geometry().head_dim
    pruner = StructuredPruner(adapter, layouts, head_dim, opts, device)
    ledger = pruner.ledger
    ledger.check_feasible(sparsity)
    params_before = sum(p.numel() for p in model.parameters())
    block_before = sum(linear_params(b, lay) for b, lay in zip(adapter.blocks, layouts))
    dense_shapes = {n: list(m.weight.shape) for n, m in adapter.all_linears().items()}

    timings: dict[str, float] = {}
    t0 = time.time()
    if calibration is None:
        calibration, calib_summary = structured_calibration(recipe, method, tokenizer)
    else:
        calibration = check_token_ids(calibration)
        calib_summary = {"n_samples": int(calibration.shape[0]), "seqlen": int(calibration.shape[1]),
                         "sources": "given token ids"}
    timings["calibration_data_s"] = time.time() - t0

    t0 = time.time()
    first = capture_block_inputs(model, adapter, calibration, device, recipe.calibration.batch_size)
    hidden0 = list(first.hidden)  # block 0's inputs do not change when blocks are pruned: reuse them
    steps = []
    schedule = range(1, opts.steps + 1)
    for t in (tqdm(schedule, desc=f"{method.name} steps") if opts.steps > 1 else schedule):
        ts = time.time()
        keep = kept_fraction(sparsity, t, opts.steps, opts.schedule)
        if sparsity > 0:
            inputs = BlockInputs(hidden=list(hidden0), args=first.args, kwargs=first.kwargs)
            pruner.step(inputs, keep, desc=f"{method.name} {t}/{opts.steps}", last=t == opts.steps)
        achieved = 1 - sum(ledger.measure(i) for i in range(len(layouts))) / ledger.dense_total
        steps.append({"step": t, "target_kept": keep, "achieved_sparsity": achieved, "seconds": time.time() - ts})
        log.info("%s step %d/%d: kept target %.4f, achieved sparsity %.4f", method.name, t, opts.steps, keep, achieved)
    timings["prune_s"] = time.time() - t0
    if sparsity > 0 and abs(steps[-1]["achieved_sparsity"] - sparsity) > 0.02:
        rounding = f"; channel_multiple {opts.channel_multiple} rounds MLP widths" if opts.channel_multiple > 1 else ""
        log.warning("%s reached sparsity %.3f for a target of %.3f: whole KV groups are coarse units (enable "
                    "prune_channels or use global ratios to fill the gap)%s", method.name,
                    steps[-1]["achieved_sparsity"], sparsity, rounding)

    widths = [block_widths(b, head_dim, lay) for b, lay in zip(adapter.blocks, layouts)]
    warn_unaligned(widths, [u["mlp"] for u in ledger.dense_units], opts.channel_multiple)
    uniform = update_config(adapter, widths)
    block_after = sum(linear_params(b, lay) for b, lay in zip(adapter.blocks, layouts))
    params_after = sum(p.numel() for p in model.parameters())
    layers = {}
    for name, lin in adapter.all_linears().items():
        dense = dense_shapes[name][0] * dense_shapes[name][1]
        now = lin.weight.numel()
        layers[name] = {"shape": list(lin.weight.shape), "dense_shape": dense_shapes[name], "numel": dense,
                        "zeros": dense - now, "sparsity": (dense - now) / dense}  # "zeros": weights removed
    per_layer = [{"layer": i, **w, "kept_kv_groups": pruner.tracker.groups[i].tolist(),
                  "removed_fraction": 1 - linear_params(adapter.blocks[i], layouts[i]) / ledger.dense_params[i]}
                 for i, w in enumerate(widths)]
    extra = {
        "structured": True, "ratios": opts.ratios, "target": opts.target, "kinds": list(opts.kinds),
        "bias_compensation": opts.bias_compensation, "score": opts.score, "standardize": opts.standardize,
        "channel_multiple": opts.channel_multiple,
        "steps": steps, "schedule": opts.schedule if method.iterative else None, "uniform_widths": uniform,
        "params_before": params_before, "params_after": params_after,
        "block_params_before": block_before, "block_params_after": block_after,
        "achieved_sparsity": 1 - block_after / block_before, "layers": per_layer,
    }
    report = PruneReport(method.name, "structured", sparsity, [p["removed_fraction"] for p in per_layer],
                         layers, calib_summary, timings, extra)
    log.info("%s: block parameters %d -> %d (%.4f removed), model %d -> %d in %.1fs", method.name, block_before,
             block_after, extra["achieved_sparsity"], params_before, params_after, timings["prune_s"])
    return report

