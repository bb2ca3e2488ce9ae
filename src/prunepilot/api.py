"""One call: prune(model, recipe, tokenizer) mutates the model in place and returns a PruneReport."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import torch

from . import allocation
from .data import calibration_blocks, check_token_ids
from .engine import ModelAdapter, capture_block_inputs, collect, keeps_placement, sequential_pass, weight_2d
from .errors import PrunepilotError
from .masks import parse_pattern
from .methods.wanda import wanda_scores
from .methods.base import InputNormState
from .recipe import Recipe
from .registry import get_method

log = logging.getLogger(__name__)


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise PrunepilotError(f"unknown device {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PrunepilotError(f"device {name} requested but CUDA is not available")
    return dev


@dataclass
class PruneReport:
    method: str
    pattern: str
    target_sparsity: float
    block_sparsity_target: list[float]
    layers: dict[str, dict] = field(default_factory=dict)  # name -> {"shape", "sparsity"}
    calibration: dict = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def global_sparsity(self) -> float:
        total = sum(v["numel"] for v in self.layers.values())
        zeros = sum(v["zeros"] for v in self.layers.values())
        return zeros / total if total else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["global_sparsity"] = self.global_sparsity
        return d


def layer_stats(adapter: ModelAdapter) -> dict[str, dict]:
    """Zero count and shape of every prunable linear."""
    out = {}
    for name, lin in adapter.all_linears().items():
        w = weight_2d(lin)
        zeros = int((w == 0).sum())
        out[name] = {"shape": list(w.shape), "numel": w.numel(), "zeros": zeros, "sparsity": zeros / w.numel()}
    return out


def calibration_for(tokenizer, recipe: Recipe) -> tuple[torch.Tensor, dict]:
    if tokenizer is None:
        raise PrunepilotError("this method needs calibration data: pass a tokenizer or calibration token ids")
    c = recipe.calibration
    return calibration_blocks(tokenizer, c.sources, c.n_samples, c.seqlen, c.seed)


def owl_outlier_ratios(adapter: ModelAdapter, inputs, device, m: float) -> list[float]:
    """One dense sequential pass: per block, the share of Wanda scores above m x mean (OWL)."""
    ratios = []

    def visit(i, block, inp):
        linears = adapter.linears(i)
        states = {n: InputNormState(weight_2d(l).shape[1], device) for n, l in linears.items()}
        collect(block, i, linears, inp, lambda n, x: states[n].add(x))
        ratios.append(allocation.outlier_ratio(
            [wanda_scores(weight_2d(l), states[n].sq_mean) for n, l in linears.items()], m))

    sequential_pass(adapter, inputs, device, visit, desc="OWL outliers")
    return ratios


def block_targets(adapter: ModelAdapter, recipe: Recipe, inputs_factory, device) -> list[float]:
    a = recipe.allocation
    n = len(adapter)
    if a.kind == "uniform":
        return allocation.uniform(n, recipe.sparsity)
    if a.kind == "explicit":
        return allocation.explicit(a.layers, n, recipe.sparsity)
    ratios = owl_outlier_ratios(adapter, inputs_factory(), device, a.owl_m)
    return allocation.owl(ratios, recipe.sparsity, a.owl_lambda)


@keeps_placement
def prune(model, recipe: Recipe | dict, tokenizer=None, calibration: torch.Tensor | None = None) -> PruneReport:
    """Prune `model` in place following `recipe`; every tensor ends on the device it started on.

    calibration: optional (n_samples, seqlen) token ids; otherwise drawn from recipe.calibration.sources.
    """
    recipe = recipe if isinstance(recipe, Recipe) else Recipe.from_dict(recipe)
    method = get_method(recipe.method, **recipe.method_options)
    if getattr(method, "kind", "unstructured") == "structured":
        from .structured.api import prune_structured

        return prune_structured(model, recipe, method, tokenizer, calibration)
    pattern = parse_pattern(recipe.pattern)
    device = resolve_device(recipe.device)
    adapter = ModelAdapter(model, recipe.include, recipe.ignore)
    if not adapter.all_linears():
        raise PrunepilotError("no linear layer matches the include/ignore patterns")
    timings: dict[str, float] = {}
    t0 = time.time()
    calib_summary: dict = {}
    needs_data = method.needs_calibration or recipe.allocation.kind == "owl"
    if needs_data and calibration is None:
        calibration, calib_summary = calibration_for(tokenizer, recipe)
    elif calibration is not None:
        calibration = check_token_ids(calibration)
    if calibration is not None:
        calib_summary.setdefault("n_samples", int(calibration.shape[0]))
        calib_summary.setdefault("seqlen", int(calibration.shape[1]))
    timings["calibration_data_s"] = time.time() - t0

    def fresh_inputs():
        return capture_block_inputs(model, adapter, calibration, device, recipe.calibration.batch_size)

    t0 = time.time()
    targets = block_targets(adapter, recipe, fresh_inputs, device)
    if pattern is not None:
        nm_sparsity = (pattern[1] - pattern[0]) / pattern[1]
        if recipe.allocation.kind != "uniform":
            log.warning("N:M pattern %s fixes every layer's sparsity at %.2f; allocation %s ignored",
                        recipe.pattern, nm_sparsity, recipe.allocation.kind)
        targets = [nm_sparsity] * len(adapter)
    timings["allocation_s"] = time.time() - t0

    t0 = time.time()
    if method.needs_calibration:
        def visit(i, block, inputs):
            linears = adapter.linears(i)
            states = {n: method.init_state(weight_2d(l)) for n, l in linears.items()}
            collect(block, i, linears, inputs, lambda n, x: method.add_batch(states[n], x))
            for name, lin in linears.items():
                method.prune(weight_2d(lin), states[name], targets[i], pattern)
            states.clear()

        sequential_pass(adapter, fresh_inputs(), device, visit, desc=f"{recipe.method}")
    else:  # data-free: prune every block where it lies
        for i in range(len(adapter)):
            for lin in adapter.linears(i).values():
                method.prune(weight_2d(lin), method.init_state(weight_2d(lin)), targets[i], pattern)
    timings["prune_s"] = time.time() - t0
    report = PruneReport(recipe.method, recipe.pattern, recipe.sparsity, targets, layer_stats(adapter),
                         calib_summary, timings)
    log.info("pruned %s: global sparsity %.4f in %.1fs", recipe.method, report.global_sparsity, timings["prune_s"])
    return report
