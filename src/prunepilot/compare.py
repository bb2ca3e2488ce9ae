"""Compare evaluation results of several models: one markdown table and one grouped bar plot.

Result file schema (JSON, one per model; written by bench/eval_dense.py, `prunepilot eval`, or by hand):

    {
      "model": "smollm2-135m-instruct",          # model name or path (required)
      "label": "wanda 50%",                      # optional row label (default: model)
      "results": {                               # optional; run_suite's output, any subset of tasks
        "arc_easy": {"acc": 0.61, "acc_norm": 0.55, "main": "acc", "n": 2376, "protocol": {...}, ...},
        "mmlu": {"acc": 0.27, "n": 14079, ...}
      },
      "perplexity": {                            # optional; one entry per dataset
        "wikitext2": {"ppl": 29.1, "seqlen": 2048, "tokens": 286720}
      }
    }

Other keys are kept but ignored. `prunepilot prune`'s report.json is read too: its "perplexity_after" is
the perplexity section and "method" + "target_sparsity" the default label. A task's score is its "main"
metric when given, else the metric TASKS names for it (acc_norm for ARC-challenge, HellaSwag, OpenBookQA),
else "acc"; a result without that metric shows as "-" (never another metric in its column). Scores are
fractions shown as percentages. The zero-shot average is taken over the zero-shot multiple-choice tasks
present in every file, so each row averages the same tasks. Missing entries show as "-". Results of one
task measured under different protocols (shots, limit, prompt, ...) or perplexities at different seqlens
are flagged under the table.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from .bounded_json import BoundedJsonError, loads_bounded
from .errors import PrunepilotError
from .io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


def _tasks_registry() -> tuple[dict, list[str]]:
    from .eval.suite import TASKS, ZERO_SHOT_MC

    return TASKS, ZERO_SHOT_MC


def results_document(model: str, results: dict | None = None, perplexity: dict | None = None,
                     label: str | None = None, **extra) -> dict:
    """A result file's content in the schema above."""
    doc = {"model": str(model), "label": label or str(model), "results": results or {}, "perplexity": perplexity or {}}
    return {**doc, **extra}


def save_results(path: str | Path, doc: dict) -> Path:
    return atomic_write_json(path, doc)


def load_results(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise PrunepilotError(f"result file not found: {path}")
    try:
        doc = loads_bounded(path.read_bytes())
    except BoundedJsonError as e:
        if str(e) == "not valid JSON":
            try:
                path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise PrunepilotError(f"{path} is not a text file (expected a result JSON from `prunepilot eval "
                                      "--out`)") from None
        raise PrunepilotError(f"{path} is {e}") from None
    if not isinstance(doc, dict) or "model" not in doc:
        raise PrunepilotError(f"{path}: expected a JSON object with a 'model' key (see prunepilot.compare)")
    if not doc.get("perplexity") and isinstance(doc.get("perplexity_after"), dict):  # a `prunepilot prune` report
        doc["perplexity"] = doc["perplexity_after"]
        if not doc.get("label") and "method" in doc and isinstance(doc.get("target_sparsity"), (int, float)):
            doc["label"] = f"{doc['method']} {doc['target_sparsity']:.0%}"
    for section, example in (("results", '{"arc_easy": {"acc": 0.61}}'), ("perplexity", '{"wikitext2": {"ppl": 29.1}}')):
        value = doc.get(section) or {}
        if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
            raise PrunepilotError(f"{path}: '{section}' must map names to objects, e.g. {example}")
        doc[section] = value
    _check_numbers(path, doc)
    if not doc["results"] and not doc["perplexity"]:
        raise PrunepilotError(f"{path} holds no task results and no perplexity to compare (expected 'results' "
                              "or 'perplexity', as `prunepilot eval --out` writes)")
    return doc


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)  # inf: a model pruned to pieces


def _check_numbers(path: Path, doc: dict) -> None:
    """Every perplexity, and every task's main metric, a number (a string in either ended in a traceback
    from the table's number formatting)."""
    for name, entry in doc["perplexity"].items():
        if "ppl" in entry and not _is_number(entry["ppl"]):
            raise PrunepilotError(f"{path}: perplexity.{name}.ppl is {entry['ppl']!r}, not a number")
    tasks, _ = _tasks_registry()
    for task, result in doc["results"].items():
        main = result.get("main")
        if main is not None and not isinstance(main, str):
            raise PrunepilotError(f"{path}: results.{task}.main is {main!r}, not a metric name")
        metric = main or (tasks[task].main if task in tasks else "acc")
        if result.get(metric) is not None and not _is_number(result[metric]):
            raise PrunepilotError(f"{path}: results.{task}.{metric} is {result[metric]!r}, not a number")


def task_score(task: str, result: dict) -> float | None:
    """The fraction a task is reported with (see module docstring), or None when absent."""
    tasks, _ = _tasks_registry()
    metric = result.get("main") or (tasks[task].main if task in tasks else "acc")
    value = result.get(metric)
    return float(value) if isinstance(value, (int, float)) else None


def task_metric_name(task: str, results: list[dict]) -> str:
    tasks, _ = _tasks_registry()
    for r in results:
        if r.get("main"):
            return r["main"]
    return tasks[task].main if task in tasks else "acc"


# ----------------------------------------------------------------------------- table

def _columns(docs: list[dict]) -> tuple[list[str], list[str], list[str]]:
    """(task columns in suite order, zero-shot tasks common to all docs, perplexity datasets)."""
    tasks, zero_shot = _tasks_registry()
    present = {t for d in docs for t in d["results"]}
    ordered = [t for t in tasks if t in present] + sorted(present - set(tasks))
    common = [t for t in zero_shot if all(task_score(t, d["results"].get(t, {})) is not None for d in docs)]
    ppl = sorted({name for d in docs for name in d["perplexity"]})
    return ordered, common, ppl


def zero_shot_average(doc: dict, tasks: list[str]) -> float | None:
    scores = [task_score(t, doc["results"][t]) for t in tasks]
    return sum(scores) / len(scores) if scores else None


def _labels(docs: list[dict], files: list[Path]) -> list[str]:
    labels = [str(d.get("label") or d["model"]) for d in docs]
    return [f"{lab} ({f.stem})" if labels.count(lab) > 1 else lab for lab, f in zip(labels, files)]


def _fmt(x: float | None, scale: float = 100.0) -> str:
    return "-" if x is None else f"{x * scale:.2f}"


def comparison_table(docs: list[dict], labels: list[str]) -> str:
    task_cols, common, ppl_cols = _columns(docs)
    head = ["model"] + [f"{t} ({task_metric_name(t, [d['results'].get(t, {}) for d in docs])})" for t in task_cols]
    head += ["zero-shot avg"] if common else []
    for name in ppl_cols:
        seqlens = {d["perplexity"][name].get("seqlen") for d in docs if name in d["perplexity"]}
        head.append(f"ppl {name}" + (f" (seqlen {seqlens.pop()})" if len(seqlens) == 1 else ""))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for doc, label in zip(docs, labels):
        row = [label] + [_fmt(task_score(t, doc["results"][t]) if t in doc["results"] else None) for t in task_cols]
        row += [_fmt(zero_shot_average(doc, common))] if common else []
        row += [_fmt(doc["perplexity"].get(n, {}).get("ppl"), 1.0) for n in ppl_cols]
        lines.append("| " + " | ".join(row) + " |")
    notes = ["", "Scores in %; task metric in brackets. Perplexity: lower is better."]
    if common:
        notes.append(f"zero-shot avg over: {', '.join(common)}.")
    for t in task_cols:
        ns = {doc["results"][t].get("n") for doc in docs if t in doc["results"]}
        if len(ns) > 1:
            notes.append(f"warning: {t} was evaluated on different numbers of items ({sorted(map(str, ns))}).")
        differ = protocol_differences([doc["results"][t].get("protocol") or {} for doc in docs if t in doc["results"]])
        if differ:
            notes.append(f"warning: {t} was evaluated under different protocols ({', '.join(differ)} differ).")
    for name in ppl_cols:
        runs = [doc["perplexity"][name] for doc in docs if name in doc["perplexity"]]
        differ = [k for k in ("seqlen", "tokens") if len({str(r.get(k)) for r in runs}) > 1]
        if differ:
            notes.append(f"warning: perplexity on {name} was measured with different {' and '.join(differ)}.")
    return "\n".join(lines + notes) + "\n"


def protocol_differences(protocols: list[dict]) -> list[str]:
    """Protocol fields that are not the same in every result; the data file's path is left out (the same file
    lies at different paths on different machines)."""
    keys = sorted({k for p in protocols for k in p} - {"data"})
    return [k for k in keys if len({json.dumps(p.get(k), sort_keys=True, default=str) for p in protocols}) > 1]


# ----------------------------------------------------------------------------- plot

def plot_comparison(docs: list[dict], labels: list[str], path: Path) -> Path:
    """Grouped bars: one group per task (+ zero-shot average), one bar per model. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task_cols, common, _ = _columns(docs)
    groups = task_cols + (["zero-shot avg"] if common else [])
    width = 0.8 / max(len(docs), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(groups) + 2), 4.0))
    for i, (doc, label) in enumerate(zip(docs, labels)):
        values = [task_score(t, doc["results"][t]) if t in doc["results"] else None for t in task_cols]
        values += [zero_shot_average(doc, common)] if common else []
        xs = [g + (i - (len(docs) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [100 * v if v is not None else float("nan") for v in values], width=width, label=label)  # nan: no bar
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right")
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title("evaluation comparison")
    fig.tight_layout()
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def build_comparison(result_files: list[Path], out_dir: Path) -> Path:
    """Write comparison.md and comparison.png for the given result files into out_dir; returns the .md path."""
    if not result_files:
        raise PrunepilotError("no result files to compare")
    files = [Path(f) for f in result_files]
    docs = [load_results(f) for f in files]
    labels = _labels(docs, files)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise PrunepilotError(f"output path {out_dir} exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    md = atomic_write_text(out_dir / "comparison.md", "# Comparison\n\n" + comparison_table(docs, labels))
    if any(d["results"] for d in docs):
        plot_comparison(docs, labels, out_dir / "comparison.png")
    else:
        log.info("no task results in the files: skipping comparison.png")
    return md
