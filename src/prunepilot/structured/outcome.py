"""What a structured run produced: per-layer widths written into the config when they are uniform, warnings about
GPU-unfriendly widths, and the report (parameters before/after, per-layer widths and kept KV groups)."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from ..engine import ModelAdapter
from ..engine.layout import BlockLayout, block_widths
from ..engine.model_config import text_config
from ..job import PruneJob, PruneReport
from .budget import Ledger, linear_params
from .removal import Remover
from .saving import write_widths

log = logging.getLogger(__name__)


@dataclass
class ModelBefore:
    """The dense model's sizes, taken before any slicing."""
    params: int
    block_params: int
    shapes: dict[str, list[int]]   # linear name -> dense weight shape

    @classmethod
    def of(cls, adapter: ModelAdapter, layouts: list[BlockLayout]) -> "ModelBefore":
        return cls(sum(p.numel() for p in adapter.model.parameters()),
                   sum(linear_params(b, lay) for b, lay in zip(adapter.blocks, layouts)),
                   {n: list(m.weight.shape) for n, m in adapter.all_linears().items()})


def warn_unaligned(widths: list[dict], dense_mlp: list[int], multiple: int, align: int = 64) -> None:
    """Odd MLP widths cost GPU speed: say so when the dense widths were aligned and the pruned ones are not."""
    odd = [w["intermediate_size"] for w, d in zip(widths, dense_mlp)
           if d % align == 0 and w["intermediate_size"] % align]
    if multiple == 1 and odd:
        log.warning("%d layers have MLP widths that are not multiples of %d (e.g. %d): GPU matrix kernels lose their "
                    "fast paths (docs/RESULTS.md: an 8B model with 20%% removed prefilled at half the dense speed on "
                    "an H100); structured.channel_multiple: 128 (--channel-multiple 128) rounds them", len(odd), align,
                    odd[0])


def state_uniform_widths(adapter: ModelAdapter, widths: list[dict]) -> bool:
    """When every layer has the same widths, write them into the in-memory config if it accepts them: it must have
    an explicit head_dim field (OPT-style configs derive head_dim from the head count) and pass its own
    validation (llama's requires hidden_size % num_attention_heads == 0). Otherwise the config keeps its dense
    values and saving records the widths next to it. Returns whether the widths are uniform."""
    keys = ("intermediate_size", "num_heads", "num_kv_heads")
    uniform = all(tuple(w[k] for k in keys) == tuple(widths[0][k] for k in keys) for w in widths)
    cfg = text_config(adapter.config)
    moe = any(w.get("experts") for w in widths)  # expert widths are not the config's intermediate_size
    if moe or not (uniform and hasattr(cfg, "head_dim") and hasattr(cfg, "intermediate_size")):
        return uniform
    old = write_widths(cfg, widths[0])
    try:
        if hasattr(cfg, "validate"):
            cfg.validate()
    except Exception as e:  # the config cannot state these widths: keep it dense
        log.info("config keeps its dense widths (%s)", str(e).splitlines()[-1].strip())
        for k, v in old.items():
            setattr(cfg, k, v)
    return uniform


def layer_entries(adapter: ModelAdapter, before: ModelBefore) -> dict[str, dict]:
    """Per linear: current and dense shape; "zeros" counts the weights removed."""
    layers = {}
    for name, lin in adapter.all_linears().items():
        dense = before.shapes[name][0] * before.shapes[name][1]
        now = lin.weight.numel()
        layers[name] = {"shape": list(lin.weight.shape), "dense_shape": before.shapes[name], "numel": dense,
                        "zeros": dense - now, "sparsity": (dense - now) / dense}
    return layers


def build_report(job: PruneJob, ledger: Ledger, remover: Remover, before: ModelBefore, steps: list[dict],
                 calib_summary: dict, timings: dict) -> PruneReport:
    adapter, layouts, method = ledger.adapter, ledger.layouts, job.method
    options = method.options
    widths = [block_widths(b, ledger.head_dim, lay) for b, lay in zip(adapter.blocks, layouts)]
    warn_unaligned(widths, [u["mlp"] for u in ledger.dense_units], options.channel_multiple)
    uniform = state_uniform_widths(adapter, widths)
    block_after = sum(linear_params(b, lay) for b, lay in zip(adapter.blocks, layouts))
    params_after = sum(p.numel() for p in adapter.model.parameters())
    per_layer = [{"layer": i, **w, "kept_kv_groups": remover.kept_groups[i].tolist(),
                  "removed_fraction": 1 - linear_params(adapter.blocks[i], layouts[i]) / ledger.dense_params[i]}
                 for i, w in enumerate(widths)]
    extra = {
        "structured": True, "ratios": options.ratios, "target": options.target, "kinds": list(ledger.kinds),
        "bias_compensation": options.bias_compensation, "score": method.score, "standardize": method.standardize,
        "channel_multiple": options.channel_multiple,
        "steps": steps, "schedule": method.schedule, "uniform_widths": uniform,
        "params_before": before.params, "params_after": params_after,
        "block_params_before": before.block_params, "block_params_after": block_after,
        "achieved_sparsity": 1 - block_after / before.block_params, "layers": per_layer,
    }
    log.info("%s: block parameters %d -> %d (%.4f removed), model %d -> %d in %.1fs", job.name, before.block_params,
             block_after, extra["achieved_sparsity"], before.params, params_after, timings["prune_s"])
    return PruneReport(job.name, job.recipe.pattern, job.recipe.sparsity, [p["removed_fraction"] for p in per_layer],
                       layer_entries(adapter, before), calib_summary, timings, extra)
