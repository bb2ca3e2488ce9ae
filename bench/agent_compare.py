"""Agent-guided adaptive pruning vs uniform Wanda, OWL and N:M magnitude on SmolLM2-135M.

At each target sparsity (default 0.45 and 0.50): uniform Wanda, OWL (Wanda + outlier-weighted block
allocation), and the agent loop with the built-in policy; plus 2:4 and 4:8 magnitude (50% by
construction). Every method starts from the same dense model and uses the same calibration windows
(C4 docs 0-149, the "web" preset, minus the tail the agent holds out for its rollback check).
Evaluation: WikiText-2 test perplexity (rows joined with "\\n\\n", non-overlapping windows), the first
--max-windows windows of --eval-seqlen tokens; with --tasks, the evaluation suite on the first --limit items
of each task (MMLU: about --limit questions over all 57 subjects, 5-shot), and the zero-shot average over the
multiple-choice tasks given.

    python bench/agent_compare.py --tasks zeroshot,triviaqa,mmlu --limit 100 --out docs/bench/agent.md
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time

import torch

from common import Snapshot, machine, md_table, publish, smollm2_path

from prunepilot.agent import AgentConfig, run_agent
from prunepilot.api import prune
from prunepilot.data import calibration_split
from prunepilot.eval.perplexity import perplexity
from prunepilot.modeling import load_model_and_tokenizer


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=smollm2_path())
    ap.add_argument("--sparsities", default="0.45,0.5")
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=24, help="WikiText-2 windows per eval (0 = all)")
    ap.add_argument("--agent-eval-tokens", type=int, default=4096, help="held-out tokens for the rollback check")
    ap.add_argument("--agent-grad-samples", type=int, default=4)
    ap.add_argument("--max-iterations", type=int, default=30)
    ap.add_argument("--tasks", help="comma-separated eval-suite tasks (arc_easy,piqa,mmlu ...; 'zeroshot' = the 7 "
                                    "zero-shot multiple-choice tasks), optional")
    ap.add_argument("--limit", type=int, default=100, help="items per task for --tasks")
    ap.add_argument("--qa-shots", type=int, default=5, help="TriviaQA shots (a 135M model answers nothing 0-shot)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--skip", default="", help="comma-separated rows to skip: dense,wanda,owl,agent,nm (rows of one code version "
                    "can be run in separate invocations and their tables joined)")
    ap.add_argument("--nm-patterns", default="2:4,4:8", help="N:M patterns of the magnitude baseline rows")
    ap.add_argument("--out")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("prunepilot.agent").setLevel(logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    skip = set(filter(None, args.skip.split(",")))
    from prunepilot.data import data_root
    from prunepilot.eval.suite import ZERO_SHOT_MC, run_suite

    tasks = []
    for t in (args.tasks.split(",") if args.tasks else []):
        tasks += ZERO_SHOT_MC if t.strip() == "zeroshot" else [t.strip()]
    mc_tasks = [t for t in tasks if t in ZERO_SHOT_MC]
    columns = tasks + (["zero-shot avg"] if mc_tasks else [])

    t0 = time.time()
    model, tok = load_model_and_tokenizer(args.model)
    print(f"loaded {args.model} in {time.time() - t0:.1f}s; {machine()}", flush=True)
    snap = Snapshot(model)
    cal = calibration_split(tok, ["web"], args.n_samples, args.seqlen, 0,
                            held_out_windows=max(1, args.agent_eval_tokens // args.seqlen), held_out_seqlen=args.seqlen)
    calib, held = cal.ids, cal.held_out
    mw = args.max_windows or None

    def evaluate() -> tuple[dict, dict]:
        ppl = perplexity(model, tok, "wikitext2", args.eval_seqlen, max_windows=mw)
        scores = {}
        if tasks:
            res = run_suite(model, tok, tasks, data_root(), limit=args.limit, batch_size=8, qa_shots=args.qa_shots)
            scores = {t: 100 * res[t][res[t]["main"]] for t in tasks}  # the task's reported metric, in %
            if mc_tasks:
                scores["zero-shot avg"] = sum(scores[t] for t in mc_tasks) / len(mc_tasks)
        return ppl, scores

    rows, protocol = [], {}

    def record(name, target, sparsity, prune_s, extra=("-", "-")):
        ppl, scores = evaluate()
        protocol.update(seqlen=ppl["seqlen"], windows=ppl["windows"], tokens=ppl["tokens"])
        rows.append([name, target, round(sparsity, 4), ppl["ppl"], *extra, round(prune_s, 1), ppl["seconds"],
                     *[scores.get(t, float("nan")) for t in columns]])
        print(f"{name:24s} target {target} sparsity {sparsity:.4f} wikitext2 ppl {ppl['ppl']:.3f} "
              f"(seqlen {ppl['seqlen']}, {ppl['windows']} windows, {ppl['tokens']} tokens) prune {prune_s:.1f}s "
              f"eval {ppl['seconds']}s {extra} {scores or ''}", flush=True)

    if "dense" not in skip:
        record("dense", "-", 0.0, 0.0)
    for target in [float(s) for s in args.sparsities.split(",")]:
        for name, alloc in (("wanda uniform", "uniform"), ("wanda + OWL", "owl")):
            if ("wanda" if alloc == "uniform" else "owl") in skip:
                continue
            snap.restore(model)
            t = time.time()
            rep = prune(model, {"method": "wanda", "sparsity": target, "device": "cpu",
                                "allocation": {"kind": alloc}}, calibration=calib)
            record(name, target, rep.global_sparsity, time.time() - t)
        if "agent" not in skip:
            snap.restore(model)
            cfg = AgentConfig(target_sparsity=target, max_iterations=args.max_iterations, device="cpu",
                              save_model=False, eval_tokens=args.agent_eval_tokens, eval_seqlen=args.seqlen,
                              grad_samples=args.agent_grad_samples,
                              calibration={"sources": ["web"], "n_samples": args.n_samples, "seqlen": args.seqlen})
            t = time.time()
            with tempfile.TemporaryDirectory() as out:
                res = run_agent(model, tok, cfg, out, calibration=calib, held_out=held)
            record("agent (builtin policy)", target, res.global_sparsity, time.time() - t,
                   (res.iterations, res.rollbacks))
    if "nm" not in skip:
        for pattern in args.nm_patterns.split(","):
            snap.restore(model)
            t = time.time()
            rep = prune(model, {"method": "magnitude", "sparsity": 0.5, "pattern": pattern, "device": "cpu"})
            record(f"magnitude {pattern}", 0.5, rep.global_sparsity, time.time() - t)

    headers = ["method", "target", "sparsity", "wikitext2 ppl", "iterations", "rollbacks", "prune wall s",
               "eval wall s", *columns]
    table = md_table(headers, rows)
    tasks_note = (f"; tasks (score in %: acc_norm for arc_challenge/hellaswag/openbookqa, else acc; TriviaQA "
                  f"{args.qa_shots}-shot exact match; MMLU 5-shot) on the first {args.limit} items each" if tasks else "")
    publish(table, f"model {args.model}; calibration C4 docs 0-149 ('web'), {args.n_samples} x {args.seqlen} tokens, "
                   f"seed 0, the same windows for every method (the agent additionally holds out the last "
                   f"{held.numel()} tokens of that stream for its rollback check); WikiText-2 test, seqlen "
                   f"{protocol.get('seqlen')}, {protocol.get('windows')} windows = {protocol.get('tokens')} scored "
                   f"tokens{tasks_note}; agent: built-in policy, rollback threshold 15%, {args.agent_grad_samples} "
                   f"gradient samples; {machine()}; total {time.time() - t0:.0f}s", args.out)


if __name__ == "__main__":
    main()
