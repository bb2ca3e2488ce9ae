"""The declared contracts: structured methods' typed options (filled by the registry defaults, one-shot methods
refuse steps > 1), the registry's names and duplicate check, the statistic-state protocol, the default
prune_group, and a structured method's own contract (not PruningMethod's)."""
from types import SimpleNamespace

import pytest
import torch

from prunepilot.errors import PrunepilotError
from prunepilot.methods.base import InputNormState, PruningMethod
from prunepilot.methods.dsnot import WithMoments
from prunepilot.methods.sparsegpt import HessianState
from prunepilot.recipe import Recipe
from prunepilot.registry import PER_BLOCK, STRUCTURED, MethodSpec, get_method, get_spec, method_names, register
from prunepilot.statistic_state import StatisticState
from prunepilot.structured.expert_scores import ReapScore, TokenCount
from prunepilot.structured.methods import StructuredMethod
from prunepilot.moments import DomainMoments, RunningMoments


def method_for(recipe: dict):
    recipe = Recipe.from_dict(recipe)
    return get_spec(recipe.method).build_for(recipe)


def test_registry_defaults_fill_the_structured_options_and_stated_fields_win():
    assert method_for({"method": "wanda_sp"}).options.ratios == "uniform"
    assert method_for({"method": "wanda_sp"}).options.bias_compensation is False
    assert method_for({"method": "wanda_sp", "structured": {"ratios": "global"}}).options.ratios == "global"
    assert method_for({"method": "flap"}).options.ratios == "global"
    it = method_for({"method": "flap_iterative", "structured": {"steps": 3, "schedule": "linear"}})
    assert (it.options.steps, it.options.schedule, it.options.domain_stats) == (3, "linear", "fused")
    assert it.kept_fraction(0.6, 3) == pytest.approx(0.4) and it.kept_fraction(0.6, 1) == pytest.approx(0.8)


@pytest.mark.parametrize("method", ["wanda_sp", "flap"])
def test_one_shot_methods_refuse_more_than_one_step(method):
    assert method_for({"method": method, "structured": {"steps": 1}}).options.steps == 1
    with pytest.raises(PrunepilotError) as e:
        method_for({"method": method, "structured": {"steps": 3}})
    assert "prunes in one step" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(PrunepilotError, match="schedule"):  # only the iterative method has a schedule
        method_for({"method": method, "structured": {"schedule": "linear"}})


def test_structured_options_are_read_from_structured_only():
    with pytest.raises(PrunepilotError, match="structured: section, not in method_options"):
        method_for({"method": "flap_iterative", "method_options": {"schedule": "linear"}})
    with pytest.raises(PrunepilotError) as e:  # a typo fails when the recipe is read, in one line
        Recipe.from_dict({"method": "flap", "structured": {"ratio": "global"}})
    assert "structured.ratio" in str(e.value) and "\n" not in str(e.value)


def test_registry_names_methods_and_refuses_a_second_one_under_a_name():
    per_block, structured = method_names(PER_BLOCK).split(", "), method_names(STRUCTURED).split(", ")
    assert {"magnitude", "wanda", "sparsegpt"} <= set(per_block) and "flap" not in per_block
    assert set(structured) == {"wanda_sp", "flap", "flap_iterative"}
    with pytest.raises(PrunepilotError, match="already registered"):
        register(MethodSpec("wanda", PruningMethod, PER_BLOCK))


def test_every_statistic_state_follows_the_protocol():
    matrix = SimpleNamespace(module=None, expert=0)
    states = [InputNormState(4, "cpu"), HessianState(4, "cpu"), RunningMoments(4),
              DomainMoments(4, {"a": 1.0}, lambda: "a"), WithMoments(None, 4, "cpu"), TokenCount(),
              ReapScore(matrix, None)]
    assert all(isinstance(s, StatisticState) for s in states)
    for s in states[:6]:  # ReapScore runs its expert: fed in test_moe.py
        s.add(torch.ones(2, 3, 4))
        assert s.n == 6


def test_default_prune_group_prunes_each_linear_alone():
    wanda = get_method("wanda")
    g = torch.Generator().manual_seed(0)
    ws, state = [torch.randn(6, 8, generator=g) for _ in range(2)], wanda.init_state(torch.zeros(6, 8))
    state.add(torch.randn(5, 8, generator=g))
    alone = [wanda.prune(w.clone(), state, 0.5, None) for w in ws]
    together = wanda.prune_group([w.clone() for w in ws], state, 0.5, None)
    assert all(torch.equal(a, b) for a, b in zip(alone, together))


def test_structured_methods_have_their_own_contract():
    flap = get_method("flap")
    assert isinstance(flap, StructuredMethod) and not isinstance(flap, PruningMethod)
    assert flap.group_reduce == "mean" and get_method("wanda_sp").group_reduce == "sum"
    assert flap.schedule is None and get_method("flap_iterative").schedule == "geometric"
