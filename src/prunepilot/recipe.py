"""Recipes: what to prune and how, as a strict pydantic model. YAML in, YAML out; unknown keys rejected."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, field_validator

from .errors import PrunepilotError
from .masks import parse_pattern
from .schema import Strict, load_yaml_mapping, validate
from .search import EvoOptions
from .structured.options import IterativeOptions


class CalibrationConfig(Strict):
    sources: list[str] = Field(default_factory=lambda: ["web"], min_length=1)  # data.TextSource specs
    n_samples: int = Field(128, ge=1)
    seqlen: int = Field(2048, ge=2)
    seed: int = 0
    batch_size: int = Field(1, ge=1)
    # an MoE expert routed fewer calibration tokens than this is pruned from its weights alone (magnitude)
    min_expert_tokens: int = Field(32, ge=0)


class AllocationConfig(Strict):
    kind: Literal["uniform", "owl", "explicit", "evo"] = "uniform"
    owl_lambda: float = Field(0.08, ge=0, le=0.5)
    owl_m: float = Field(5.0, gt=0)
    layers: dict[str, float] = Field(default_factory=dict)  # explicit: {"0": 0.3, "4-7": 0.6}
    evo: EvoOptions = Field(default_factory=EvoOptions)     # evo: the evolutionary search's settings (search.py)


class EvaluationConfig(Strict):
    datasets: list[str] = Field(default_factory=lambda: ["wikitext2"])
    seqlen: int | None = Field(None, ge=2)  # None: 2048, or the model's context when shorter
    max_windows: int | None = Field(None, ge=1)  # None = the whole test set
    batch_size: int = Field(1, ge=1)
    before: bool = True  # also measure the dense model


class Recipe(Strict):
    method: str = "wanda"
    sparsity: float = Field(0.5, ge=0.0, lt=1.0)
    pattern: str = "unstructured"  # or N:M such as 2:4, 4:8
    method_options: dict = Field(default_factory=dict)
    refine: Literal["none", "dsnot"] = "none"   # mask refinement after a per-block method (registry.REFINERS)
    refine_options: dict = Field(default_factory=dict)
    allocation: AllocationConfig = Field(default_factory=AllocationConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    # the structured methods' options (structured/options.py): read against the widest model, IterativeOptions;
    # each method's own model (registry.py) refuses what it does not take, e.g. steps > 1 for flap
    structured: IterativeOptions = Field(default_factory=IterativeOptions)
    include: list[str] = Field(default_factory=list)
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])
    device: str = "auto"
    dtype: str = "float32"

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        try:
            parse_pattern(v)
        except PrunepilotError as e:
            raise ValueError(str(e)) from None
        return v

    def with_defaults(self, defaults: dict) -> "Recipe":
        """A copy in which every field the user left unset takes the value in `defaults` ({section: {field: value}}
        or {field: value}), e.g. a method's own calibration seqlen. Fields the user stated always win."""
        data = self.model_dump()
        for key, value in defaults.items():
            section = getattr(self, key)
            if isinstance(value, dict) and isinstance(section, Strict):
                data[key].update({k: v for k, v in value.items() if k not in section.model_fields_set})
            elif key not in self.model_fields_set:
                data[key] = value
        return Recipe.model_validate(data)

    def stated(self, section: str) -> dict:
        """The fields of one section (method_options, structured ...) this recipe states, as a mapping."""
        value = getattr(self, section)
        return value.model_dump(exclude_unset=True) if isinstance(value, Strict) else dict(value)

    def to_yaml(self) -> str:
        """The settings that were stated (everything else keeps its method-dependent default when the file
        is read back, so it reproduces the run; report.json records the values actually used)."""
        return yaml.safe_dump(self.model_dump(mode="json", exclude_unset=True), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        return validate(cls, data, "recipe")

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Recipe":
        return cls.from_dict(load_yaml_mapping(path, "recipe"))
