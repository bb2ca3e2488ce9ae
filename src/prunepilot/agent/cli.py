"""`prunepilot agent MODEL --target 0.5 --controller builtin|openai|hf --out DIR [--resume] ...`

Wiring (prunepilot.cli): ``add_agent_parser(subparsers)`` registers the sub-command (dest command =
"agent"); ``run_agent_command(args) -> int`` runs it. User errors raise PrunepilotError.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ..errors import PrunepilotError

log = logging.getLogger(__name__)


def add_agent_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "agent", help="agent-guided adaptive pruning (controller decides per-layer sparsity, rollback on ppl rise)",
        description="Iteratively prune MODEL towards --target global sparsity; a controller (built-in policy, "
                    "OpenAI-compatible endpoint, or local HF chat model) picks per-layer extra sparsity from a "
                    "z-scored sensitivity profile; steps that raise held-out perplexity too much are rolled back. "
                    "Writes journal.jsonl, report.json, trajectory.png and model/ into --out.")
    p.add_argument("model", help="local model folder (safetensors or GGUF) or a Hugging Face hub name")
    p.add_argument("--out", required=True, help="output folder (journal.jsonl, report.json, trajectory.png, model/)")
    p.add_argument("--config", help="agent.yaml (AgentConfig); the options below override its values (with "
                                    "--resume the default is the run's own --out/agent.yaml)")
    p.add_argument("--target", type=float, help="target global sparsity of the prunable linears (default 0.5)")
    _add_controller_args(p)
    p.add_argument("--resume", action="store_true", help="continue the run journaled in --out")
    p.add_argument("--max-iterations", type=int)
    p.add_argument("--allow-short", action="store_true",
                   help="accept a run that ends below the target (default: it is reported as an error, exit 3, "
                        "and a controller's early stop is overruled by the built-in policy)")
    p.add_argument("--no-pace", action="store_true",
                   help="apply the controller's steps as asked (default: scaled up to the pace that reaches the "
                        "target within --max-iterations)")
    p.add_argument("--pace-reserve", type=float,
                   help="share of the iterations left that the pace keeps for retries after rollbacks (0.2)")
    p.add_argument("--rollback-threshold", type=float, help="relative held-out ppl rise that undoes a step (0.15)")
    p.add_argument("--max-total-ppl-rise", type=float,
                   help="also undo a step that leaves held-out ppl more than this fraction above the dense baseline")
    p.add_argument("--calib", action="append", metavar="SPEC", help="calibration source, repeatable (default web)")
    p.add_argument("--n-samples", type=int, help="calibration samples (default 32)")
    p.add_argument("--seqlen", type=int, help="calibration sequence length (default 512)")
    p.add_argument("--eval-tokens", type=int, help="held-out token budget for the rollback check (default 8192)")
    p.add_argument("--eval-seqlen", type=int, help="held-out perplexity window (default 512)")
    p.add_argument("--grad-refresh", type=int, help="recompute gradients every K accepted steps (0: once)")
    p.add_argument("--grad-samples", type=int, help="samples for gradient importance (0: no gradients)")
    p.add_argument("--grad-mode", choices=["full", "blockwise"], help="full backward, or one block at a time")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    p.add_argument("--gguf-file", help="GGUF file inside the model folder")
    p.add_argument("--no-save-model", action="store_true", help="write journal and report only")
    p.add_argument("--ppl", action="append", metavar="DATASET",
                   help="also report perplexity on DATASET (wikitext2, c4, ...) before and after, repeatable")
    p.add_argument("--ppl-seqlen", type=int, help="window for --ppl (default 2048, or the model's context if shorter)")
    p.add_argument("--ppl-max-windows", type=int, help="score only the first N windows")
    return p


def _add_controller_args(p: argparse.ArgumentParser) -> None:
    """Who decides, and how an LLM controller is asked."""
    p.add_argument("--controller", choices=["builtin", "openai", "hf", "plan"],
                   help="who decides (default builtin); plan: a fixed allocation (--plan) through the same loop")
    p.add_argument("--plan", choices=["uniform", "owl", "evo"],
                   help="controller plan: the allocation it follows (evo: searched, KL on the held-out tokens)")
    p.add_argument("--base-url", help="openai: endpoint base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model-name", help="openai: served model name; hf: chat model folder or hub name")
    p.add_argument("--api-key-env", help="openai: NAME of the env var holding the API key (default OPENAI_API_KEY)")
    p.add_argument("--timeout", type=float,
                   help="openai: wall-clock limit of one decision in seconds, every retry included (default 60)")
    p.add_argument("--retries", type=int, help="openai: extra attempts on transport errors (default 2)")
    p.add_argument("--max-tokens", type=int, help="openai/hf: most tokens of one answer (default 4096)")
    p.add_argument("--table-rows", type=int, help="openai/hf: show only the N least sensitive layers (small contexts)")
    p.add_argument("--history-chars", type=int, help="openai/hf: character budget of the decision history (3000)")
    p.add_argument("--max-layers-per-reply", type=int,
                   help="openai/hf: at most N layers per answer (schema maxItems; helps small models)")
    p.add_argument("--reasoning-chars", type=int, help="openai/hf: schema maxLength of the reasoning")
    p.add_argument("--granularity", choices=["linear", "block"],
                   help="openai/hf: the controller names linears (default) or decoder blocks (all its linears alike)")
    p.add_argument("--strict-controller", action="store_true",
                   help="unreachable endpoint or invalid answers are an error (default: fall back to builtin)")


def config_from_args(args):
    from .config import AgentConfig

    saved = Path(args.out) / "agent.yaml"
    base = args.config or (saved if args.resume and saved.is_file() else None)  # resume: the run's own settings
    data = AgentConfig.from_yaml(base).model_dump() if base else AgentConfig().model_dump()
    top = {"target_sparsity": args.target, "max_iterations": args.max_iterations,
           "rollback_threshold": args.rollback_threshold, "max_total_ppl_rise": args.max_total_ppl_rise,
           "eval_tokens": args.eval_tokens,
           "eval_seqlen": args.eval_seqlen, "grad_refresh_every": args.grad_refresh,
           "grad_samples": args.grad_samples, "grad_mode": args.grad_mode, "seed": args.seed, "device": args.device,
           "pace_reserve": args.pace_reserve}
    ctl = {"kind": args.controller, "plan": args.plan, "base_url": args.base_url, "model_name": args.model_name,
           "api_key_env": args.api_key_env, "timeout_s": args.timeout, "retries": args.retries,
           "max_tokens": args.max_tokens, "table_rows": args.table_rows, "history_chars": args.history_chars,
           "max_layers_per_reply": args.max_layers_per_reply, "reasoning_chars": args.reasoning_chars,
           "granularity": args.granularity}
    cal = {"sources": args.calib, "n_samples": args.n_samples, "seqlen": args.seqlen}
    for section, values in ((data, top), (data["controller"], ctl), (data["calibration"], cal)):
        section.update({k: v for k, v in values.items() if v is not None})
    if args.strict_controller:
        data["controller"]["strict"] = True
    if args.no_save_model:
        data["save_model"] = False
    if args.allow_short:
        data["allow_short"] = True
    if args.no_pace:
        data["pace"] = False
    return AgentConfig.from_dict(data)


def run_agent_command(args) -> int:
    from .. import distributed
    from ..eval.perplexity import perplexity
    from ..io import atomic_write_json, check_output_location
    from ..modeling import load_model_and_tokenizer
    from .controllers import make_controller
    from .loop import run_agent

    cfg = config_from_args(args)
    if cfg.controller.kind in ("openai", "hf"):
        make_controller(cfg)  # fail fast on a missing --base-url / --model-name (loads nothing)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise PrunepilotError(f"output path {out} exists and is not a folder")
    check_output_location(out)  # before any work
    if (out / "journal.jsonl").exists() and not args.resume:
        raise PrunepilotError(f"{out / 'journal.jsonl'} exists: pass --resume to continue it or choose another --out")
    if args.resume and not (out / "journal.jsonl").exists():
        raise PrunepilotError(f"nothing to resume: {out / 'journal.jsonl'} does not exist (drop --resume to start a "
                              "new run there)")
    if args.resume:  # a damaged or tampered journal is refused before the model is loaded
        from .journal import Journal

        Journal(out / "journal.jsonl").read()
    model, tokenizer = load_model_and_tokenizer(args.model, args.dtype, "cpu", args.gguf_file)
    before = {}
    if args.ppl:
        before = {d: perplexity(model, tokenizer, d, args.ppl_seqlen, max_windows=args.ppl_max_windows)
                  for d in args.ppl}
    result = run_agent(model, tokenizer, cfg, out, resume=args.resume)
    report = result.report
    if args.ppl:
        after = {d: perplexity(model, tokenizer, d, args.ppl_seqlen, max_windows=args.ppl_max_windows)
                 for d in args.ppl}
        report.update(perplexity_before=before, perplexity_after=after)
        if distributed.is_main():
            atomic_write_json(out / "report.json", report)
        for d in args.ppl:
            log.info("%s perplexity (seqlen %d, %d tokens): %.3f -> %.3f", d, after[d]["seqlen"], after[d]["tokens"],
                     before[d]["ppl"], after[d]["ppl"])
    summary = {"out": str(out), "stop_reason": result.stop_reason, "target_reached": result.target_reached,
               "global_sparsity": round(result.global_sparsity, 4),
               "iterations": result.iterations, "rollbacks": result.rollbacks,
               "held_out_ppl": [round(result.baseline_ppl, 3), round(result.final_ppl, 3)]}
    if args.ppl:
        summary["perplexity_after"] = {d: round(v["ppl"], 3) for d, v in report["perplexity_after"].items()}
    if distributed.is_main():
        print(json.dumps(summary))
    return _short_of_target(result, cfg)


def _short_of_target(result, cfg) -> int:
    """0, or 3 with one line when the run ended below its target and the user did not allow it."""
    if result.target_reached or cfg.allow_short:
        return 0
    from .. import distributed

    if distributed.is_main():
        print(f"prunepilot: error: the run ended at global sparsity {result.global_sparsity:.4f}, short of the target "
              f"{cfg.target_sparsity:.4f} ({result.stop_reason}, {result.iterations} iterations, {result.rollbacks} "
              f"rollbacks); journal, report and model are in {result.out_dir}: --resume with a larger "
              "--max-iterations goes on, --allow-short accepts it", file=sys.stderr)
    return 3
