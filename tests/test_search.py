"""Evolutionary allocation search (search.py, evo_allocation.py): exact budget, seeded, resumable, elitist, and
better than uniform in KL on the real stories260K model."""
import json

import pytest
import torch

from conftest import shared_path
from prunepilot.api import prune
from prunepilot.errors import PrunepilotError
from prunepilot.search import EvoOptions, Unit, mutate, same_size_groups, search_allocation
from prunepilot.testing.tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py
UNITS = [Unit("a", 10), Unit("b", 10), Unit("c", 10), Unit("d", 30), Unit("e", 30)]
IDS = torch.randint(3, 128, (12, 32), generator=torch.Generator().manual_seed(0))
TINY_EVO = {"generations": 6, "offspring": 4, "tokens": [32, 128], "seqlen": 32, "step": 0.05}


def toy_fitness(calls=None):
    """A fitness whose best allocation is not uniform: unit a is fragile, c robust ((s - 0.5)² weighted)."""
    cost = {"a": 5.0, "b": 1.0, "c": 0.2, "d": 1.0, "e": 2.0}

    def fitness(sparsities, stage):
        if calls is not None:
            calls.append(stage)
        return sum(cost[u] * (s - 0.4) ** 2 * (1 + 0.01 * stage) for u, s in sparsities.items())
    return fitness


def weighted_mean(units, sparsities):
    return sum(u.numel * sparsities[u.name] for u in units) / sum(u.numel for u in units)


def test_mutation_moves_levels_between_units_of_the_same_size_only():
    import random

    groups = same_size_groups(UNITS)
    assert groups == [[0, 1, 2], [3, 4]]
    rng, levels = random.Random(0), [0] * 5
    for _ in range(200):
        levels = mutate(levels, groups, (-2, 3), rng, 3)
        assert sum(levels[:3]) == 0 and sum(levels[3:]) == 0 and all(-2 <= lv <= 3 for lv in levels)


def test_search_meets_the_budget_exactly_is_seeded_and_elitist():
    opts = EvoOptions(generations=15, offspring=4, tokens=[1, 2], step=0.05)
    calls = []
    res = search_allocation(UNITS, 0.5, toy_fitness(calls), opts, seed=3)
    assert weighted_mean(UNITS, res.sparsities) == pytest.approx(0.5, abs=1e-12)
    assert res.sparsities["a"] < 0.5 < res.sparsities["c"]      # the fragile unit keeps more weights
    fits = [res.uniform_fitness] + [r.fitness for r in res.history]
    assert all(b <= a for a, b in zip(fits, fits[1:])) and fits[-1] < fits[0]
    assert calls.count(1) < calls.count(0)                      # the larger stage sees only the survivors
    assert search_allocation(UNITS, 0.5, toy_fitness(), opts, seed=3).sparsities == res.sparsities
    assert [r.levels for r in search_allocation(UNITS, 0.5, toy_fitness(), opts, seed=4).history] != \
        [r.levels for r in res.history]


def test_search_resumes_from_its_log_to_the_same_result(tmp_path):
    log = tmp_path / "evo.jsonl"
    full = search_allocation(UNITS, 0.5, toy_fitness(), EvoOptions(generations=10, offspring=4), seed=1)
    search_allocation(UNITS, 0.5, toy_fitness(), EvoOptions(generations=4, offspring=4, log=str(log)), seed=1)
    with log.open("ab") as f:
        f.write(b'{"generation": 5, "lev')                      # a crash in the middle of a line
    lines = [json.loads(x) for x in log.read_text().splitlines()[:-1]]
    assert lines[0]["kind"] == "header" and [r["generation"] for r in lines[1:]] == [1, 2, 3, 4]
    calls = []
    resumed = search_allocation(UNITS, 0.5, toy_fitness(calls), EvoOptions(generations=10, offspring=4, log=str(log)),
                                seed=1)
    assert resumed.sparsities == full.sparsities
    assert [(r.levels, r.fitness) for r in resumed.history] == [(r.levels, r.fitness) for r in full.history]
    assert len(calls) < 10 * 4                                  # generations 1-4 were not evaluated again
    with pytest.raises(PrunepilotError, match="another search"):
        search_allocation(UNITS, 0.6, toy_fitness(), EvoOptions(generations=10, log=str(log)), seed=1)


def test_evo_allocation_on_a_tiny_model_meets_the_budget_and_is_reproducible():
    reports = []
    for _ in range(2):
        model = tiny_model("llama")
        reports.append(prune(model, {"method": "wanda", "sparsity": 0.5, "device": "cpu",
                                     "allocation": {"kind": "evo", "evo": TINY_EVO}}, calibration=IDS))
    evo = reports[0].extra["evo"]
    targets, layers = evo["linear_targets"], reports[0].layers
    assert set(targets) == set(layers) and len(set(targets.values())) > 1
    numel = sum(v["numel"] for v in layers.values())
    assert sum(layers[n]["numel"] * s for n, s in targets.items()) / numel == pytest.approx(0.5, abs=1e-12)
    for n, s in targets.items():                                # every linear pruned to its own level
        assert layers[n]["zeros"] == int(layers[n]["shape"][1] * s) * layers[n]["shape"][0], n
    assert evo["fitness_kl"] <= evo["uniform_kl"] and evo["held_out_tokens"] == 4 * 32
    assert reports[1].extra["evo"]["linear_targets"] == targets  # same seed, same allocation


def test_evo_refuses_n_m_and_too_few_rows():
    with pytest.raises(PrunepilotError, match="N:M"):
        prune(tiny_model("llama"), {"pattern": "2:4", "device": "cpu", "allocation": {"kind": "evo", "evo": TINY_EVO}},
              calibration=IDS)
    with pytest.raises(PrunepilotError, match="give more than 4 rows"):
        prune(tiny_model("llama"), {"device": "cpu", "allocation": {"kind": "evo", "evo": TINY_EVO}},
              calibration=IDS[:4])


def test_evo_beats_uniform_in_kl_on_stories260k(stories):
    from prunepilot.engine import ModelAdapter
    from prunepilot.evo_allocation import evo_targets
    from prunepilot.methods.wanda import Wanda

    make_model, tok = stories
    text = shared_path("data", "tinystories", "tinystories_val_head.txt").read_text()
    stream = torch.tensor(tok.encode(text)[:40 * 128])
    ids, held = stream[: 32 * 128].view(32, 128), stream[32 * 128:].view(8, 128)   # held out: never calibration
    model = make_model()
    opts = EvoOptions(generations=12, offspring=6, tokens=[256, 1024], seqlen=128, step=0.1, max_level=3)
    targets, res = evo_targets(model, ModelAdapter(model), Wanda(), ids, held, 0.6, opts, seed=0, device="cpu")
    assert res.fitness < 0.95 * res.uniform_fitness
    assert all(bool((p != 0).all()) for n, p in model.named_parameters() if n.endswith("proj.weight"))  # restored


def test_evo_per_block_gives_every_linear_of_a_block_its_level():
    model = tiny_model("llama")
    rep = prune(model, {"method": "magnitude", "sparsity": 0.6, "device": "cpu",
                        "allocation": {"kind": "evo", "evo": {**TINY_EVO, "granularity": "block"}}}, calibration=IDS)
    targets = rep.extra["evo"]["linear_targets"]
    for i, block_target in enumerate(rep.block_sparsity_target):
        assert {s for n, s in targets.items() if f"layers.{i}." in n} == {block_target}
    assert sum(rep.block_sparsity_target) / 3 == pytest.approx(0.6, abs=1e-12)  # blocks of equal size
