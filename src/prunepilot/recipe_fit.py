"""Settings a recipe states that its method or model would silently ignore are refused (before any work).

A per-block method (magnitude, wanda ...) reads no `structured:` section; a structured method (wanda_sp, flap ...)
no `allocation:`; `--allocation explicit` needs its per-block `layers`; `--remove-experts` needs a
mixture-of-experts model. Each used to be accepted and then did nothing. (A structured method's own options model
refuses what it does not take, e.g. structured.steps > 1 for a one-shot method: registry.MethodSpec.build_for.)
"""
from __future__ import annotations

from .errors import PrunepilotError
from .registry import PER_BLOCK, STRUCTURED, get_spec, method_names

FLAGS = {"ratios": "--ratios", "steps": "--steps", "channel_multiple": "--channel-multiple",
         "remove_experts": "--remove-experts", "domain_stats": "--domain-stats", "kind": "--allocation"}


def _named(fields) -> str:
    return ", ".join(FLAGS.get(f, f) for f in sorted(fields))


def check_recipe_applies(recipe) -> None:
    """recipe: as the user stated it (before the method's defaults are filled in)."""
    spec = get_spec(recipe.method)
    stated_structured = recipe.structured.model_fields_set
    stated_allocation = recipe.allocation.model_fields_set
    if spec.pipeline is PER_BLOCK and stated_structured:
        raise PrunepilotError(f"{_named(stated_structured)} (recipe structured:) apply to the structured methods "
                              f"({method_names(STRUCTURED)}); {recipe.method} would ignore them")
    if spec.pipeline is STRUCTURED and stated_allocation:
        raise PrunepilotError(f"{_named(stated_allocation)} (recipe allocation:) apply to the per-block methods "
                              f"({method_names(PER_BLOCK)}); {recipe.method} allocates by its own ranking")
    if recipe.allocation.kind == "explicit" and not recipe.allocation.layers:
        raise PrunepilotError("--allocation explicit needs per-block sparsities: a recipe with allocation: "
                              "{kind: explicit, layers: {\"0\": 0.3, \"4-7\": 0.6}}")


def check_model_applies(recipe, model) -> None:
    """Settings that depend on the loaded model (before pruning or evaluating it)."""
    from .engine.moe import fused_experts

    if recipe.structured.remove_experts and not any(fused_experts(m) for m in model.modules()):
        raise PrunepilotError(f"--remove-experts {recipe.structured.remove_experts} needs a mixture-of-experts "
                              "model; this one has no experts")
