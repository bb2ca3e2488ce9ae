"""Evaluate a dense model on every task of the suite; print a markdown table and write a result JSON.

    python bench/eval_dense.py --limit 200 --out runs/dense_smollm2.json

--limit N keeps the first N items of each task; for MMLU, the first ceil(N / 57) questions of each subject
(about N questions, all subjects). Besides the score, the table gives each task's time and an estimate of
the time for the full set on this machine: linear in items for most tasks; for MMLU the shared 5-shot
prefixes (run once per subject whatever the limit) are counted once and only the per-question tokens scale.
The JSON follows prunepilot.compare's schema (`prunepilot report a.json b.json --out DIR`).
"""
from __future__ import annotations

import argparse
import logging
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from prunepilot.compare import load_results, results_document, save_results  # noqa: E402
from prunepilot.eval.suite import DEFAULT_TASKS, resolve_tasks, run_suite  # noqa: E402
from prunepilot.modeling import load_model_and_tokenizer  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO.parent / "shared" / "models" / "smollm2-135m-instruct"))
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--tasks", default="all", help="comma-separated task names (NAME=PATH to override a file) or 'all'")
    p.add_argument("--limit", type=int, default=None, help="first N items of each task (MMLU: ~N over all subjects)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-fewshot-mmlu", type=int, default=5)
    p.add_argument("--qa-shots", type=int, default=5,
                   help="TriviaQA shots (the file's last K items; 0 = lm-eval's protocol, where a 135M model scores 0)")
    p.add_argument("--add-bos", action="store_true", help="prepend BOS to prompts (lm-eval default: no)")
    p.add_argument("--table", nargs="+", type=Path, metavar="JSON",
                   help="print the table of finished result files (e.g. runs split over several --out files) "
                        "and exit; no model is loaded")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default=None)
    p.add_argument("--label", default="dense")
    p.add_argument("--out", type=Path, default=None, help="result JSON (compare.py schema)")
    p.add_argument("--resume", action="store_true",
                   help="keep the tasks already in --out (same model, limit, shots and BOS) and run only the rest; "
                        "within a task, finished pieces (500 items, one MMLU subject) are kept in OUT.units.jsonl; "
                        "full sets take hours on a CPU, so a long run can be split over several invocations")
    return p.parse_args()


def previous_results(args: argparse.Namespace) -> dict:
    """Finished tasks from an earlier run's --out, if it evaluated the same model with the same protocol."""
    if args.out is None:
        sys.exit("eval_dense: --resume needs --out")
    if not args.out.exists():
        return {}
    doc = load_results(args.out)
    if doc["model"] != Path(args.model).name or doc.get("limit") != args.limit:
        sys.exit(f"eval_dense: {args.out} holds model {doc['model']!r} with limit {doc.get('limit')}; "
                 f"not resuming a run with a different model or limit")
    shots = {"mmlu": args.num_fewshot_mmlu, "triviaqa": args.qa_shots}
    return {t: r for t, r in doc["results"].items()
            if r.get("protocol", {}).get("add_bos") == args.add_bos
            and (t not in shots or r.get("protocol", {}).get("shots", 0) == shots[t])}


def units_file(out: Path) -> Path:
    """Where --resume keeps the finished pieces of unfinished tasks (see prunepilot.eval.checkpoint)."""
    return out.with_name(out.name + ".units.jsonl")


def full_set_seconds(res: dict) -> float:
    """Estimated seconds for the whole data set (see module docstring)."""
    n, n_total, secs = res["n"], res["protocol"]["n_total"], res["seconds"]
    tokens = res.get("tokens", {})
    if "prefix_tokens" in tokens and res["protocol"].get("shots"):
        per_token = secs / max(tokens["prefix_tokens"] + tokens["rest_tokens"], 1)
        return per_token * (tokens["prefix_tokens"] + tokens["rest_tokens"] * n_total / n)
    return secs / n * n_total


def protocol_text(res: dict) -> str:
    proto = res["protocol"]
    kind = {"acc": "loglik", "acc_norm": "loglik"}.get(res["main"], res["main"])
    if "letter" in proto.get("scoring", ""):
        kind = "letter log-prob"
    elif "greedy" in proto.get("scoring", ""):
        kind = "greedy EM"
    return f"{proto.get('shots', 0)}-shot {kind}"


def print_table(results: dict, sources: dict | None = None) -> float:
    """The markdown table of `results` (with each task's file when `sources` is given); returns the estimated
    seconds for the full sets."""
    extra = " file |" if sources else ""
    print("\n| task | metric | score (%) | n | n (full set) | protocol | seconds | est. full set (min) |" + extra)
    print("|---|---|---|---|---|---|---|---|" + ("---|" if sources else ""))
    full_total = 0.0
    for name, r in results.items():
        full = full_set_seconds(r)
        full_total += full
        print(f"| {name} | {r['main']} | {100 * r[r['main']]:.2f} | {r['n']} | {r['protocol']['n_total']} | "
              f"{protocol_text(r)} | {r['seconds']:.1f} | {full / 60:.1f} |" + (f" `{sources[name]}` |" if sources else ""))
    if "mmlu" in results:
        cats = results["mmlu"]["categories"]
        print("\nMMLU by category: " + ", ".join(f"{c} {100 * v['acc']:.1f}% (n={v['n']})" for c, v in cats.items())
              + f"; subject average {100 * results['mmlu']['acc_subject_avg']:.2f}%")
    return full_total


def table_of_files(files: list[Path]) -> None:
    """One table over several result files (a task found in two files is taken from the last one given)."""
    results, sources = {}, {}
    for f in files:
        for name, r in load_results(f)["results"].items():
            results[name], sources[name] = r, f
    order = [t for t in DEFAULT_TASKS if t in results] + [t for t in results if t not in DEFAULT_TASKS]
    total = print_table({t: results[t] for t in order}, sources)
    print(f"\ntotal: {sum(r['seconds'] for r in results.values()) / 3600:.2f} h evaluating "
          f"(full sets estimated at {total / 3600:.2f} h)")


def main() -> None:
    args = parse_args()
    if args.table:
        table_of_files(args.table)
        return
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = DEFAULT_TASKS if args.tasks == "all" else args.tasks.split(",")
    resolve_tasks(tasks, args.data)  # fail on a bad task or a missing file before loading the model

    results: dict = previous_results(args) if args.resume else {}
    if results:
        print(f"resuming: {', '.join(results)} already in {args.out}", flush=True)

    t_start = time.time()
    model, tok = load_model_and_tokenizer(args.model, device=args.device or "cpu")
    load_s = time.time() - t_start
    print(f"model {args.model} loaded in {load_s:.1f}s; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}", flush=True)

    for task in tasks:
        name, _, override = task.partition("=")  # NAME=PATH: done when the same file was scored
        if name in results and (not override or results[name].get("protocol", {}).get("data") ==
                                str(Path(override).expanduser())):
            continue
        res = run_suite(model, tok, [task], args.data, limit=args.limit, batch_size=args.batch_size,
                        device=args.device, num_fewshot_mmlu=args.num_fewshot_mmlu, add_bos=args.add_bos,
                        qa_shots=args.qa_shots, checkpoint=units_file(args.out) if args.resume else None)
        name, r = next(iter(res.items()))
        results[name] = r
        print(f"  {name}: {r['main']}={r[r['main']]:.4f} n={r['n']} in {r['seconds']:.1f}s", flush=True)
        if args.out:  # partial results survive an interrupted run
            save_results(args.out, results_document(Path(args.model).name, results, label=args.label,
                                                    limit=args.limit, batch_size=args.batch_size))
    eval_s = sum(r["seconds"] for r in results.values())

    full_total = print_table(results)
    print(f"\ntotal: {eval_s:.1f}s evaluating + {load_s:.1f}s loading = {time.time() - t_start:.1f}s wall; "
          f"full sets estimated at {full_total / 3600:.2f} h on this machine")
    if args.out:
        doc = results_document(Path(args.model).name, results, label=args.label, limit=args.limit,
                               batch_size=args.batch_size, threads=torch.get_num_threads(),
                               seconds={"load": round(load_s, 1), "eval": round(eval_s, 1)})
        print(f"wrote {save_results(args.out, doc)}")


if __name__ == "__main__":
    main()
