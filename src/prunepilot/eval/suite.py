"""The evaluation suite: zero-shot multiple choice, MMLU and factual QA on local data, in one call.

    results = run_suite(model, tokenizer, ["arc_easy", "mmlu"], "../shared/data", limit=200)
    results["arc_easy"] -> {"acc", "acc_norm", "main": "acc", "n", "protocol": {...}, "seconds", ...}

Tasks are named in TASKS; "all" expands to every task whose data ships in data_dir (not freebaseqa). A task
may be given as NAME=PATH to read another data file (freebaseqa needs one: freebaseqa=FreebaseQA-eval.json).
`limit` keeps the first N items of each task; for MMLU it keeps the first ceil(N / 57) test questions of
every subject (about N questions, every subject and category covered).

"main" names the metric a task is usually reported with in the pruning literature (Wanda, SparseGPT,
LLM-Pruner tables): acc_norm for ARC-challenge, HellaSwag and OpenBookQA, acc elsewhere. Scores are
fractions in [0, 1].
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import PrunepilotError
from ..modeling import context_length
from . import factual_qa, mmlu, zeroshot
from .checkpoint import UnitStore, digest, model_fingerprint, unit_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str                      # "mc" | "mmlu" | "qa"
    path: str                      # data file / folder, relative to data_dir
    main: str                      # metric reported as the task's score
    prompt: str                    # human-readable prompt/scoring description for the protocol record
    loader: Callable | None = None
    norm: bool = True              # acc_norm is reported (multiple choice)
    needs_user_file: bool = False  # no copy ships in data_dir


_MC = "sum log p(' ' + choice | context); acc = argmax, acc_norm = argmax of sum / len(choice chars)"
TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("arc_easy", "mc", "zeroshot/arc_easy.jsonl", "acc", "Question: {q}\\nAnswer: {choice}",
             zeroshot.load_query_choices),
    TaskSpec("arc_challenge", "mc", "zeroshot/arc_challenge.jsonl", "acc_norm", "Question: {q}\\nAnswer: {choice}",
             zeroshot.load_query_choices),
    TaskSpec("hellaswag", "mc", "hellaswag/hellaswag_val_full.txt.bz2", "acc_norm", "{ctx} {ending}",
             zeroshot.load_hellaswag),
    TaskSpec("piqa", "mc", "zeroshot/piqa.jsonl", "acc", "Question: {goal}\\nAnswer: {solution}",
             zeroshot.load_query_choices),
    TaskSpec("winogrande", "mc", "zeroshot/winogrande.jsonl", "acc",
             "partial scoring: log p(' ' + continuation | context option), acc only",
             zeroshot.load_winogrande, norm=False),
    TaskSpec("boolq", "mc", "zeroshot/boolq.jsonl", "acc", "{passage}\\nQuestion: {q}?\\nAnswer: {no|yes}",
             zeroshot.load_boolq, norm=False),
    TaskSpec("openbookqa", "mc", "zeroshot/openbook_qa.jsonl", "acc_norm", "{question_stem} {choice}",
             zeroshot.load_obqa),
    TaskSpec("mmlu", "mmlu", "mmlu", "acc",
             "hendrycks prompt, dev split as shots, argmax of next-token log p(' A'..' D') after 'Answer:'"),
    TaskSpec("triviaqa", "qa", "zeroshot/triviaqa_sm_sub.jsonl", "acc",
             "Question: {q}\\nAnswer: greedy <= 16 tokens, stop at \\n . ,; normalised exact match vs aliases",
             factual_qa.load_triviaqa),
    TaskSpec("freebaseqa", "qa", "freebaseqa/FreebaseQA-eval.json", "acc",
             "Question: {RawQuestion}\\nAnswer: greedy <= 16 tokens, stop at \\n . ,; normalised exact match",
             factual_qa.load_freebaseqa, needs_user_file=True),
]}
ZERO_SHOT_MC = [n for n, t in TASKS.items() if t.kind == "mc"]
DEFAULT_TASKS = [n for n, t in TASKS.items() if not t.needs_user_file]


def resolve_tasks(tasks: list[str] | str, data_dir: str | Path) -> list[tuple[str, TaskSpec, Path]]:
    """[(name, spec, data path)], validated up front: unknown tasks and missing files fail before any work."""
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    if not tasks:
        raise PrunepilotError(f"no tasks given; choose from {', '.join(TASKS)} or 'all'")
    out = []
    for entry in tasks:
        if entry == "all":  # every default task whose data is there
            found = [t for t in DEFAULT_TASKS if (Path(data_dir) / TASKS[t].path).exists()]
            missing = [t for t in DEFAULT_TASKS if t not in found]
            if not found:
                raise PrunepilotError(f"'all': no task data found under data_dir={data_dir} (expected the layout "
                                      "of ../shared/data)")
            if missing:
                log.warning("'all': skipping %s (no data under %s)", ", ".join(missing), data_dir)
            out += resolve_tasks(found, data_dir)
            continue
        name, _, override = entry.partition("=")
        if name not in TASKS:
            raise PrunepilotError(f"unknown task {name!r}; available: {', '.join(TASKS)} (or 'all')")
        spec = TASKS[name]
        path = Path(override).expanduser() if override else Path(data_dir) / spec.path
        if not path.exists():
            hint = (f"; give its file as {name}=PATH" if spec.needs_user_file else
                    f"; expected the layout of ../shared/data under data_dir={data_dir}")
            raise PrunepilotError(f"task {name}: data not found at {path}{hint}")
        out.append((name, spec, path))
    return out


CHUNK_ITEMS = 500  # items per checkpoint unit (multiple choice and QA); MMLU's unit is a subject


@dataclass
class Unit:
    """A piece of a task run as one checkpoint entry."""
    name: str                      # e.g. "items 0-500" or an MMLU subject
    inputs: str                    # digest of what it scores (part of the checkpoint key)
    n: int | None                  # outcomes it must hold (None: not known before running)
    run: Callable[[], dict]


def _run_units(units: list[Unit], task: str, protocol: dict, store: UnitStore | None,
               fingerprint: str) -> tuple[list[dict], int, float]:
    """Each unit's raw outcome, run now or read from the checkpoint; (outcomes, units reused, their seconds)."""
    outcomes, reused, reused_s = [], 0, 0.0
    for unit in units:
        key = unit_key(fingerprint, task, protocol, unit.name, unit.inputs) if store else ""
        data = store.get(key) if store else None
        if data is not None and unit.n is not None and data.get("n") != unit.n:
            log.warning("%s %s: the checkpoint holds %s outcomes for %d items; running it again", task, unit.name,
                        data.get("n"), unit.n)
            data = None
        if data is None:
            t0 = time.time()
            data = unit.run()
            data["seconds"] = round(time.time() - t0, 2)
            data["n"] = unit.n if unit.n is not None else len(data.get("correct", data.get("lls", [])))
            if store:
                store.put(key, task, unit.name, data)
        else:
            reused, reused_s = reused + 1, reused_s + data.get("seconds", 0.0)
        outcomes.append(data)
    return outcomes, reused, reused_s


def _sum_tokens(outcomes: list[dict]) -> dict:
    total: dict = {}
    for o in outcomes:
        for k, v in o.get("tokens", {}).items():
            total[k] = total.get(k, 0) + v
    return total


def _run_task(model, tokenizer, spec: TaskSpec, path: Path, limit: int | None, batch_size: int, device,
              num_fewshot_mmlu: int, add_bos: bool, qa_shots: int = 0, store: UnitStore | None = None,
              fingerprint: str = "") -> tuple[dict, float]:
    """(result, seconds of units reused from the checkpoint)."""
    protocol = {"data": str(path), "limit": limit, "prompt": spec.prompt, "add_bos": add_bos,
                "max_length": context_length(model)}  # longer prompts lose context tokens from the left
    run = _run_mmlu if spec.kind == "mmlu" else _run_items
    res, outcomes, reused, reused_s = run(model, tokenizer, spec, path, protocol, limit, batch_size, device,
                                          num_fewshot_mmlu, add_bos, qa_shots, store, fingerprint)
    res["tokens"] = _sum_tokens(outcomes)
    if store:
        res["checkpoint"] = {"units": len(outcomes), "units_resumed": reused}
    return {**res, "main": spec.main, "protocol": protocol}, reused_s


def _run_mmlu(model, tokenizer, spec, path, protocol, limit, batch_size, device, num_fewshot_mmlu, add_bos, qa_shots,
              store, fingerprint):
    """MMLU, one unit per subject when checkpointing (else one unit: batches then span subjects)."""
    subjects = mmlu.list_subjects(path)
    per_subject = mmlu.per_subject_limit(limit, len(subjects))
    protocol.update(shots=num_fewshot_mmlu, shots_from="dev", limit_per_subject=per_subject,
                    scoring="next-token letter log-prob")
    mmlu.warn_if_letters_split(tokenizer)
    groups = [[s] for s in subjects] if store else [subjects]
    files = lambda g: [f.read_bytes() for s in g for f in (path / "dev" / f"{s}_dev.csv",  # noqa: E731
                                                          path / "test" / f"{s}_test.csv")] if store else []
    units = [Unit(",".join(g) if store else "all", digest(*files(g)), None, lambda g=g: mmlu.score_subjects(
        model, tokenizer, path, g, num_fewshot_mmlu, per_subject, batch_size, device, add_bos)) for g in groups]
    outcomes, reused, reused_s = _run_units(units, spec.name, protocol, store, fingerprint)
    res = mmlu.combine(outcomes, protocol["max_length"])
    protocol["n_total"] = res.pop("n_total")
    return res, outcomes, reused, reused_s


def _run_items(model, tokenizer, spec, path, protocol, limit, batch_size, device, num_fewshot_mmlu, add_bos, qa_shots,
               store, fingerprint):
    """Multiple choice and factual QA: units of CHUNK_ITEMS items when checkpointing (else one unit)."""
    items = spec.loader(path)
    shots = []
    if spec.kind == "qa" and qa_shots:  # the file's last k items are the shots and are not evaluated
        if len(items) <= qa_shots:
            raise PrunepilotError(f"task {spec.name}: {len(items)} items cannot give {qa_shots} shots and questions")
        shots, items = items[-qa_shots:], items[:-qa_shots]
    n_total, items = len(items), items[:limit]
    if not items:
        raise PrunepilotError(f"task {spec.name}: no items in {path}")
    chunks = [(0, len(items))] if store is None else [
        (a, min(a + CHUNK_ITEMS, len(items))) for a in range(0, len(items), CHUNK_ITEMS)]
    if spec.kind == "mc":
        protocol.update(shots=0, scoring=_MC if spec.norm else "sum log p(' ' + continuation | context), acc")
        units = [Unit(f"items {a}-{b}", digest(items[a:b]) if store else "", b - a,
                      lambda a=a, b=b: zeroshot.score_items(model, tokenizer, items[a:b], batch_size, device,
                                                            add_bos, spec.name)) for a, b in chunks]
        outcomes, reused, reused_s = _run_units(units, spec.name, protocol, store, fingerprint)
        res = zeroshot.mc_metrics(items, [ll for o in outcomes for ll in o["lls"]], spec.norm)
    else:
        protocol.update(shots=qa_shots, scoring=f"greedy generation, max 16 new tokens, stops "
                                                f"{list(factual_qa.STOPS)}, normalised exact match")
        if qa_shots:
            protocol["shots_from"] = f"the file's last {qa_shots} items (not evaluated)"
        units = [Unit(f"items {a}-{b}", digest(items[a:b], shots) if store else "", b - a,
                      lambda a=a, b=b: factual_qa.answer_items(model, tokenizer, items[a:b], batch_size=batch_size,
                                                               device=device, add_bos=add_bos, shots=shots))
                 for a, b in chunks]
        outcomes, reused, reused_s = _run_units(units, spec.name, protocol, store, fingerprint)
        res = factual_qa.qa_metrics(items, [p for o in outcomes for p in o["predictions"]],
                                    [c for o in outcomes for c in o["correct"]])
    protocol["n_total"] = n_total  # after the units: not part of their checkpoint key
    return res, outcomes, reused, reused_s


def run_suite(model, tokenizer, tasks: list[str], data_dir: str | Path, limit: int | None = None, batch_size: int = 8,
              device=None, num_fewshot_mmlu: int = 5, add_bos: bool = False, qa_shots: int = 0,
              checkpoint: str | Path | None = None) -> dict:
    """Evaluate `model` on `tasks`; returns {task: {"acc", "acc_norm"?, "main", "n", "protocol", "seconds"}}.

    qa_shots: answered examples before each factual-QA question (0 = lm-eval's triviaqa protocol).
    device: where to run (the model is moved there if needed); default: the model's device.
    add_bos: prepend BOS to every prompt (lm-eval's default for most models is no BOS).
    checkpoint: a JSON-lines file; each task runs in units (500 items, or one MMLU subject) whose raw outcomes
    are appended as they finish, and units already there for this model and protocol are not run again
    (see checkpoint.py). "seconds" then counts the reused units' recorded time too.
    """
    if limit is not None and limit < 1:
        raise PrunepilotError(f"limit must be >= 1, got {limit}")
    if batch_size < 1:
        raise PrunepilotError(f"batch_size must be >= 1, got {batch_size}")
    if qa_shots < 0:
        raise PrunepilotError(f"qa_shots must be >= 0, got {qa_shots}")
    resolved = resolve_tasks(tasks, data_dir)
    if device is not None and next(model.parameters()).device != torch.device(device):
        model.to(device)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    store = UnitStore(checkpoint) if checkpoint is not None else None
    fingerprint = model_fingerprint(model, tokenizer) if store else ""
    results = {}
    try:
        for name, spec, path in resolved:
            t0 = time.time()
            res, reused_s = _run_task(model, tokenizer, spec, path, limit, batch_size, device, num_fewshot_mmlu,
                                      add_bos, qa_shots, store, fingerprint)
            res["seconds"] = round(time.time() - t0 + reused_s, 2)
            results[name] = res
            log.info("%s: %s=%.4f n=%d (%.1fs)", name, spec.main, res[spec.main], res["n"], res["seconds"])
    finally:
        model.train(was_training)
    return results
