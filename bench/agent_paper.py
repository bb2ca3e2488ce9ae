"""The paper's comparison in one command: dense, structured (Wanda-sp, FLAP), N:M magnitude, uniform Wanda, OWL,
the agent with the built-in policy and the agent with an LLM controller, at each target sparsity.

Rows, per target sparsity (default 0.45 and 0.50):

    dense                      the unpruned model (evaluated once, repeated in every table)
    Wanda-sp, FLAP             structured: whole MLP channels / KV head groups removed, the same fraction of the
                               decoder blocks' linear parameters as the target
    magnitude 2:4, 4:8         semi-structured, 50% by construction (pruned and evaluated once, repeated)
    Wanda (uniform), OWL       unstructured Wanda, uniform per layer / outlier-weighted layer allocation
    agent (built-in)           the agent loop with the deterministic policy
    agent (LLM)                the agent loop with controller "openai": --base-url / --model-name, or, when no
                               --base-url is given, llama-cpp-python's server started here on 127.0.0.1 with
                               SmolLM2-135M-Instruct's GGUF (--server-gguf), stopped when the script ends

Every method starts from the same dense weights and uses the same calibration windows (C4 docs 0-149, "web";
the agent additionally holds out the tail of that stream for its rollback check). Columns: WikiText-2 test
perplexity (rows joined with "\\n\\n", non-overlapping windows), MMLU 5-shot (--mmlu-limit questions over all 57
subjects), factual QA (TriviaQA from ../shared, --qa-shots answered examples; --qa freebaseqa=PATH reads the
FreebaseQA file), the zero-shot average over --zeroshot, and for the agent rows its iterations, rollbacks, and
what the controller cost (replies asked / valid, prompt and completion tokens as the server reports them, seconds
spent waiting for the controller), plus the wall time of each pruning run.

Each row is printed as it finishes and --out is rewritten (atomically) after every row, so a run cut off early
keeps the rows it finished. --rows selects rows (e.g. rerun only the LLM agent with another endpoint).

    python bench/agent_paper.py --out docs/bench/agent_paper.md                    # SmolLM2-135M, full settings
    python bench/agent_paper.py --model Qwen/Qwen3-8B --device cuda --dtype bfloat16 --sparsities 0.43 \\
        --base-url https://api.openai.com/v1 --model-name gpt-4o --api-key-env OPENAI_API_KEY \\
        --qa freebaseqa=FreebaseQA-eval.json --out runs/paper_qwen3_8b.md
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import REPO, Snapshot, machine, md_table, shared_dir, smollm2_path  # noqa: E402

from prunepilot.agent import AgentConfig, run_agent  # noqa: E402
from prunepilot.api import prune  # noqa: E402
from prunepilot.data import calibration_split, data_root  # noqa: E402
from prunepilot.eval.perplexity import perplexity  # noqa: E402
from prunepilot.eval.suite import ZERO_SHOT_MC, run_suite  # noqa: E402
from prunepilot.io import atomic_write_text  # noqa: E402
from prunepilot.modeling import load_model, load_model_and_tokenizer  # noqa: E402

ROWS = ["dense", "wanda_sp", "flap", "nm", "wanda", "owl", "agent", "agent_llm"]
DEFAULT_GGUF = "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
# prompt settings a 135M chat model can answer within its context (what tests/test_agent_llm.py uses)
SMALL_PROMPT = dict(granularity="block", table_rows=8, history_chars=500, max_layers_per_reply=4, reasoning_chars=80,
                    max_tokens=240)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=smollm2_path(), help="model folder or hub name (default: SmolLM2-135M)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="float32, bfloat16, float16")
    ap.add_argument("--sparsities", default="0.45,0.5")
    ap.add_argument("--rows", default=",".join(ROWS),
                    help=f"comma-separated rows to run, in this order (per target), of {','.join(ROWS)}")
    ap.add_argument("--nm-patterns", default="2:4,4:8")
    # calibration (shared by every method) and the agent's held-out slice
    ap.add_argument("--n-samples", type=int, default=32, help="calibration windows")
    ap.add_argument("--seqlen", type=int, default=512, help="calibration tokens per window")
    ap.add_argument("--agent-eval-tokens", type=int, default=4096, help="held-out tokens for the rollback check")
    ap.add_argument("--agent-grad-samples", type=int, default=4)
    ap.add_argument("--max-iterations", type=int, default=30)
    ap.add_argument("--rollback-threshold", type=float, default=0.15)
    # the LLM controller
    ap.add_argument("--base-url", help="OpenAI-compatible endpoint; default: start llama-cpp-python's server here")
    ap.add_argument("--model-name", default="smollm2", help="served model name of the LLM controller")
    ap.add_argument("--api-key-env", default="OPENAI_API_KEY", help="NAME of the env var holding the API key")
    ap.add_argument("--server-gguf", default=str(shared_dir() / DEFAULT_GGUF),
                    help="GGUF the local server runs when no --base-url is given")
    ap.add_argument("--server-threads", type=int, default=1)
    ap.add_argument("--controller-timeout", type=float, default=120.0, help="seconds per decision")
    ap.add_argument("--controller-json", default="{}",
                    help='extra ControllerConfig fields for the LLM row, e.g. \'{"max_layers_per_reply": 8}\'')
    ap.add_argument("--small-prompt", choices=["auto", "yes", "no"], default="auto",
                    help="block granularity, table_rows 8, history 500 chars, 4 blocks and 80 reasoning chars per "
                         "reply, 240 tokens "
                         "(auto: yes for the local SmolLM2 server, no for --base-url)")
    # evaluation
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=0, help="WikiText-2 windows per row (0 = all)")
    ap.add_argument("--zeroshot", default=",".join(ZERO_SHOT_MC), help="zero-shot tasks averaged ('' = none)")
    ap.add_argument("--qa", default="triviaqa", help="factual QA task: triviaqa, or freebaseqa=PATH ('' = none)")
    ap.add_argument("--qa-shots", type=int, default=5, help="answered examples before each QA question")
    ap.add_argument("--limit", type=int, default=0, help="items per zero-shot / QA task (0 = all)")
    ap.add_argument("--mmlu-limit", type=int, default=0, help="MMLU questions over all subjects (0 = all; -1 = skip)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--out", help="markdown file, rewritten after every row")
    return ap.parse_args(argv)


class Bench:
    def __init__(self, args):
        self.args = args
        self.t0 = time.time()
        self.model, self.tok = load_model_and_tokenizer(args.model, dtype=args.dtype, device=args.device)
        print(f"loaded {args.model} in {time.time() - self.t0:.1f}s; {machine()}", flush=True)
        self.snap = Snapshot(self.model)
        self.reshaped = False
        self.cal = calibration_split(self.tok, ["web"], args.n_samples, args.seqlen, 0,
                                     held_out_windows=max(1, args.agent_eval_tokens // args.seqlen),
                                     held_out_seqlen=args.seqlen)
        self.mc = [t for t in args.zeroshot.split(",") if t]
        self.qa = args.qa.strip()
        self.qa_name = self.qa.partition("=")[0]
        self.tables: dict[str, list] = {}  # target label -> rows
        self.proto: dict = {}
        self.llm_note = ""

    # -- model state -------------------------------------------------------------------------------------------
    def fresh(self):
        """The dense model again: weights from the snapshot, or reloaded when a structured method reshaped it."""
        if self.reshaped:
            del self.model
            self.model = load_model(self.args.model, dtype=self.args.dtype, device=self.args.device)
            self.reshaped = False
        else:
            self.snap.restore(self.model)
        return self.model

    # -- evaluation ----------------------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        a, m = self.args, self.model
        t = time.time()
        ppl = perplexity(m, self.tok, "wikitext2", a.eval_seqlen, max_windows=a.max_windows or None)
        self.proto.update(seqlen=ppl["seqlen"], windows=ppl["windows"], tokens=ppl["tokens"])
        out = {"ppl": ppl["ppl"]}
        limit = a.limit or None
        tasks = self.mc + ([self.qa] if self.qa else [])
        if tasks:
            res = run_suite(m, self.tok, tasks, data_root(), limit=limit, batch_size=a.batch_size,
                            qa_shots=a.qa_shots)
            for name, r in res.items():
                out[name] = 100 * r[r["main"]]
                self.proto.setdefault("n", {})[name] = r.get("n")
        if a.mmlu_limit >= 0:
            res = run_suite(m, self.tok, ["mmlu"], data_root(), limit=a.mmlu_limit or None, batch_size=a.batch_size)
            out["mmlu"] = 100 * res["mmlu"][res["mmlu"]["main"]]
            self.proto.setdefault("n", {})["mmlu"] = res["mmlu"].get("n")
        if self.mc:
            out["zero-shot avg"] = sum(out[t] for t in self.mc) / len(self.mc)
        out["eval_s"] = round(time.time() - t, 1)
        return out

    # -- rows ----------------------------------------------------------------------------------------------------
    def columns(self):
        return ["method", "target", "sparsity", "wikitext2 ppl", "MMLU 5-shot", f"{self.qa_name or 'QA'}",
                "zero-shot avg", "iterations", "rollbacks", "replies (valid)", "prompt tokens", "completion tokens",
                "controller s", "prune s", "eval s", *self.mc]

    def record(self, targets: list[str], name: str, target, sparsity: float, prune_s: float, agent: dict | None = None):
        s = self.evaluate()
        ag = agent or {}
        row = [name, target, round(sparsity, 4), s["ppl"], s.get("mmlu", "-"), s.get(self.qa_name, "-"),
               s.get("zero-shot avg", "-"), ag.get("iterations", "-"), ag.get("rollbacks", "-"),
               ag.get("replies", "-"), ag.get("prompt_tokens", "-"), ag.get("completion_tokens", "-"),
               ag.get("controller_s", "-"), round(prune_s, 1), s["eval_s"], *[s.get(t, "-") for t in self.mc]]
        for key in targets:
            self.tables.setdefault(key, []).append(row)
        print("ROW " + " | ".join(f"{h}={v:.3f}" if isinstance(v, float) else f"{h}={v}"
                                  for h, v in zip(self.columns(), row)), flush=True)
        self.write()

    def write(self, final: bool = False):
        a = self.args
        parts = [f"# agent_paper: {a.model}\n"]
        for key, rows in self.tables.items():
            parts.append(f"## target sparsity {key}\n\n{md_table(self.columns(), rows)}\n")
        n = self.proto.get("n", {})
        parts.append("Protocol: " + self.protocol(n) + ("" if final else " (run in progress)") + "\n")
        text = "\n".join(parts)
        if a.out:
            atomic_write_text(a.out, text)
        return text

    def protocol(self, n: dict) -> str:
        a = self.args
        mc = ", ".join(f"{t} ({n.get(t, '-')})" for t in self.mc) or "none"
        return (f"model {a.model} ({a.dtype}, {a.device}); calibration C4 docs 0-149 ('web'), {a.n_samples} x "
                f"{a.seqlen} tokens, seed 0, the same windows for every method (the agent holds out the last "
                f"{self.cal.held_out.numel()} tokens of that stream for its rollback check, threshold "
                f"{a.rollback_threshold:.0%}, {a.agent_grad_samples} gradient samples, at most {a.max_iterations} "
                f"iterations); structured rows remove the target fraction of the decoder blocks' linear parameters; "
                f"magnitude N:M is 50% by construction (pruned once, shown in every table); WikiText-2 test, seqlen "
                f"{self.proto.get('seqlen')}, {self.proto.get('windows')} windows = {self.proto.get('tokens')} scored "
                f"tokens; " + (f"MMLU 5-shot (dev shots), {n.get('mmlu', '-')} questions; " if a.mmlu_limit >= 0
                               else "no MMLU; ")
                + (f"{self.qa_name} {a.qa_shots}-shot exact match, {n.get(self.qa_name, '-')} items; " if self.qa
                   else "no factual QA; ")
                + f"zero-shot average over {mc} (acc_norm for arc_challenge / "
                f"hellaswag / openbookqa, else acc); scores in %; controller tokens as reported by the server "
                f"(summed over all replies, re-asks included), 'controller s' = time waiting for decisions; "
                f"{self.llm_note}; {machine()}; total {time.time() - self.t0:.0f}s")

    def run_prune(self, recipe: dict, structured: bool = False):
        self.fresh()
        t = time.time()
        rep = prune(self.model, {"device": self.args.device, **recipe}, self.tok, calibration=self.cal.ids)
        self.reshaped = structured
        sp = rep.extra["achieved_sparsity"] if structured else rep.global_sparsity
        return sp, time.time() - t

    def run_agent(self, target: float, controller: dict):
        a = self.args
        self.fresh()
        cfg = AgentConfig(target_sparsity=target, max_iterations=a.max_iterations, device=a.device, save_model=False,
                          rollback_threshold=a.rollback_threshold, eval_tokens=a.agent_eval_tokens,
                          eval_seqlen=a.seqlen, grad_samples=a.agent_grad_samples, controller=controller,
                          calibration={"sources": ["web"], "n_samples": a.n_samples, "seqlen": a.seqlen})
        t = time.time()
        with tempfile.TemporaryDirectory() as out:
            res = run_agent(self.model, self.tok, cfg, out, calibration=self.cal.ids, held_out=self.cal.held_out)
        rep = res.report
        st = rep["controller_stats"]
        steps = rep["trajectory"][1:]
        comp = [s["completion_tokens"] for s in steps if s.get("completion_tokens") is not None]
        stats = {"iterations": res.iterations, "rollbacks": res.rollbacks,
                 "replies": f"{st['replies']} ({st['valid_replies']})" if st["replies"] else "-",
                 "prompt_tokens": st["prompt_tokens"] if st["prompt_tokens"] is not None else "-",
                 "completion_tokens": sum(comp) if comp else "-", "controller_s": st["controller_s"]}
        print(f"agent ({controller['kind']}) target {target}: stop {res.stop_reason}, {res.iterations} iterations, "
              f"{res.rollbacks} rollbacks, fallbacks {st['fallbacks']}, held-out ppl {res.baseline_ppl:.3f} -> "
              f"{res.final_ppl:.3f}; controller {st}", flush=True)
        for s in steps:
            print(f"  iter {s['iteration']} [{s['source']}] sparsity -> {s['sparsity_after']:.4f} ppl {s['ppl']:.3f} "
                  f"({s['label']}) controller {s['controller_s']}s replies {s['replies']} tokens "
                  f"{s['prompt_tokens']}/{s['completion_tokens']}", flush=True)
        return res.global_sparsity, time.time() - t, stats


def start_server(args):
    """llama-cpp-python's OpenAI-compatible server on 127.0.0.1 (tests/llama_server.py), or None on failure."""
    sys.path.insert(0, str(REPO / "tests"))
    from llama_server import LlamaServer

    server = LlamaServer(args.server_gguf, threads=args.server_threads, startup_timeout=180.0)
    server.start()  # bounded wait; stops the process itself when it does not come up
    return server


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("prunepilot.agent").setLevel(logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    order = list(dict.fromkeys(filter(None, args.rows.split(","))))
    rows = set(order)
    unknown = rows - set(ROWS)
    if unknown:
        raise SystemExit(f"unknown --rows {sorted(unknown)}; choose from {ROWS}")
    targets = [float(s) for s in args.sparsities.split(",")]
    labels = [f"{t:g}" for t in targets]
    b = Bench(args)
    server = None
    small = args.small_prompt == "yes" or (args.small_prompt == "auto" and not args.base_url)
    controller = {"kind": "openai", "model_name": args.model_name, "api_key_env": args.api_key_env,
                  "timeout_s": args.controller_timeout, "retries": 0 if not args.base_url else 2,
                  **(SMALL_PROMPT if small else {}), **json.loads(args.controller_json)}
    try:
        if "agent_llm" in rows:
            if args.base_url:
                controller["base_url"] = args.base_url
                b.llm_note = f"LLM controller {args.model_name} at {args.base_url}"
            else:
                t = time.time()
                server = start_server(args)
                controller["base_url"] = server.url
                b.llm_note = (f"LLM controller: llama-cpp-python's server on 127.0.0.1 with {Path(args.server_gguf).name}"
                              f" ({args.server_threads} thread(s); started in {time.time() - t:.0f}s)")
            shown = {k: v for k, v in controller.items() if k not in ("kind", "base_url", "api_key_env")}
            b.llm_note += ", controller settings " + json.dumps(shown)
            print(b.llm_note, flush=True)
        else:
            b.llm_note = "no LLM controller row"
        if "dense" in rows:
            b.record(labels, "dense", "-", 0.0, 0.0)
        prunes = {"wanda_sp": ("Wanda-sp (structured)", {"method": "wanda_sp"}, True),
                  "flap": ("FLAP (structured)", {"method": "flap"}, True),
                  "wanda": ("Wanda (uniform)", {"method": "wanda", "allocation": {"kind": "uniform"}}, False),
                  "owl": ("Wanda + OWL", {"method": "wanda", "allocation": {"kind": "owl"}}, False)}
        for i, (target, label) in enumerate(zip(targets, labels)):
            for key in order:  # the order --rows gives them, so a cut-off run has the rows that matter most
                if key in prunes:
                    name, recipe, structured = prunes[key]
                    sp, s = b.run_prune({**recipe, "sparsity": target}, structured)
                    b.record([label], name, target, sp, s)
                elif key == "nm" and i == 0:  # 50% by construction: once, shown in every table
                    for pattern in args.nm_patterns.split(","):
                        sp, s = b.run_prune({"method": "magnitude", "sparsity": 0.5, "pattern": pattern})
                        b.record(labels, f"magnitude {pattern}", 0.5, sp, s)
                elif key == "agent":
                    sp, s, st = b.run_agent(target, {"kind": "builtin"})
                    b.record([label], "agent (built-in)", target, sp, s, st)
                elif key == "agent_llm":
                    sp, s, st = b.run_agent(target, controller)
                    b.record([label], f"agent (LLM: {args.model_name})", target, sp, s, st)
    finally:
        if server is not None:
            server.stop()
    print(b.write(final=True), flush=True)


if __name__ == "__main__":
    main()
