"""Method registry: every method is a name, its typed options (read from recipe.method_options, or for the
structured methods from recipe.structured), the recipe defaults it brings (fields the user leaves unset take them,
its options' included), and the pipeline that runs it. `prunepilot methods` lists it.

    spec = get_spec("flap_iterative")
    method = spec.build({"schedule": "linear"})          # validated options over the defaults -> method object
    method = spec.build_for(recipe)                       # the options the recipe states (what api.prune does)
    report = spec.pipeline.run(PruneJob(...))

Third-party methods: ``register(MethodSpec(...))`` with one of the pipelines below (or their own Pipeline).

What a change touches: a per-block method, its module under methods/ (a PruningMethod and its options model) and
one MethodSpec line here; a structured method, its class in structured/methods.py (a StructuredMethod) and one
line here, plus a model in structured/options.py only if it takes options the others do not; a structured option,
its field in structured/options.py and the module that reads it (and, for a flag, one add_argument in cli.py named
like the field: the flag is mapped by name).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from pydantic import BaseModel

from . import unstructured
from .errors import PrunepilotError
from .methods.base import NoOptions
from .methods.dsnot import DSnoT, DSnoTOptions
from .methods.magnitude import Magnitude, MagnitudeOptions
from .methods.ria import RIA, RIAOptions
from .methods.sparsegpt import SparseGPT, SparseGPTOptions
from .methods.wanda import Wanda, WandaOptions
from .recipe import Recipe
from .schema import validate
from .structured import pipeline as structured
from .structured.methods import FLAP, FLAPIterative, WandaSP
from .structured.options import IterativeOptions, OneShotOptions


@dataclass(frozen=True)
class Pipeline:
    name: str                     # shown by `prunepilot methods`
    run: Callable                 # run(job: PruneJob) -> PruneReport


PER_BLOCK = Pipeline("unstructured", unstructured.run)   # per-block masks (unstructured, N:M)
STRUCTURED = Pipeline("structured", structured.run)      # channel / KV-group removal, global or uniform ratios

FLAP_CALIBRATION = {"seqlen": 128}                       # DESIGN.md: calibration seqlen for FLAP-style methods
MULTI_DOMAIN = ["wiki", "web", "code", "math"]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    cls: type
    pipeline: Pipeline
    options: type[BaseModel] = NoOptions
    defaults: dict = field(default_factory=dict)   # {recipe section: {field: value}} used where the user set none
    section: str = "method_options"                # the recipe section the options are read from

    @property
    def summary(self) -> str:
        return self.cls.summary

    def build(self, options: dict | None = None):
        """The method object, with its options validated over the defaults of their section (one clear line for a
        wrong one)."""
        given = {**self.defaults.get(self.section, {}), **(options or {})}
        what = "options" if self.section == "method_options" else f"{self.section} options"
        return self.cls(validate(self.options, given, f"{what} of method {self.name}"))

    def build_for(self, recipe: Recipe):
        """The method with the options `recipe` (as the user stated it) gives in this method's section."""
        if self.section != "method_options" and recipe.method_options:
            raise PrunepilotError(f"{self.name} takes its options in the recipe's {self.section}: section, not in "
                                  f"method_options ({', '.join(sorted(recipe.method_options))})")
        return self.build(recipe.stated(self.section))


_METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in _METHODS:  # a second method under one name would silently replace the first
        raise PrunepilotError(f"a pruning method named {spec.name!r} is already registered")
    Recipe().with_defaults(spec.defaults)  # a typo in the defaults fails here, not in a user's run
    spec.build()                           # and so do defaults its options model refuses
    _METHODS[spec.name] = spec
    return spec


for _spec in (
    MethodSpec("magnitude", Magnitude, PER_BLOCK, MagnitudeOptions),
    MethodSpec("wanda", Wanda, PER_BLOCK, WandaOptions),
    MethodSpec("sparsegpt", SparseGPT, PER_BLOCK, SparseGPTOptions),
    MethodSpec("ria", RIA, PER_BLOCK, RIAOptions),
    MethodSpec("wanda_sp", WandaSP, STRUCTURED, OneShotOptions, section="structured", defaults={
        "calibration": FLAP_CALIBRATION, "structured": {"ratios": "uniform", "bias_compensation": False}}),
    MethodSpec("flap", FLAP, STRUCTURED, OneShotOptions, section="structured",
               defaults={"calibration": FLAP_CALIBRATION}),
    MethodSpec("flap_iterative", FLAPIterative, STRUCTURED, IterativeOptions, section="structured",
               defaults={"calibration": {**FLAP_CALIBRATION, "sources": MULTI_DOMAIN},
                         "structured": {"domain_stats": "fused"}}),
):
    register(_spec)


def get_spec(name: str) -> MethodSpec:
    if name not in _METHODS:
        raise PrunepilotError(f"unknown method {name!r}; available: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


REFINERS: dict[str, tuple[type, type[BaseModel]]] = {"dsnot": (DSnoT, DSnoTOptions)}


def build_refiner(recipe: Recipe):
    """The recipe's mask refinement (None for refine: none), its options validated; per-block methods only."""
    if recipe.refine == "none":
        if recipe.refine_options:
            raise PrunepilotError("refine_options given without refine (e.g. refine: dsnot)")
        return None
    if get_spec(recipe.method).pipeline is not PER_BLOCK:
        raise PrunepilotError(f"refine {recipe.refine} refines unstructured / N:M masks; {recipe.method} is "
                              "structured")
    cls, options = REFINERS[recipe.refine]
    return cls(validate(options, recipe.refine_options, f"refine_options of {recipe.refine}"))


def get_method(name: str, **options):
    """The method object `name` built with `options` (keyword form of get_spec(name).build(options))."""
    return get_spec(name).build(options)


def method_names(pipeline: Pipeline | None = None) -> str:
    """The registered methods (run by `pipeline`, else all) as "a, b, c", for messages that list them."""
    return ", ".join(name for name, spec in sorted(_METHODS.items()) if pipeline in (None, spec.pipeline))


def available() -> dict[str, MethodSpec]:
    return dict(sorted(_METHODS.items()))
