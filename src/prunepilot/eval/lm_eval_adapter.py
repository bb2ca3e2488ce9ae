"""Run lm-eval-harness tasks on an in-memory (e.g. just pruned) model.

Optional: needs `pip install lm-eval` (or `pip install 'prunepilot[lmeval]'`) and, for most tasks, network
access to the Hugging Face hub for the data sets. The model is wrapped with lm-eval's HFLM, so the tokenizer
must be a Hugging Face tokenizer (not prunepilot's SentencePiece wrapper). Results come back in run_suite's
shape, keyed "lm_eval:TASK" so they never overwrite (or get averaged with) prunepilot's own task of the same
name: {"lm_eval:arc_easy": {"acc", "acc_norm", ..., "n", "protocol", "seconds"}}. Only the requested tasks
and groups get an entry; a group's member tasks are kept inside it under "subtasks".

Offline tasks: ``include_path`` (``prunepilot eval --harness-include DIR``) is a folder of task YAMLs handed to
lm-eval's ``TaskManager(include_path=DIR)``; a YAML whose ``dataset_path`` is a loader such as ``json`` with
``dataset_kwargs: {data_files: ...}`` pointing at local files runs without the network, e.g.

    task: my_local_qa
    dataset_path: json
    dataset_kwargs: {data_files: {test: /data/qa.jsonl}}
    test_split: test
    output_type: multiple_choice
    doc_to_text: "{{question}}"
    doc_to_choice: "{{choices}}"
    doc_to_target: "{{gold}}"
    metric_list: [{metric: acc}]
"""
from __future__ import annotations

import time

from ..errors import PrunepilotError
from .suite import TASKS

INSTALL_HINT = "lm-eval-harness is not installed: pip install lm-eval  (or pip install 'prunepilot[lmeval]')"


def require_lm_eval() -> None:
    """Raise the install hint unless lm-eval can be imported."""
    _import_lm_eval()


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise PrunepilotError(INSTALL_HINT) from e
    return lm_eval, HFLM


def _convert(task_metrics: dict) -> dict:
    """lm-eval's {"acc,none": x, "acc_stderr,none": y, "alias": ..} -> {"acc": x, "acc_stderr": y}.

    Generation tasks report under a named filter ("exact_match,remove_whitespace", gsm8k's "strict-match"):
    the unfiltered value ("none") wins, else the first filter listed; the filter used is kept in "filters"."""
    out, filters = {}, {}
    for key, value in task_metrics.items():
        metric, _, filt = key.partition(",")
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if metric not in out or (filt in ("none", "") and filters[metric] not in ("none", "")):
            out[metric], filters[metric] = value, filt
    named = {m: f for m, f in filters.items() if f not in ("none", "") and not m.endswith("_stderr")}
    if named:
        out["filters"] = named
    return out


def check_harness_args(tasks: str | None, include_path: str | None) -> None:
    """What `prunepilot eval` checks before loading the model: lm-eval importable, --harness-include a folder."""
    if include_path and not tasks:
        raise PrunepilotError("--harness-include applies to --harness-tasks; give --harness-tasks TASKS")
    require_lm_eval()
    if include_path:
        check_include_path(include_path)


def check_include_path(include_path) -> str:
    """The --harness-include folder as a string; one-line error when it is not a folder holding task YAMLs."""
    from pathlib import Path

    folder = Path(include_path).expanduser()
    if not folder.is_dir():
        raise PrunepilotError(f"--harness-include {include_path} is not a folder")
    if not any(folder.rglob("*.yaml")) and not any(folder.rglob("*.yml")):
        raise PrunepilotError(f"--harness-include {include_path} holds no task .yaml files")
    return str(folder)


def _task_manager(include_path) -> dict:
    """simple_evaluate's task_manager argument for a folder of local task YAMLs ({} without one)."""
    if include_path is None:
        return {}
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise PrunepilotError(INSTALL_HINT) from e
    return {"task_manager": TaskManager(include_path=check_include_path(include_path))}


def run_lm_eval(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 8,
                num_fewshot: int | None = None, device=None, include_path=None) -> dict:
    """Evaluate with lm_eval.simple_evaluate; raises PrunepilotError when lm-eval is missing.

    include_path: a folder of task YAMLs registered with lm-eval's TaskManager (local, offline tasks)."""
    lm_eval, HFLM = _import_lm_eval()
    extra = _task_manager(include_path)
    if getattr(tokenizer, "sp", None) is not None:
        raise PrunepilotError("lm-eval needs a Hugging Face tokenizer; use prunepilot's run_suite for this model")
    kwargs = {"device": str(device)} if device is not None else {}
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **kwargs)
    t0 = time.time()
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot,
                                      log_samples=False, **extra)
    except Exception as e:  # unknown task, data not downloadable offline, ...: one clear line, not a traceback
        raise PrunepilotError(f"lm-eval failed on {', '.join(tasks)}: {type(e).__name__}: {e}") from e
    if not out or "results" not in out:
        raise PrunepilotError(f"lm-eval returned no results for {', '.join(tasks)}")
    seconds = round(time.time() - t0, 2)
    version = getattr(lm_eval, "__version__", "unknown")

    def entry(task: str) -> dict:
        res = _convert(out["results"][task])
        spec = TASKS.get(task)
        scores = [m for m in res if m != "filters" and not m.endswith("_stderr")]
        res["main"] = spec.main if spec and spec.main in res else ("acc" if "acc" in res else next(iter(scores), "acc"))
        res["n"] = out.get("n-samples", {}).get(task, {}).get("effective")
        res["protocol"] = {"harness": f"lm-eval {version}", "limit": limit,
                           "shots": out.get("n-shot", {}).get(task, num_fewshot)}
        if include_path is not None:
            res["protocol"]["include_path"] = str(include_path)
        res["seconds"] = seconds  # simple_evaluate runs all tasks together: total time
        return res

    members = out.get("group_subtasks", {})
    results = {}
    for task in tasks:
        if task not in out["results"]:
            raise PrunepilotError(f"lm-eval returned no result for {task!r} (got {', '.join(out['results'])})")
        res = entry(task)
        subtasks = {sub: entry(sub) for sub in _members(task, members) if sub in out["results"]}
        if subtasks:
            res["subtasks"] = subtasks
        results[f"lm_eval:{task}"] = res
    return results


def _members(group: str, members: dict) -> list[str]:
    """Every task under `group` in lm-eval's "group_subtasks" map, nested groups included."""
    out = []
    for sub in members.get(group, []):
        out += [sub] + _members(sub, members)
    return out
