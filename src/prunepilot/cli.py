"""prunepilot command line: prune | eval | agent | methods | report."""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .agent.cli import add_agent_parser
from .errors import PrunepilotError
from .export.cli import add_export_parser, run_export
from .model_store import add_fetch_parser, run_fetch

log = logging.getLogger("prunepilot")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="local model folder (safetensors or GGUF) or a Hugging Face hub name")
    p.add_argument("--gguf-file", help="GGUF file inside the model folder (default: the only one there)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default float32)")


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _add_prune_parser(sub) -> None:
    p = sub.add_parser("prune", help="prune a model and write model + recipe + report.json")
    _add_model_args(p)
    p.add_argument("--recipe", help="YAML recipe; the options below override its values")
    p.add_argument("--method", help="pruning method (see `prunepilot methods`)")
    p.add_argument("--sparsity", type=float, help="fraction of weights (or parameters, structured) to remove")
    p.add_argument("--pattern", help="unstructured (default) or N:M such as 2:4, 4:8")
    p.add_argument("--refine", choices=["none", "dsnot"],
                   help="after an unstructured / N:M method: dsnot swaps pruned and kept weights per row to cut the "
                        "expected output error, keeping the sparsity and N:M pattern (recipe refine_options)")
    p.add_argument("--allocation", choices=["uniform", "owl", "explicit", "evo"],
                   help="per-layer sparsity allocation (evo: evolutionary search, resumable from "
                        "<out>/evo_search.jsonl)")
    p.add_argument("--evo-generations", type=int, help="allocation evo: generations (default 20)")
    p.add_argument("--evo-offspring", type=int, help="allocation evo: offspring per generation (default 8)")
    p.add_argument("--evo-tokens", type=_int_list, metavar="N,N",
                   help="allocation evo: held-out fitness tokens per selection stage (default 256,1024)")
    p.add_argument("--ratios", choices=["global", "uniform"],
                   help="structured: one global ranking across layers (FLAP) or the same ratio in every layer")
    p.add_argument("--steps", type=int, help="iterative structured methods: steps to reach the target (default 5)")
    p.add_argument("--channel-multiple", type=int,
                   help="structured: keep every MLP width a multiple of this (64 or 128 lets GPU matmul kernels "
                        "run at full speed; default 1)")
    p.add_argument("--remove-experts", type=float, metavar="FRACTION",
                   help="structured, MoE models: remove this fraction of each layer's experts first, those the router "
                        "sends the fewest calibration tokens (default 0)")
    p.add_argument("--expert-score", choices=["frequency", "reap"],
                   help="with --remove-experts: rank experts by routed calibration tokens (default) or by REAP "
                        "(mean over routed tokens of gate weight x expert output norm)")
    p.add_argument("--domain-stats", choices=["fused", "pooled"],
                   help="structured, several --calib domains: per-domain channel statistics fused by the source "
                        "weights (the iterative method's default) or one pooled mean/variance (the one-shot ones')")
    p.add_argument("--calib", action="append", metavar="SPEC",
                   help="calibration source, repeatable: preset (wiki, web, code, math), file, folder or "
                        "hf:NAME[,CONFIG][@SPLIT]; optional DOMAIN= prefix, #START:END range, :WEIGHT suffix")
    p.add_argument("--n-samples", type=int, help="calibration samples (default 128)")
    p.add_argument("--seqlen", type=int, help="calibration sequence length (default 2048)")
    p.add_argument("--seed", type=int)
    p.add_argument("--eval", action="append", metavar="DATASET",
                   help="perplexity set(s) to measure before and after (default wikitext2); 'none' to skip")
    p.add_argument("--eval-seqlen", type=int, help="perplexity window (default 2048, or the model's context if "
                                                  "shorter)")
    p.add_argument("--eval-max-windows", type=int, help="score only the first N windows (quick runs)")
    p.add_argument("--out", required=True, help="output folder (model/, recipe.yaml, report.json, sparsity.png)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--no-save-model", action="store_true", help="write only the recipe and report")
    p.add_argument("--offload", choices=["none", "disk"], default="none",
                   help="disk: decoder blocks stay in the safetensors files and are read one at a time (models "
                        "larger than host memory; the per-block methods of `prunepilot methods`)")


def _add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity and zero-shot / MMLU / QA scores of a (pruned) model")
    _add_model_args(p)
    p.add_argument("--ppl", action="append", metavar="DATASET", help="perplexity set(s): wikitext2, c4, ...")
    p.add_argument("--tasks", help="comma-separated tasks (arc_easy,hellaswag,mmlu,...; 'all'); NAME=PATH reads "
                                   "another data file")
    p.add_argument("--harness-tasks", help="comma-separated lm-evaluation-harness tasks run on the loaded model "
                                           "(needs `pip install lm-eval` and the harness's data)")
    p.add_argument("--num-fewshot", type=int, help="shots for --harness-tasks (default: each task's own)")
    p.add_argument("--harness-include", metavar="DIR",
                   help="folder of lm-eval task YAMLs (e.g. over local jsonl files) registered with lm-eval's "
                        "TaskManager, so --harness-tasks can name them and run offline")
    p.add_argument("--data-dir", help="folder laid out like ../shared/data (default: that folder)")
    p.add_argument("--limit", type=int, help="first N items of each task (quick runs)")
    p.add_argument("--batch-size", type=int, default=8, help="requests per forward pass for --tasks / --harness-tasks "
                   "(perplexity runs one window at a time: a batch of full-vocabulary logits can fill memory)")
    p.add_argument("--qa-shots", type=int, default=0,
                   help="answered examples before each TriviaQA/FreebaseQA question (default 0, as lm-eval; small "
                        "models need a few to answer briefly)")
    p.add_argument("--gsm8k-shots", type=int, default=8,
                   help="worked examples before each GSM8K question, the first K of train.jsonl (default 8)")
    p.add_argument("--gsm8k-max-tokens", type=int, default=256,
                   help="GSM8K: new tokens at most per answer (default 256; it also stops at 'Question:')")
    p.add_argument("--checkpoint", metavar="FILE",
                   help="--tasks: append each finished piece (500 items, one MMLU subject) to this JSON-lines file "
                        "and skip the pieces already there for the same model and protocol; rerun the same command "
                        "after an interruption to go on where it stopped")
    p.add_argument("--seqlen", type=int, help="perplexity window (default 2048, or the model's context if shorter)")
    p.add_argument("--max-windows", type=int, help="perplexity: score only the first N windows")
    p.add_argument("--speed", action="store_true",
                   help="also measure prefill / decode tokens per second (batch 1, 128-token prompt, 32 new tokens)")
    p.add_argument("--semi-structured", action="store_true",
                   help="with --speed: convert 2:4-pruned linears to torch's semi-structured sparse format first "
                        "(CUDA GPU, float16/bfloat16 only)")
    p.add_argument("--label", help="name of this model in comparison reports")
    p.add_argument("--out", help="write results JSON here")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunepilot", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_prune_parser(sub)
    _add_eval_parser(sub)
    sub.add_parser("methods", help="list pruning methods")

    p = sub.add_parser("report", help="compare several result JSONs in one markdown table + plot")
    p.add_argument("results", nargs="+", help="result JSON files (from `prunepilot eval --out`)")
    p.add_argument("--out", required=True, help="output folder")
    add_agent_parser(sub)
    add_export_parser(sub)
    add_fetch_parser(sub)
    return parser


def _recipe_from_args(args):
    """The recipe file's own mapping with the flags the user gave on top. Only what the user states is set:
    unset fields keep their method-dependent defaults (flap_iterative calibrates on wiki+web+code+math at
    seqlen 128, wanda_sp uses uniform ratios ...)."""
    from .recipe import Recipe
    from .schema import load_yaml_mapping
    from .structured.options import IterativeOptions

    data = (load_yaml_mapping(args.recipe, "recipe") or {}) if args.recipe else {}
    flags = {
        (): {"method": args.method, "sparsity": args.sparsity, "pattern": args.pattern, "device": args.device,
             "dtype": args.dtype, "refine": args.refine},
        ("allocation",): {"kind": args.allocation},
        ("allocation", "evo"): {"generations": args.evo_generations, "offspring": args.evo_offspring,
                                "tokens": args.evo_tokens},
        # every structured option with a flag of its name (--channel-multiple: channel_multiple)
        ("structured",): {name: getattr(args, name, None) for name in IterativeOptions.model_fields},
        ("calibration",): {"sources": args.calib, "n_samples": args.n_samples, "seqlen": args.seqlen,
                           "seed": args.seed},
        ("evaluation",): {"datasets": ([] if args.eval == ["none"] else args.eval),
                          "seqlen": args.eval_seqlen, "max_windows": args.eval_max_windows},
    }
    for path, values in flags.items():
        values = {k: v for k, v in values.items() if v is not None}
        if not values:
            continue
        section = data
        for key in path:
            if not isinstance(section.get(key, {}), dict):
                raise PrunepilotError(f"recipe: {key} must be a mapping")
            section = section.setdefault(key, {})
        section.update(values)
    return Recipe.from_dict(data)


def _ppl_all(model, tokenizer, datasets, seqlen, max_windows, batch_size=1, device=None) -> dict:
    from .eval.perplexity import perplexity

    return {d: perplexity(model, tokenizer, d, seqlen, batch_size, max_windows, device) for d in datasets}


def _load_for_prune(args, recipe, device, scratch: Path | None):
    """(model, tokenizer): in memory on `device`, or (scratch given: --offload disk) with its blocks left in the
    files, changed blocks written to `scratch` until the model is saved."""
    from .modeling import load_model_and_tokenizer, load_tokenizer

    if scratch is None:
        return load_model_and_tokenizer(args.model, recipe.dtype, str(device), args.gguf_file)
    from .engine import ModelAdapter
    from .engine.offload import load_offloaded
    from .guarded_reader import check_model_input
    from .modelfiles import parse_dtype
    from .registry import PER_BLOCK, get_spec, method_names
    from .structured.saving import WIDTHS_FILE

    if get_spec(recipe.method).pipeline is not PER_BLOCK:
        raise PrunepilotError(f"--offload disk works with the per-block methods ({method_names(PER_BLOCK)}); "
                              f"{recipe.method} resizes the model and needs it in memory")
    if not Path(args.model).is_dir() or args.gguf_file:
        raise PrunepilotError("--offload disk needs a local folder of safetensors weights (no hub name, no GGUF)")
    if (Path(args.model) / WIDTHS_FILE).exists():
        raise PrunepilotError(f"{args.model} holds a structurally pruned model (per-layer widths): --offload disk "
                              "needs a checkpoint its config describes")
    check_model_input(args.model)  # the same guarded reader as the in-memory load
    model = load_offloaded(args.model, parse_dtype(recipe.dtype), lambda m: ModelAdapter(m).block_path, scratch)
    return model, load_tokenizer(args.model)


def cmd_prune(args) -> int:
    from .io import check_output_location, remove_stale, stale_prefix

    out = check_output_location(args.out)  # before any work: an unwritable --out lost the pruned model
    if out.is_dir() and any(out.iterdir()) and not (args.overwrite or _only_search_log(out)):  # evo resumes
        raise PrunepilotError(f"output folder {out} is not empty; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise PrunepilotError(f"output path {out} exists and is not a folder")
    if args.offload != "disk":
        return _prune_command(args, None)
    parent = out.parent  # changed blocks wait next to the output (as large as the model)
    created = not parent.exists()
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale(parent, out.name, ("offload",))  # scratch of an interrupted run into the same --out
    scratch = Path(tempfile.mkdtemp(prefix=stale_prefix(out.name, "offload"), dir=parent))
    try:
        return _prune_command(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if created and not any(parent.iterdir()):  # a refused run leaves no folder behind
            parent.rmdir()


SEARCH_LOG = "evo_search.jsonl"


def _with_search_log(recipe, out: Path):
    """allocation evo: the search logs its generations to <out>/evo_search.jsonl unless the recipe names a log;
    an output folder holding only that log is a search to resume. Returns (recipe, resuming)."""
    if recipe.allocation.kind != "evo":
        return recipe, False
    if recipe.allocation.evo.log is None:
        data = recipe.model_dump(exclude_unset=True)
        data.setdefault("allocation", {}).setdefault("evo", {})["log"] = str(out / SEARCH_LOG)
        recipe = type(recipe).from_dict(data)
    return recipe, _only_search_log(out)


def _only_search_log(out: Path) -> bool:
    return out.is_dir() and [p.name for p in out.iterdir()] == [SEARCH_LOG]


def _prune_command(args, scratch: Path | None) -> int:
    from . import distributed
    from .api import prune
    from .engine import resolve_device
    from .engine.model_config import context_length
    from .recipe_fit import check_model_applies, check_recipe_applies
    from .registry import build_refiner, get_spec
    from .report import environment, save_result

    recipe = _recipe_from_args(args)
    get_spec(recipe.method).build_for(recipe)  # fail fast on a bad method name or option
    check_recipe_applies(recipe)  # options the method would ignore
    build_refiner(recipe)
    out = Path(args.out)
    stated = recipe  # saved as recipe.yaml: without the search log path, which belongs to this output folder
    recipe, _ = _with_search_log(recipe, out)  # cmd_prune let a folder holding only the search log through
    device = resolve_device(distributed.local_device(recipe.device))  # torchrun + CUDA: this rank's GPU
    t0 = time.time()
    model, tokenizer = _load_for_prune(args, recipe, device, scratch)
    load_s = time.time() - t0
    check_model_applies(recipe, model)
    ev = recipe.evaluation
    if ev.datasets and ev.seqlen and ev.seqlen > context_length(model):  # fail before pruning, not after
        raise PrunepilotError(f"evaluation seqlen {ev.seqlen} exceeds the model's context of "
                              f"{context_length(model)} tokens; pass a shorter --eval-seqlen")
    ppl_device = device if scratch is not None else None  # offloaded: blocks go to the compute device one at a time
    before = _ppl_all(model, tokenizer, ev.datasets, ev.seqlen, ev.max_windows, ev.batch_size,
                      ppl_device) if ev.before else {}
    n_params_before = sum(p.numel() for p in model.parameters())
    report = prune(model, recipe, tokenizer)
    after = _ppl_all(model, tokenizer, ev.datasets, ev.seqlen, ev.max_windows, ev.batch_size, ppl_device)
    result = {"model": args.model, "environment": environment(device), **report.to_dict(),
              "parameters_before": n_params_before,
              "parameters_after": sum(p.numel() for p in model.parameters()),
              "perplexity_before": before, "perplexity_after": after}
    result["timings"]["load_s"] = load_s
    result["distributed"] = distributed.summary(report.calibration.get("n_samples", 0))
    if not distributed.is_main():  # every rank holds the same pruned model; rank 0 writes it
        return 0
    save_result(model, tokenizer, out, stated, result, overwrite=args.overwrite or _only_search_log(out),
                save_model=not args.no_save_model, carry=[SEARCH_LOG] if recipe.allocation.kind == "evo" else [])
    for d in ev.datasets:
        b = f"{before[d]['ppl']:.3f} -> " if d in before else ""
        log.info("%s perplexity (seqlen %d, %d tokens): %s%.3f", d, after[d]["seqlen"], after[d]["tokens"], b,
                 after[d]["ppl"])
    print(json.dumps({"out": str(out), "global_sparsity": round(report.global_sparsity, 4),
                      "perplexity_after": {d: round(v["ppl"], 3) for d, v in after.items()}}))
    return 0


def _eval_preflight(args, device, dtype: str) -> None:
    """Checks of cmd_eval that need no model: lm-eval importable, --harness-include a folder of task YAMLs,
    --semi-structured only with --speed on a CUDA device in float16/bfloat16."""
    if args.harness_tasks or args.harness_include:
        from .eval.lm_eval_adapter import check_harness_args

        check_harness_args(args.harness_tasks, args.harness_include)
    if args.semi_structured:
        from .eval.semi_structured import check_semi_structured_args

        check_semi_structured_args(args.speed, device, dtype)


def _check_window_args(args) -> None:
    for flag, value, least in (("--seqlen", args.seqlen, 2), ("--max-windows", args.max_windows, 1)):
        if value is not None and value < least:  # 0 would otherwise read as "unset"
            raise PrunepilotError(f"{flag} must be >= {least}, got {value}")


def _check_eval_outputs(args) -> None:
    """--out and --checkpoint: files that can be written (checked before the model is loaded)."""
    from .io import check_output_location

    if args.checkpoint and not args.tasks:
        raise PrunepilotError("--checkpoint applies to --tasks; give --tasks TASKS")
    for flag, path in (("--out", args.out), ("--checkpoint", args.checkpoint)):
        if path and Path(path).is_dir():
            raise PrunepilotError(f"{flag} {path} is a folder; give a file path")
        if path:
            check_output_location(path, flag)


def _check_eval_args(args) -> None:
    """What cmd_eval can refuse before loading anything."""
    if not (args.ppl or args.tasks or args.harness_tasks or args.speed):
        raise PrunepilotError("nothing to evaluate: give --ppl DATASET, --tasks TASKS, --harness-tasks TASKS "
                              "and/or --speed")
    _check_window_args(args)
    _check_eval_outputs(args)
    if args.gsm8k_shots < 0 or args.gsm8k_max_tokens < 1:
        raise PrunepilotError(f"--gsm8k-shots must be >= 0 and --gsm8k-max-tokens >= 1, got {args.gsm8k_shots} and "
                              f"{args.gsm8k_max_tokens}")


def cmd_eval(args) -> int:
    from .data import data_root
    from .engine import resolve_device
    from .io import atomic_write_json
    from .modeling import load_model_and_tokenizer

    _check_eval_args(args)
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]  # "all" is expanded by run_suite
    data_dir = Path(args.data_dir) if args.data_dir else data_root()
    if args.tasks:
        from .eval.suite import resolve_tasks

        resolve_tasks(tasks, data_dir)  # a typo or a missing file fails before loading the model
    device = resolve_device(args.device)
    dtype = args.dtype or "float32"
    _eval_preflight(args, device, dtype)  # lm-eval, --harness-include, --semi-structured: before loading the model
    model, tokenizer = load_model_and_tokenizer(args.model, dtype, str(device), args.gguf_file)
    from .report import environment

    result = {"model": args.model, "label": args.label or Path(args.model).name, "dtype": dtype,
              "environment": environment(device), "results": {}, "perplexity": {}}

    def save():  # after every stage, so a later failure keeps what is finished
        if args.out:
            atomic_write_json(args.out, result)

    if args.ppl:
        result["perplexity"] = _ppl_all(model, tokenizer, args.ppl, args.seqlen, args.max_windows)
        save()
    if args.tasks:
        from .eval.suite import run_suite

        result["results"] = run_suite(model, tokenizer, tasks, data_dir, limit=args.limit, batch_size=args.batch_size,
                                      device=device, qa_shots=args.qa_shots, checkpoint=args.checkpoint,
                                      gsm8k_shots=args.gsm8k_shots, gsm8k_max_tokens=args.gsm8k_max_tokens)
        save()
    if args.harness_tasks:
        from .eval.lm_eval_adapter import run_lm_eval

        harness = [t.strip() for t in args.harness_tasks.split(",") if t.strip()]
        result["results"].update(run_lm_eval(model, tokenizer, harness, limit=args.limit, batch_size=args.batch_size,
                                             num_fewshot=args.num_fewshot, device=device,
                                             include_path=args.harness_include))
        save()
    if args.speed:
        from .eval.semi_structured import to_semi_structured
        from .eval.speed import measure_speed

        if args.semi_structured:  # 2:4 linears as torch semi-structured sparse tensors (CUDA, fp16/bf16: checked)
            result["semi_structured"] = to_semi_structured(model)
        result["speed"] = measure_speed(model)
        save()
    print(json.dumps(result, indent=2, default=str))
    return 0


def cmd_methods(args) -> int:
    from .registry import available

    for name, spec in available().items():
        print(f"{name:16s} {spec.pipeline.name:13s} {spec.summary}")
    return 0


def cmd_report(args) -> int:
    for r in args.results:
        if not Path(r).is_file():
            raise PrunepilotError(f"result file {r} does not exist")
    from .compare import build_comparison
    from .io import check_output_location

    check_output_location(args.out)

    path = build_comparison([Path(r) for r in args.results], Path(args.out))
    print(path.read_text() if path.suffix == ".md" else path)
    return 0


COMMANDS = {"prune": cmd_prune, "eval": cmd_eval, "methods": cmd_methods, "report": cmd_report, "export": run_export,
            "fetch-model": run_fetch}


def _join_torchrun(args) -> None:
    """Under torchrun (WORLD_SIZE > 1) `prune` and `agent` split their calibration samples over the processes
    (distributed.py); the other commands run in one process."""
    if "WORLD_SIZE" not in os.environ:  # (distributed imports torch: not for a plain run)
        return
    from . import distributed

    if distributed.env_world_size() <= 1:  # a bad WORLD_SIZE: one line
        return
    if args.command not in ("prune", "agent"):
        raise PrunepilotError(f"`prunepilot {args.command}` does not run under torchrun; run it as one process "
                              "(`prune` and `agent` split calibration over processes)")
    import torch

    distributed.init_from_env("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        _join_torchrun(args)
        if args.command == "agent":
            from .agent.cli import run_agent_command

            return run_agent_command(args)
        return COMMANDS[args.command](args)
    except PrunepilotError as e:
        rank = os.environ.get("RANK") if os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1") else None
        print(f"prunepilot: error: {f'[rank {rank}] ' if rank else ''}{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prunepilot: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
