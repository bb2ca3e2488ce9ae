"""Evolutionary search of per-unit sparsities at an exact parameter budget (EvoPress-style, Sieberling et al. 2024).

    unit i (a linear, or a block) has numel n_i and an integer level l_i: sparsity s_i = target + l_i * step
    start: every l_i = 0 (uniform)
    mutation: l_a += 1, l_b -= 1 for two units of the same numel   ->  Σ n_i s_i = target * Σ n_i, exactly
    each generation (1 + λ): λ offspring of the parent, each 1..max_mutations such moves;
        stage 0: every offspring's fitness on few tokens; stage s: the `survivors` best of stage s-1 on more;
        the best of the last stage replaces the parent only if it is fitter on that stage (elitist: the parent's
        fitness never increases)
    fitness(sparsities {unit: s}, stage) -> float, lower is better (e.g. KL to the dense model, evo_allocation.py)

Seeded (generation g draws from Random(f"{seed}:{g}")) and resumable: with a log path every generation is one
line of a JSON-lines file (io.JsonLines, records below); a rerun checks the header and continues after the last
generation, reaching the same result as an uninterrupted run.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

from pydantic import Field

from .errors import PrunepilotError
from .io import JsonLines
from .masks import check_sparsity
from .schema import Strict

log = logging.getLogger(__name__)

Fitness = Callable[[dict[str, float], int], float]


class EvoOptions(Strict):
    """recipe allocation.evo: the search's settings (defaults: a few minutes on SmolLM2-135M on 2 CPU cores)."""
    generations: int = Field(20, ge=0)
    offspring: int = Field(8, ge=1)                   # λ
    survivors: int = Field(2, ge=1)                   # candidates each stage passes on to the next
    tokens: list[int] = Field(default_factory=lambda: [256, 1024], min_length=1)  # fitness tokens per stage
    seqlen: int = Field(256, ge=2)                    # held-out fitness windows of this length
    step: float = Field(0.05, gt=0, lt=1)             # sparsity of one level
    max_level: int = Field(4, ge=1)                   # levels within target ± max_level * step
    max_mutations: int = Field(3, ge=1)               # level moves per offspring: 1..max_mutations
    granularity: Literal["linear", "block"] = "linear"  # one level per linear or per decoder block
    log: str | None = None                            # JSON-lines generation log (the CLI: <out>/evo_search.jsonl)


@dataclass(frozen=True)
class Unit:
    name: str
    numel: int


@dataclass
class SearchHeader:
    """First line of a search log: what the search is, so a log of another search is never resumed."""
    units: list[str]
    numels: list[int]
    target: float
    seed: int
    options: dict
    kind: str = "header"


@dataclass
class GenerationRecord:
    """One finished generation: the parent after it and its last-stage fitness."""
    generation: int
    levels: list[int]
    fitness: float
    improved: bool
    evaluations: int
    seconds: float
    kind: str = "generation"


@dataclass
class SearchResult:
    sparsities: dict[str, float]          # unit name -> sparsity; Σ numel * sparsity = target * Σ numel
    fitness: float                        # the final parent's last-stage fitness
    uniform_fitness: float                # generation 0's (all levels 0)
    history: list[GenerationRecord] = field(default_factory=list)


def level_bounds(target: float, opts: EvoOptions) -> tuple[int, int]:
    """Lowest and highest level: sparsity stays in [0, 0.99] and within target ± max_level * step."""
    lo = -min(opts.max_level, int(target / opts.step + 1e-9))
    hi = min(opts.max_level, int((0.99 - target) / opts.step + 1e-9))
    return lo, hi


def same_size_groups(units: Sequence[Unit]) -> list[list[int]]:
    """Indices of units grouped by numel (only groups of two or more can trade levels)."""
    groups: dict[int, list[int]] = {}
    for i, u in enumerate(units):
        groups.setdefault(u.numel, []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def mutate(levels: list[int], groups: list[list[int]], bounds: tuple[int, int], rng: random.Random,
           max_mutations: int) -> list[int]:
    """A child: 1..max_mutations moves of one level from a unit to another of the same size (budget unchanged)."""
    child, (lo, hi) = list(levels), bounds
    for _ in range(rng.randint(1, max_mutations)):
        group = groups[rng.randrange(len(groups))]
        up = [i for i in group if child[i] < hi]
        if not up:
            continue
        a = up[rng.randrange(len(up))]
        down = [i for i in group if child[i] > lo and i != a]
        if not down:
            continue
        b = down[rng.randrange(len(down))]
        child[a] += 1
        child[b] -= 1
    return child


def sparsities_of(units: Sequence[Unit], levels: list[int], target: float, step: float) -> dict[str, float]:
    return {u.name: round(target + lv * step, 12) for u, lv in zip(units, levels)}  # 0.7 - 2 * 0.05 is 0.6


def check_search(units: Sequence[Unit], target: float, opts: EvoOptions) -> list[list[int]]:
    check_sparsity(target)
    if not units:
        raise PrunepilotError("allocation evo: no layers to allocate")
    if len(opts.tokens) > 1 and sorted(opts.tokens) != list(opts.tokens):
        raise PrunepilotError(f"allocation evo: tokens per stage must not decrease, got {opts.tokens}")
    groups = same_size_groups(units)
    if not groups and opts.generations:
        raise PrunepilotError("allocation evo: no two layers have the same size, so no level can move between them "
                              "at a fixed budget; use granularity block")
    return groups


def one_generation(units, target, opts, groups, parent: list[int], parent_fit: float, fitness: Fitness,
                   rng: random.Random) -> tuple[list[int], float, int]:
    """(new parent, its last-stage fitness, evaluations) after one (1 + λ) generation."""
    bounds, last = level_bounds(target, opts), len(opts.tokens) - 1
    pool = [mutate(parent, groups, bounds, rng, opts.max_mutations) for _ in range(opts.offspring)]
    pool = [c for k, c in enumerate(pool) if c != parent and c not in pool[:k]] or [parent]
    evaluations = 0
    for stage in range(last + 1):
        scored = [(fitness(sparsities_of(units, c, target, opts.step), stage), c) for c in pool]
        evaluations += len(scored)
        scored.sort(key=lambda fc: fc[0])  # stable: ties keep the draw order
        pool = [c for _, c in scored[: opts.survivors if stage < last else 1]]
    best_fit, best = scored[0]
    return (best, best_fit, evaluations) if best_fit < parent_fit else (parent, parent_fit, evaluations)


class SearchLog:
    """The resumable generation log (a JsonLines file of a SearchHeader line, then GenerationRecord lines)."""

    def __init__(self, path: str | Path | None, header: SearchHeader):
        self.file = JsonLines(path, what="allocation search log") if path else None
        self.header = header

    def resume(self) -> list[GenerationRecord]:
        if self.file is None or not self.file.exists():
            if self.file is not None:
                self.file.append(asdict(self.header))
            return []
        self.file.drop_partial_tail()
        records = [r for _, r in self.file.read()]
        if not records or records[0] != asdict(self.header):
            raise PrunepilotError(f"search log {self.file.path} was written by another search (other layers, target, "
                                  f"seed or options); remove it or write to another output folder")
        return [GenerationRecord(**{k: v for k, v in r.items()}) for r in records[1:]]

    def append(self, record: GenerationRecord) -> None:
        if self.file is not None:
            self.file.append(asdict(record))


def search_allocation(units: Sequence[Unit], target: float, fitness: Fitness, opts: EvoOptions | None = None,
                      seed: int = 0) -> SearchResult:
    """Per-unit sparsities with Σ numel·s = target·Σ numel that minimise `fitness` (see the module docstring).
    opts.log: a JSON-lines path to make the search resumable."""
    opts = opts or EvoOptions()
    groups = check_search(units, target, opts)
    header = SearchHeader([u.name for u in units], [u.numel for u in units], target, seed,
                          opts.model_dump(mode="json", exclude={"log", "generations"}))  # more generations extend a search
    store = SearchLog(opts.log, header)
    history = store.resume()
    parent = history[-1].levels if history else [0] * len(units)
    uniform_fit = fitness(sparsities_of(units, [0] * len(units), target, opts.step), len(opts.tokens) - 1)
    fit = history[-1].fitness if history else uniform_fit
    if history:
        log.info("allocation search: resuming after generation %d (fitness %.5f)", history[-1].generation, fit)
    for g in range(len(history) + 1, opts.generations + 1):
        t0 = time.time()
        new, new_fit, n = one_generation(units, target, opts, groups, parent, fit, fitness, random.Random(f"{seed}:{g}"))
        record = GenerationRecord(g, new, new_fit, new_fit < fit, n, round(time.time() - t0, 3))
        store.append(record)
        history.append(record)
        parent, fit = new, new_fit
        log.info("allocation search: generation %d/%d fitness %.5f%s", g, opts.generations, fit,
                 " (improved)" if record.improved else "")
    return SearchResult(sparsities_of(units, parent, target, opts.step), fit, uniform_fit, history)
