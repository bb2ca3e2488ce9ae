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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import PrunepilotError
from ..fingerprint import model_fingerprint
from ..engine.model_config import context_length
from . import factual_qa, gsm8k, mmlu, zeroshot
from .checkpoint import UnitStore, digest, unit_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    runner: Callable[..., tuple[dict, Outcomes]]  # (SuiteRun, TaskSpec, data path, protocol) -> (result, outcomes)
    path: str                      # data file / folder, relative to data_dir
    main: str                      # metric reported as the task's score
    prompt: str                    # human-readable prompt/scoring description for the protocol record
    loader: Callable | None = None
    norm: bool = True              # acc_norm is reported (multiple choice)
    needs_user_file: bool = False  # no copy ships in data_dir


@dataclass(frozen=True)
class SuiteRun:
    """What every task of one run_suite call shares: the model, the evaluation options and the checkpoint."""
    model: Any
    tokenizer: Any
    limit: int | None
    batch_size: int
    device: torch.device
    num_fewshot_mmlu: int
    add_bos: bool
    qa_shots: int
    store: UnitStore | None = None
    fingerprint: str = ""          # model_fingerprint(model, tokenizer) when checkpointing
    gsm8k_shots: int = 8           # worked examples before each GSM8K question (the first k of train.jsonl)
    gsm8k_max_tokens: int = gsm8k.MAX_NEW_TOKENS


@dataclass
class Unit:
    """A piece of a task run as one checkpoint entry."""
    name: str                      # e.g. "items 0-500" or an MMLU subject
    inputs: str                    # digest of what it scores (part of the checkpoint key)
    n: int | None                  # outcomes it must hold (None: not known before running)
    run: Callable[[], dict]


@dataclass
class Outcomes:
    """The raw outcomes of a task's units, in order, and how many of them came from the checkpoint."""
    data: list[dict] = field(default_factory=list)
    reused: int = 0
    reused_seconds: float = 0.0    # the time the reused units took when they were run


CHUNK_ITEMS = 500  # items per checkpoint unit (multiple choice and QA); MMLU's unit is a subject
_MC = "sum log p(' ' + choice | context); acc = argmax, acc_norm = argmax of sum / len(choice chars)"


def _run_units(run: SuiteRun, units: list[Unit], task: str, protocol: dict) -> Outcomes:
    """Each unit's raw outcome, run now or read from the checkpoint."""
    out = Outcomes()
    for unit in units:
        key = unit_key(run.fingerprint, task, protocol, unit.name, unit.inputs) if run.store else ""
        data = run.store.get(key) if run.store else None
        if data is not None and unit.n is not None and data.get("n") != unit.n:
            log.warning("%s %s: the checkpoint holds %s outcomes for %d items; running it again", task, unit.name,
                        data.get("n"), unit.n)
            data = None
        if data is None:
            t0 = time.time()
            data = unit.run()
            data["seconds"] = round(time.time() - t0, 2)
            data["n"] = unit.n if unit.n is not None else len(data.get("correct", data.get("lls", [])))
            if run.store:
                run.store.put(key, task, unit.name, data)
        else:
            out.reused, out.reused_seconds = out.reused + 1, out.reused_seconds + data.get("seconds", 0.0)
        out.data.append(data)
    return out


def _sum_tokens(outcomes: list[dict]) -> dict:
    total: dict = {}
    for o in outcomes:
        for k, v in o.get("tokens", {}).items():
            total[k] = total.get(k, 0) + v
    return total


def _load_items(run: SuiteRun, spec: TaskSpec, path: Path, n_shots: int = 0) -> tuple[list, list, int]:
    """(shots, items to score, items in the file less the shots): the file's last n_shots items are the shots
    and are not evaluated; `limit` keeps the first items."""
    items = spec.loader(path)
    shots = []
    if n_shots:
        if len(items) <= n_shots:
            raise PrunepilotError(f"task {spec.name}: {len(items)} items cannot give {n_shots} shots and questions")
        shots, items = items[-n_shots:], items[:-n_shots]
    n_total, items = len(items), items[:run.limit]
    if not items:
        raise PrunepilotError(f"task {spec.name}: no items in {path}")
    return shots, items, n_total


def _item_units(run: SuiteRun, items: list, score: Callable[[list], dict], *inputs) -> list[Unit]:
    """Units of CHUNK_ITEMS items when checkpointing (else one unit); `inputs` join each chunk in its digest."""
    n = len(items)
    chunks = [(0, n)] if run.store is None else [(a, min(a + CHUNK_ITEMS, n)) for a in range(0, n, CHUNK_ITEMS)]
    return [Unit(f"items {a}-{b}", digest(items[a:b], *inputs) if run.store else "", b - a,
                 lambda a=a, b=b: score(items[a:b])) for a, b in chunks]


def _run_mc(run: SuiteRun, spec: TaskSpec, path: Path, protocol: dict) -> tuple[dict, Outcomes]:
    """Zero-shot multiple choice: log-likelihood of each choice."""
    _, items, n_total = _load_items(run, spec, path)
    protocol.update(shots=0, scoring=_MC if spec.norm else "sum log p(' ' + continuation | context), acc")
    units = _item_units(run, items, lambda chunk: zeroshot.score_items(
        run.model, run.tokenizer, chunk, run.batch_size, run.device, run.add_bos, spec.name))
    done = _run_units(run, units, spec.name, protocol)
    res = zeroshot.mc_metrics(items, [ll for o in done.data for ll in o["lls"]], spec.norm)
    protocol["n_total"] = n_total  # after the units: not part of their checkpoint key
    return res, done


def _run_qa(run: SuiteRun, spec: TaskSpec, path: Path, protocol: dict) -> tuple[dict, Outcomes]:
    """Factual QA: greedy answers, exact match; run.qa_shots answered examples before each question."""
    shots, items, n_total = _load_items(run, spec, path, run.qa_shots)
    protocol.update(shots=run.qa_shots, scoring=f"greedy generation, max 16 new tokens, stops "
                                                f"{list(factual_qa.STOPS)}, normalised exact match")
    if run.qa_shots:
        protocol["shots_from"] = f"the file's last {run.qa_shots} items (not evaluated)"
    units = _item_units(run, items, lambda chunk: factual_qa.answer_items(
        run.model, run.tokenizer, chunk, batch_size=run.batch_size, device=run.device, add_bos=run.add_bos,
        shots=shots), shots)
    done = _run_units(run, units, spec.name, protocol)
    res = factual_qa.qa_metrics(items, [p for o in done.data for p in o["predictions"]],
                                [c for o in done.data for c in o["correct"]])
    protocol["n_total"] = n_total  # after the units: not part of their checkpoint key
    return res, done


def _run_gsm8k(run: SuiteRun, spec: TaskSpec, path: Path, protocol: dict) -> tuple[dict, Outcomes]:
    """GSM8K: greedy worked answers after run.gsm8k_shots examples from train.jsonl beside the test file."""
    train = path.parent / "train.jsonl"
    if run.gsm8k_shots and not train.exists():
        raise PrunepilotError(f"task gsm8k: the shots come from {train}, which does not exist (or give 0 shots)")
    shots = gsm8k.load_gsm8k(train, run.gsm8k_shots) if run.gsm8k_shots else []
    if len(shots) < run.gsm8k_shots:
        raise PrunepilotError(f"task gsm8k: {train} has {len(shots)} items, fewer than {run.gsm8k_shots} shots")
    _, items, n_total = _load_items(run, spec, path)
    protocol.update(shots=len(shots), shots_from=f"first {len(shots)} of {train}", max_new_tokens=run.gsm8k_max_tokens,
                    scoring=f"greedy generation, stops {list(gsm8k.STOPS)}; the number after 'The answer is', "
                            "'####' or the last number, equal in value to the gold after '####'")
    units = _item_units(run, items, lambda chunk: gsm8k.answer_items(
        run.model, run.tokenizer, chunk, shots, run.gsm8k_max_tokens, run.batch_size, run.device, run.add_bos),
        shots, run.gsm8k_max_tokens)
    done = _run_units(run, units, spec.name, protocol)
    res = factual_qa.qa_metrics(items, [p for o in done.data for p in o["predictions"]],
                                [c for o in done.data for c in o["correct"]])
    protocol["n_total"] = n_total  # after the units: not part of their checkpoint key
    return res, done


def _run_mmlu(run: SuiteRun, spec: TaskSpec, path: Path, protocol: dict) -> tuple[dict, Outcomes]:
    """MMLU, one unit per subject when checkpointing (else one unit: batches then span subjects)."""
    subjects = mmlu.list_subjects(path)
    per_subject = mmlu.per_subject_limit(run.limit, len(subjects))
    protocol.update(shots=run.num_fewshot_mmlu, shots_from="dev", limit_per_subject=per_subject,
                    scoring="next-token letter log-prob")
    mmlu.warn_if_letters_split(run.tokenizer)

    def score(group: list[str]) -> Callable[[], dict]:
        return lambda: mmlu.score_subjects(run.model, run.tokenizer, path, group, run.num_fewshot_mmlu, per_subject,
                                           run.batch_size, run.device, run.add_bos)

    if run.store:  # a subject's unit is keyed by its dev and test files
        units = [Unit(s, digest((path / "dev" / f"{s}_dev.csv").read_bytes(),
                                (path / "test" / f"{s}_test.csv").read_bytes()), None, score([s])) for s in subjects]
    else:
        units = [Unit("all", "", None, score(subjects))]
    done = _run_units(run, units, spec.name, protocol)
    res = mmlu.combine(done.data, protocol["max_length"])
    protocol["n_total"] = res.pop("n_total")
    return res, done


TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("arc_easy", _run_mc, "zeroshot/arc_easy.jsonl", "acc", "Question: {q}\\nAnswer: {choice}",
             zeroshot.load_query_choices),
    TaskSpec("arc_challenge", _run_mc, "zeroshot/arc_challenge.jsonl", "acc_norm", "Question: {q}\\nAnswer: {choice}",
             zeroshot.load_query_choices),
    TaskSpec("hellaswag", _run_mc, "hellaswag/hellaswag_val_full.txt.bz2", "acc_norm", "{ctx} {ending}",
             zeroshot.load_hellaswag),
    TaskSpec("piqa", _run_mc, "zeroshot/piqa.jsonl", "acc", "Question: {goal}\\nAnswer: {solution}",
             zeroshot.load_query_choices),
    TaskSpec("winogrande", _run_mc, "zeroshot/winogrande.jsonl", "acc",
             "partial scoring: log p(' ' + continuation | context option), acc only",
             zeroshot.load_winogrande, norm=False),
    TaskSpec("boolq", _run_mc, "zeroshot/boolq.jsonl", "acc", "{passage}\\nQuestion: {q}?\\nAnswer: {no|yes}",
             zeroshot.load_boolq, norm=False),
    TaskSpec("openbookqa", _run_mc, "zeroshot/openbook_qa.jsonl", "acc_norm", "{question_stem} {choice}",
             zeroshot.load_obqa),
    TaskSpec("mmlu", _run_mmlu, "mmlu", "acc",
             "hendrycks prompt, dev split as shots, argmax of next-token log p(' A'..' D') after 'Answer:'"),
    TaskSpec("triviaqa", _run_qa, "zeroshot/triviaqa_sm_sub.jsonl", "acc",
             "Question: {q}\\nAnswer: greedy <= 16 tokens, stop at \\n . ,; normalised exact match vs aliases",
             factual_qa.load_triviaqa),
    TaskSpec("gsm8k", _run_gsm8k, "gsm8k/test.jsonl", "acc",
             "k-shot (train) 'Question: {q}\\nAnswer:' greedy worked answer; exact match of the final number",
             gsm8k.load_gsm8k),
    TaskSpec("freebaseqa", _run_qa, "freebaseqa/FreebaseQA-eval.json", "acc",
             "Question: {RawQuestion}\\nAnswer: greedy <= 16 tokens, stop at \\n . ,; normalised exact match",
             factual_qa.load_freebaseqa, needs_user_file=True),
]}
ZERO_SHOT_MC = [n for n, t in TASKS.items() if t.runner is _run_mc]
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


def _run_task(run: SuiteRun, spec: TaskSpec, path: Path) -> tuple[dict, float]:
    """(result, seconds of units reused from the checkpoint)."""
    protocol = {"data": str(path), "limit": run.limit, "prompt": spec.prompt, "add_bos": run.add_bos,
                "max_length": context_length(run.model)}  # longer prompts lose context tokens from the left
    res, done = spec.runner(run, spec, path, protocol)
    res["tokens"] = _sum_tokens(done.data)
    if run.store:
        res["checkpoint"] = {"units": len(done.data), "units_resumed": done.reused}
    return {**res, "main": spec.main, "protocol": protocol}, done.reused_seconds


def run_suite(model, tokenizer, tasks: list[str], data_dir: str | Path, limit: int | None = None, batch_size: int = 8,
              device=None, num_fewshot_mmlu: int = 5, add_bos: bool = False, qa_shots: int = 0,
              checkpoint: str | Path | None = None, gsm8k_shots: int = 8,
              gsm8k_max_tokens: int = gsm8k.MAX_NEW_TOKENS) -> dict:
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
    if qa_shots < 0 or gsm8k_shots < 0 or gsm8k_max_tokens < 1:
        raise PrunepilotError(f"qa_shots and gsm8k_shots must be >= 0 and gsm8k_max_tokens >= 1, got {qa_shots}, "
                              f"{gsm8k_shots}, {gsm8k_max_tokens}")
    resolved = resolve_tasks(tasks, data_dir)
    if device is not None and next(model.parameters()).device != torch.device(device):
        model.to(device)
    was_training = model.training
    model.eval()
    store = UnitStore(checkpoint) if checkpoint is not None else None
    run = SuiteRun(model, tokenizer, limit, batch_size, next(model.parameters()).device, num_fewshot_mmlu, add_bos,
                   qa_shots, store, model_fingerprint(model, tokenizer) if store else "", gsm8k_shots, gsm8k_max_tokens)
    results = {}
    try:
        for name, spec, path in resolved:
            t0 = time.time()
            res, reused_s = _run_task(run, spec, path)
            res["seconds"] = round(time.time() - t0 + reused_s, 2)
            results[name] = res
            log.info("%s: %s=%.4f n=%d (%.1fs)", name, spec.main, res[spec.main], res["n"], res["seconds"])
    finally:
        model.train(was_training)
    return results
