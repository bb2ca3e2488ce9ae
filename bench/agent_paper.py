"""The paper's comparison in one command: dense, structured (Wanda-sp, FLAP), N:M magnitude, uniform Wanda, OWL,
the agent with the built-in policy and the agent with an LLM controller, at each target sparsity.

Rows, per target sparsity (default 0.45 and 0.50):

    dense                      the unpruned model (evaluated once, repeated in every table)
    Wanda-sp, FLAP             structured: whole MLP channels / KV head groups removed, the same fraction of the
                               decoder blocks' linear parameters as the target
    FLAP iterative multi-domain  flap_iterative on its own wiki+web+code+math mixture (fused per-domain statistics,
                               --structured-samples windows of 128 tokens), re-scored on the partly pruned model
    seed 002's two ablations   flap_md: one-shot FLAP on that same mixture (fused statistics); flap_iter_web:
                               flap_iterative on "web" alone (the same window count) -- with wanda_sp, flap and
                               flap_iter they make seed 002's table (`--rows dense,wanda_sp,flap,flap_md,
                               flap_iter_web,flap_iter --sparsities 0.25,0.5`)
    magnitude 2:4, 4:8         semi-structured, 50% by construction (pruned and evaluated once, repeated)
    Wanda (uniform), OWL       unstructured Wanda, uniform per layer / outlier-weighted layer allocation
    agent (built-in)           the agent loop with the deterministic policy
    agent (search)             the same loop following the evolutionary search's per-linear plan (controller "plan",
                               plan "evo": KL fitness on the agent's held-out tokens), so budget, pacing, rollback and
                               evaluation are those of the other agent rows
    agent (LLM)                the agent loop with controller "openai": --base-url / --model-name, or, when no
                               --base-url is given, llama-cpp-python's server started here on 127.0.0.1 with
                               --server-gguf (default: Qwen2.5-Coder-1.5B-Instruct as `prunepilot fetch-model`
                               caches it; without it and without --server-gguf the row stops with that command),
                               stopped when the script ends
    agent (self)               the same with the pruned model's own GGUF as its controller (a GGUF --model only)

Resumable: every finished row is appended to OUT.rows.jsonl (one RowResult per line) with the protocol it ran under;
a rerun with the same protocol skips the rows already there and rewrites OUT from all of them, so a long table is
built by several runs (`--rows dense,wanda`, then `--rows agent_llm` ...), each within a session. Every agent row
keeps its run (journal, report, plot) in OUT.runs/PROTOCOL/ROW/METHOD, and a row cut off mid-run resumes its journal.

Every method starts from the same dense weights and uses the same calibration windows (C4 docs 0-149, "web";
the agent additionally holds out the tail of that stream for its rollback check). Columns: WikiText-2 test and
CodeParrot test perplexity (rows joined with "\\n\\n", non-overlapping windows), MMLU 5-shot (--mmlu-limit questions over all 57
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
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from common import (FLOAT_CACHE, Snapshot, float_folder, gguf_in, machine, md_table, settings_fingerprint,
                    smollm2_path, task_scores)

from prunepilot.agent import AgentConfig, run_agent
from prunepilot.api import prune
from prunepilot.data import calibration_split
from prunepilot.eval.perplexity import perplexity
from prunepilot.eval.suite import ZERO_SHOT_MC
from prunepilot.io import JsonLines, atomic_write_text
from prunepilot.model_store import cached_model, lookup
from prunepilot.modeling import load_model, load_model_and_tokenizer
from prunepilot.registry import MULTI_DOMAIN

ROWS = ["dense", "wanda_sp", "flap", "flap_md", "flap_iter_web", "flap_iter", "nm", "wanda", "owl", "agent", "agent_search",
        "agent_llm", "agent_self"]
CONTROLLER_MODEL = "qwen2.5-coder-1.5b-instruct"
# prompt settings a small local chat model answers quickly: one row per decoder block, the 12 least sensitive
# shown (a 24-block table made a 1,613-token prompt, 188 s per decision of the 1.5B model on the busy 2-core
# machine), a one-sentence reasoning, a few blocks per reply, a short answer budget
SMALL_PROMPT = dict(granularity="block", table_rows=12, history_chars=600, max_layers_per_reply=6, reasoning_chars=100,
                    max_tokens=200)


def default_controller_gguf() -> str | None:
    """The cached Qwen2.5-Coder-1.5B-Instruct GGUF, or None (no silent fallback to another controller)."""
    folder = cached_model(CONTROLLER_MODEL)
    return str(folder / lookup(CONTROLLER_MODEL).filename) if folder is not None else None


def missing_controller(flag: str) -> SystemExit:
    return SystemExit(f"no controller GGUF: run `prunepilot fetch-model {CONTROLLER_MODEL}` or pass {flag} PATH")


def served_gguf(args, row: str) -> str:
    """The GGUF a local llama-cpp-python server runs for `row` (agent_llm without --base-url: the controller;
    agent_self: --model's own GGUF); exits with the fix when there is none."""
    if row == "agent_llm":
        if args.server_gguf is None:
            raise missing_controller("--server-gguf")
        return args.server_gguf
    gguf = gguf_in(args.model)
    if gguf is None:
        raise SystemExit(f"--rows {row}: --model {args.model} has no GGUF to serve as its own controller")
    return str(gguf)


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
    ap.add_argument("--structured-samples", type=int, default=128,
                    help="flap_iter: 128-token windows of its own wiki+web+code+math mixture")
    ap.add_argument("--agent-eval-tokens", type=int, default=4096, help="held-out tokens for the rollback check")
    ap.add_argument("--agent-grad-samples", type=int, default=4)
    ap.add_argument("--max-iterations", type=int, default=30)
    ap.add_argument("--rollback-threshold", type=float, default=0.15)
    # the LLM controllers
    ap.add_argument("--base-url", help="OpenAI-compatible endpoint; default: start llama-cpp-python's server here")
    ap.add_argument("--model-name", default="local", help="served model name of the LLM controller")
    ap.add_argument("--api-key-env", default="OPENAI_API_KEY", help="NAME of the env var holding the API key")
    ap.add_argument("--server-gguf", default=default_controller_gguf(),
                    help=f"GGUF the local server runs for agent_llm when no --base-url is given (default: the cached "
                         f"{CONTROLLER_MODEL})")
    ap.add_argument("--server-threads", type=int, default=2)
    ap.add_argument("--controller-timeout", type=float, default=120.0, help="seconds per decision")
    ap.add_argument("--controller-json", default="{}",
                    help='extra ControllerConfig fields for the LLM rows, e.g. \'{"max_layers_per_reply": 8}\'')
    ap.add_argument("--small-prompt", choices=["auto", "yes", "no"], default="auto",
                    help="block granularity, 12 table rows, history 600 chars, 6 blocks and 100 reasoning chars per "
                         "reply, 200 tokens (auto: yes for a local server, no for --base-url)")
    # evaluation
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=0, help="WikiText-2 and code windows per row (0 = all)")
    ap.add_argument("--code-ppl", default="code-test", help="second perplexity set ('' = none)")
    ap.add_argument("--zeroshot", default=",".join(ZERO_SHOT_MC), help="zero-shot tasks averaged ('' = none)")
    ap.add_argument("--qa", default="triviaqa", help="factual QA task: triviaqa, or freebaseqa=PATH ('' = none)")
    ap.add_argument("--qa-shots", type=int, default=5, help="answered examples before each QA question")
    ap.add_argument("--limit", type=int, default=0, help="items per zero-shot / QA task (0 = all)")
    ap.add_argument("--mmlu-limit", type=int, default=0, help="MMLU questions over all subjects (0 = all; -1 = skip)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--float-cache", default=FLOAT_CACHE,
                    help="a GGUF --model is dequantized once and kept here as float safetensors (fast reloads)")
    ap.add_argument("--out", required=True, help="markdown file, rewritten after every row (+ OUT.rows.jsonl)")
    return ap.parse_args(argv)


@dataclass
class RowResult:
    """One finished row, as OUT.rows.jsonl keeps it."""
    key: str                      # row key and target, e.g. "wanda@0.45"
    protocol: str                 # fingerprint of the settings the row depends on
    tables: list[str]             # target labels whose table shows it
    method: str
    target: object
    sparsity: float
    metrics: dict                 # ppl, code ppl, mmlu, QA, zero-shot tasks and average, eval_s
    prune_s: float
    agent: dict = field(default_factory=dict)
    n: dict = field(default_factory=dict)  # items per task
    ppl_protocol: dict = field(default_factory=dict)
    note: str = ""


def protocol_key(args) -> str:
    """The settings every row's numbers depend on (not --rows, --out, --threads, --sparsities, --nm-patterns: they
    choose rows, whose keys name target and pattern). --server-gguf is left out as well: only the agent_llm row
    depends on it, and that row is matched by its controller's name."""
    return settings_fingerprint(args, ("rows", "out", "threads", "sparsities", "nm_patterns", "float_cache",
                                       "server_gguf"))


class Bench:
    def __init__(self, args):
        self.args = args
        self.t0 = time.time()
        self.source = float_folder(args.model, args.dtype, args.float_cache)
        self.model, self.tok = load_model_and_tokenizer(self.source, dtype=args.dtype, device=args.device)
        print(f"loaded {args.model} ({self.source}) in {time.time() - self.t0:.1f}s; {machine()}", flush=True)
        self.snap = Snapshot(self.model)
        self.reshaped = False
        self.cal = calibration_split(self.tok, ["web"], args.n_samples, args.seqlen, 0,
                                     held_out_windows=max(1, args.agent_eval_tokens // args.seqlen),
                                     held_out_seqlen=args.seqlen)
        self.mc = [t for t in args.zeroshot.split(",") if t]
        self.qa = args.qa.strip()
        self.qa_name = self.qa.partition("=")[0]
        self.protocol = protocol_key(args)
        self.store = JsonLines(f"{args.out}.rows.jsonl", "bench rows")
        self.rows: dict[str, RowResult] = {}
        if self.store.exists():
            for _, d in self.store.read():
                if d.get("protocol") == self.protocol:
                    self.rows[d["key"]] = RowResult(**d)
        self.llm_note = ""

    def done(self, key: str, method: str | None = None) -> bool:
        """Whether row `key` is stored under this protocol (and, when given, with this method: an LLM row names
        its controller)."""
        row = self.rows.get(key)
        if row is not None and method is not None and row.method != method:
            print(f"row {key}: stored as {row.method!r}, this run asks for {method!r}: rerun", flush=True)
            return False
        if row is not None:
            print(f"row {key}: already in {self.store.path} (same protocol), skipped", flush=True)
        return row is not None

    # -- model state -------------------------------------------------------------------------------------------
    def fresh(self):
        """The dense model again: weights from the snapshot, or reloaded when a structured method reshaped it."""
        if self.reshaped:
            del self.model
            self.model = load_model(self.source, dtype=self.args.dtype, device=self.args.device)
            self.reshaped = False
        else:
            self.snap.restore(self.model)
        return self.model

    # -- evaluation ----------------------------------------------------------------------------------------------
    def perplexities(self, out: dict, proto: dict) -> None:
        a = self.args
        for name, dataset in (("ppl", "wikitext2"), ("code ppl", a.code_ppl)):
            if dataset:
                r = perplexity(self.model, self.tok, dataset, a.eval_seqlen, max_windows=a.max_windows or None)
                out[name] = r["ppl"]
                proto[dataset] = {"seqlen": r["seqlen"], "windows": r["windows"], "tokens": r["tokens"]}

    def evaluate(self) -> tuple[dict, dict, dict]:
        a, m = self.args, self.model
        t = time.time()
        out, n, proto = {}, {}, {}
        self.perplexities(out, proto)
        tasks = self.mc + ([self.qa] if self.qa else [])
        if tasks:
            scores, counts = task_scores(m, self.tok, tasks, a.limit, a.batch_size, qa_shots=a.qa_shots)
            out.update(scores)
            n.update(counts)
        if a.mmlu_limit >= 0:
            scores, counts = task_scores(m, self.tok, ["mmlu"], a.mmlu_limit, a.batch_size)
            out.update(scores)
            n.update(counts)
        if self.mc:
            out["zero-shot avg"] = sum(out[t] for t in self.mc) / len(self.mc)
        out["eval_s"] = round(time.time() - t, 1)
        return out, n, proto

    # -- rows ----------------------------------------------------------------------------------------------------
    def columns(self):
        return ["method", "target", "sparsity", "wikitext2 ppl", "code ppl", "MMLU 5-shot", f"{self.qa_name or 'QA'}",
                "zero-shot avg", "iterations", "rollbacks", "replies (valid)", "s / decision", "prompt tokens",
                "completion tokens", "controller s", "prune s", "eval s", *self.mc]

    def cells(self, r: RowResult) -> list:
        s, ag = r.metrics, r.agent
        return [r.method, r.target, round(r.sparsity, 4), s.get("ppl", "-"), s.get("code ppl", "-"),
                s.get("mmlu", "-"), s.get(self.qa_name, "-"), s.get("zero-shot avg", "-"),
                ag.get("iterations", "-"), ag.get("rollbacks", "-"), ag.get("replies", "-"),
                ag.get("s_per_decision", "-"), ag.get("prompt_tokens", "-"), ag.get("completion_tokens", "-"),
                ag.get("controller_s", "-"), round(r.prune_s, 1), s["eval_s"], *[s.get(t, "-") for t in self.mc]]

    def record(self, key: str, tables: list[str], name: str, target, sparsity: float, prune_s: float,
               agent: dict | None = None):
        metrics, n, proto = self.evaluate()
        note = ""
        if isinstance(target, float) and abs(sparsity - target) > 0.005:
            note = f"sparsity {sparsity:.4f} is off its target {target} by more than 0.005"
            print(f"WARNING {key}: {note}", flush=True)
        row = RowResult(key, self.protocol, tables, name, target, sparsity, metrics, prune_s, agent or {}, n, proto,
                        note)
        self.store.append(asdict(row))
        self.rows[key] = row
        print("ROW " + " | ".join(f"{h}={v:.3f}" if isinstance(v, float) else f"{h}={v}"
                                  for h, v in zip(self.columns(), self.cells(row))), flush=True)
        self.write()

    def write(self, final: bool = False):
        a = self.args
        parts = [f"# agent_paper: {a.model}\n"]
        shared = [r for r in self.rows.values() if r.key == "dense" or r.key.startswith("nm:")]  # in every table
        tables: dict[str, list[RowResult]] = {}
        for r in self.rows.values():
            if r not in shared:
                tables.setdefault(r.tables[0], []).append(r)
        for label in tables or {t for r in shared for t in r.tables}:
            tables.setdefault(label, [])[:0] = shared
        for label in sorted(tables):
            rows = sorted(tables[label], key=lambda r: ROWS.index(r.key.partition("@")[0].partition(":")[0]))
            parts.append(f"## target sparsity {label}\n\n{md_table(self.columns(), [self.cells(r) for r in rows])}\n")
            parts += [f"- {r.key}: {r.note}" for r in rows if r.note]
        parts.append("Protocol: " + self.describe() + ("" if final else " (run in progress)") + "\n")
        text = "\n".join(parts)
        atomic_write_text(a.out, text)
        return text

    def describe(self) -> str:
        a = self.args
        n = {k: v for r in self.rows.values() for k, v in r.n.items()}
        ppl = {k: v for r in self.rows.values() for k, v in r.ppl_protocol.items()}
        mc = ", ".join(f"{t} ({n.get(t, '-')})" for t in self.mc) or "none"
        ppls = "; ".join(f"{d}: seqlen {p['seqlen']}, {p['windows']} windows = {p['tokens']} tokens"
                         for d, p in ppl.items())
        return (f"model {a.model} ({a.dtype}, {a.device}); calibration C4 docs 0-149 ('web'), {a.n_samples} x "
                f"{a.seqlen} tokens, seed 0, the same windows for every method but FLAP iterative multi-domain and "
                f"one-shot FLAP multi-domain ({a.structured_samples} x 128 tokens of wiki+web+code+math, fused "
                f"statistics) and FLAP iterative single-domain ({a.structured_samples} x 128 tokens of web); the "
                f"agent holds out "
                f"the last {self.cal.held_out.numel()} tokens of the web stream for its rollback check, threshold "
                f"{a.rollback_threshold:.0%}, {a.agent_grad_samples} gradient samples, at most {a.max_iterations} "
                f"iterations, paced to the target; structured rows remove the target fraction of the decoder blocks' "
                f"linear parameters; magnitude N:M is 50% by construction (pruned once, shown in every table); "
                f"perplexity ({ppls}); "
                + (f"MMLU 5-shot (dev shots), {n.get('mmlu', '-')} questions spread over the subjects; "
                   if a.mmlu_limit >= 0 else "no MMLU; ")
                + (f"{self.qa_name} {a.qa_shots}-shot exact match, {n.get(self.qa_name, '-')} items; " if self.qa
                   else "no factual QA; ")
                + f"zero-shot average over {mc} (acc_norm for arc_challenge / hellaswag / openbookqa, else acc); "
                f"scores in %; controller tokens as reported by the server (summed over all replies, re-asks "
                f"included), 'controller s' = time waiting for decisions; {self.llm_note}; {machine()}; protocol "
                f"{self.protocol}; this run {time.time() - self.t0:.0f}s")

    def run_prune(self, recipe: dict, structured: bool = False, own_calibration: bool = False):
        self.fresh()
        t = time.time()
        cal = None if own_calibration else self.cal.ids
        rep = prune(self.model, {"device": self.args.device, **recipe}, self.tok, calibration=cal)
        self.reshaped = structured
        sp = rep.extra["achieved_sparsity"] if structured else rep.global_sparsity
        return sp, time.time() - t

    def run_folder(self, key: str, method: str) -> Path:
        """Where row `key`'s agent run keeps its journal, report and plot: OUT.runs/PROTOCOL/KEY/METHOD (the
        method names an LLM row's controller, so another controller starts its own run)."""
        return Path(f"{self.args.out}.runs") / self.protocol / key / re.sub(r"[^\w.@-]+", "_", method).strip("_")

    def run_agent(self, key: str, method: str, target: float, controller: dict):
        """The agent loop for row `key`; a run cut off earlier (same protocol) resumes from its journal."""
        a = self.args
        self.fresh()
        cfg = AgentConfig(target_sparsity=target, max_iterations=a.max_iterations, device=a.device, save_model=False,
                          rollback_threshold=a.rollback_threshold, eval_tokens=a.agent_eval_tokens,
                          eval_seqlen=a.seqlen, grad_samples=a.agent_grad_samples, controller=controller,
                          calibration={"sources": ["web"], "n_samples": a.n_samples, "seqlen": a.seqlen})
        t = time.time()
        out = self.run_folder(key, method)
        resume = (out / "journal.jsonl").exists()
        if resume:
            print(f"row {key}: resuming the agent run in {out}", flush=True)
        res = run_agent(self.model, self.tok, cfg, out, calibration=self.cal.ids, held_out=self.cal.held_out,
                        resume=resume)
        print(f"agent ({controller['kind']}) target {target}: stop {res.stop_reason}, {res.iterations} iterations, "
              f"{res.rollbacks} rollbacks, held-out ppl {res.baseline_ppl:.3f} -> {res.final_ppl:.3f}", flush=True)
        return res.global_sparsity, time.time() - t, agent_stats(res)


def agent_stats(res) -> dict:
    """What the agent table shows of a run: iterations, rollbacks, and what the controller cost per decision."""
    rep = res.report
    st = rep["controller_stats"]
    steps = rep["trajectory"][1:]
    comp = [s["completion_tokens"] for s in steps if s.get("completion_tokens") is not None]
    asked = [s for s in steps if s["replies"]]
    for s in steps:
        print(f"  iter {s['iteration']} [{s['source']}] sparsity -> {s['sparsity_after']:.4f} ppl {s['ppl']:.3f} "
              f"({s['label']}) controller {s['controller_s']}s replies {s['replies']} tokens "
              f"{s['prompt_tokens']}/{s['completion_tokens']}", flush=True)
    return {"iterations": res.iterations, "rollbacks": res.rollbacks, "fallbacks": st["fallbacks"],
            "replies": f"{st['replies']} ({st['valid_replies']})" if st["replies"] else "-",
            "s_per_decision": round(sum(s["controller_s"] for s in asked) / len(asked), 1) if asked else "-",
            "prompt_tokens": st["prompt_tokens"] if st["prompt_tokens"] is not None else "-",
            "completion_tokens": sum(comp) if comp else "-", "controller_s": st["controller_s"],
            "stop_reason": res.stop_reason, "held_out_ppl": [res.baseline_ppl, res.final_ppl]}


def start_server(gguf: str, threads: int):
    """llama-cpp-python's OpenAI-compatible server on 127.0.0.1 (prunepilot.testing.llama_server)."""
    from prunepilot.testing.llama_server import LlamaServer

    server = LlamaServer(gguf, threads=threads, startup_timeout=300.0)
    server.start()  # bounded wait; stops the process itself when it does not come up
    return server


class Controllers:
    """The LLM controllers of the agent_llm / agent_self rows: a --base-url, or local servers started on demand."""

    def __init__(self, args, bench: Bench):
        self.args, self.bench = args, bench
        small = args.small_prompt == "yes" or (args.small_prompt == "auto" and not args.base_url)
        self.settings = {"kind": "openai", "model_name": args.model_name, "api_key_env": args.api_key_env,
                         "timeout_s": args.controller_timeout, "retries": 0 if not args.base_url else 2,
                         **(SMALL_PROMPT if small else {}), **json.loads(args.controller_json)}
        self.servers = {}
        self.notes = []

    def name(self, row: str) -> str:
        """The controller's name as the row's method shows it, known before any server starts."""
        if row == "agent_llm" and self.args.base_url:
            return self.args.model_name
        return Path(served_gguf(self.args, row)).stem

    def get(self, row: str) -> tuple[dict, str]:
        a = self.args
        if row == "agent_llm" and a.base_url:
            return {**self.settings, "base_url": a.base_url}, a.model_name
        gguf = served_gguf(self.args, row)
        if gguf not in self.servers:
            t = time.time()
            self.servers[gguf] = start_server(gguf, a.server_threads)
            shown = {k: v for k, v in self.settings.items() if k not in ("kind", "api_key_env")}
            self.notes.append(f"{row}: llama-cpp-python's server on 127.0.0.1 with {Path(gguf).name} "
                              f"({a.server_threads} threads, started in {time.time() - t:.0f}s), settings "
                              f"{json.dumps(shown)}")
            self.bench.llm_note = "; ".join(self.notes)
        return {**self.settings, "base_url": self.servers[gguf].url}, Path(gguf).stem

    def stop(self):
        for server in self.servers.values():
            server.stop()


PRUNES = {"wanda_sp": ("Wanda-sp (structured)", {"method": "wanda_sp"}, True, False),
          "flap": ("FLAP (structured)", {"method": "flap"}, True, False),
          "flap_md": ("FLAP multi-domain (one shot)", {"method": "flap", "calibration": {"sources": MULTI_DOMAIN},
                                                       "structured": {"domain_stats": "fused"}}, True, True),
          "flap_iter_web": ("FLAP iterative single-domain (web)",
                            {"method": "flap_iterative", "calibration": {"sources": ["web"]}}, True, True),
          "flap_iter": ("FLAP iterative multi-domain", {"method": "flap_iterative"}, True, True),
          "wanda": ("Wanda (uniform)", {"method": "wanda", "allocation": {"kind": "uniform"}}, False, False),
          "owl": ("Wanda + OWL", {"method": "wanda", "allocation": {"kind": "owl"}}, False, False)}


def run_row(b: Bench, ctl: Controllers, key: str, target: float, label: str, labels: list[str], first: bool):
    a = b.args
    if key in PRUNES:
        name, recipe, structured, own = PRUNES[key]
        if not b.done(f"{key}@{label}"):
            recipe = {**recipe, "sparsity": target}
            if own:
                recipe["calibration"] = {**recipe.get("calibration", {}), "n_samples": a.structured_samples}
            sp, s = b.run_prune(recipe, structured, own_calibration=own)
            b.record(f"{key}@{label}", [label], name, target, sp, s)
    elif key == "nm" and first:  # 50% by construction: once, shown in every table
        for pattern in a.nm_patterns.split(","):
            if not b.done(f"nm:{pattern}@0.5"):
                sp, s = b.run_prune({"method": "magnitude", "sparsity": 0.5, "pattern": pattern})
                b.record(f"nm:{pattern}@0.5", labels, f"magnitude {pattern}", 0.5, sp, s)
    elif key == "agent" and not b.done(f"agent@{label}"):
        sp, s, st = b.run_agent(f"agent@{label}", "agent (built-in)", target, {"kind": "builtin"})
        b.record(f"agent@{label}", [label], "agent (built-in)", target, sp, s, st)
    elif key == "agent_search" and not b.done(f"agent_search@{label}"):
        name = "agent (search: evo plan)"
        sp, s, st = b.run_agent(f"agent_search@{label}", name, target, {"kind": "plan", "plan": "evo"})
        b.record(f"agent_search@{label}", [label], name, target, sp, s, st)
    elif key in ("agent_llm", "agent_self"):
        name = f"agent ({'self' if key == 'agent_self' else 'LLM'}: {ctl.name(key)})"
        if not b.done(f"{key}@{label}", name):
            controller, _ = ctl.get(key)
            sp, s, st = b.run_agent(f"{key}@{label}", name, target, controller)
            b.record(f"{key}@{label}", [label], name, target, sp, s, st)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("prunepilot.agent").setLevel(logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    order = list(dict.fromkeys(filter(None, args.rows.split(","))))
    unknown = set(order) - set(ROWS)
    if unknown:
        raise SystemExit(f"unknown --rows {sorted(unknown)}; choose from {ROWS}")
    served = [r for r in order if r == "agent_self" or (r == "agent_llm" and not args.base_url)]
    for row in served:
        served_gguf(args, row)  # exits before minutes of loading, not at the row
    targets = [float(s) for s in args.sparsities.split(",")]
    labels = [f"{t:g}" for t in targets]
    b = Bench(args)
    ctl = Controllers(args, b)
    b.llm_note = "no LLM controller row in this run"
    try:
        if "dense" in order and not b.done("dense"):
            b.record("dense", labels, "dense", "-", 0.0, 0.0)
        for i, (target, label) in enumerate(zip(targets, labels)):
            for key in order:  # the order --rows gives them, so a cut-off run has the rows that matter most
                if key != "dense":
                    run_row(b, ctl, key, target, label, labels, i == 0)
    finally:
        ctl.stop()
    print(b.write(final=True), flush=True)


if __name__ == "__main__":
    main()
