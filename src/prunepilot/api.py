"""One call: prune(model, recipe, tokenizer) mutates the model in place and returns a PruneReport."""
from __future__ import annotations

import torch

from .engine import keeps_placement, resolve_device
from .job import PruneJob, PruneReport
from .recipe import Recipe
from .registry import build_refiner, get_spec


@keeps_placement
def prune(model, recipe: Recipe | dict, tokenizer=None, calibration: torch.Tensor | None = None) -> PruneReport:
    """Prune `model` in place following `recipe`; every tensor ends on the device it started on.

    calibration: optional (n_samples, seqlen) token ids; otherwise drawn from recipe.calibration.sources.
    The method's own defaults (e.g. FLAP's calibration seqlen 128) fill the recipe fields the user left unset.
    """
    stated = recipe if isinstance(recipe, Recipe) else Recipe.from_dict(recipe)
    spec = get_spec(stated.method)
    job = PruneJob(model, stated.with_defaults(spec.defaults), spec.build_for(stated), tokenizer, calibration,
                   resolve_device(stated.device), build_refiner(stated),
                   seqlen_stated="seqlen" in stated.calibration.model_fields_set)
    return spec.pipeline.run(job)
