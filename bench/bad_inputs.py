"""Sweep of bad invocations through the CLI: counts clean one-line errors, tracebacks, silent accepts and hangs.

    python bench/bad_inputs.py [--only SUBSTRING] [--timeout 60] [--verbose]

Every case is an invocation that must fail: hostile / damaged GGUF and safetensors files given to every command
that reads models, --offload disk on unusable checkpoints, unwritable or wrong --out paths, results with
non-numeric metrics, bad WORLD_SIZE, options the method ignores, --timeout inf, tampered journals. Each runs in a
forked child (prunepilot and torch imported once) with a time limit:

    clean      exit 2, last stderr line `prunepilot: error: ...`, no traceback
    traceback  an exception escaped `prunepilot.cli.main`
    silent     exit 0 (the bad input was accepted)
    hang       still running after --timeout seconds (killed)
    other      any other exit code or message

Runs against whichever prunepilot is importable (PYTHONPATH), so the same sweep measures a branch before and after.
Needs ../shared (stories260K) for a model with a tokenizer.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import select
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PRUNEPILOT_SHARED", REPO.parent / "shared"))
os.environ.setdefault("PRUNEPILOT_DATA", str(SHARED / "data"))  # cases that get as far as calibration find it
QUICK_PRUNE = ["--method", "magnitude", "--sparsity", "0.5", "--eval", "none", "--n-samples", "2", "--seqlen", "32",
               "--calib", "web"]
_SERIAL = itertools.count()  # a fresh agent --out per case (a journal there would need --resume)
QUICK_AGENT = ["--max-iterations", "1", "--n-samples", "2", "--seqlen", "32", "--eval-tokens", "256",
               "--eval-seqlen", "32", "--grad-samples", "0"]


def model_commands(model: str, work: Path, offload: bool = False) -> dict[str, list[str]]:
    cmds = {"eval": ["eval", model, "--ppl", "wikitext2", "--max-windows", "1", "--seqlen", "32"],
            "prune": ["prune", model, *QUICK_PRUNE, "--overwrite", "--out", str(work / "pruned")],
            "agent": ["agent", model, *QUICK_AGENT, "--out", str(work / f"agent-{next(_SERIAL)}")],
            "export": ["export", "gguf", model, "--overwrite", "--out", str(work / "x.gguf")]}
    if offload:
        cmds["prune --offload disk"] = cmds["prune"] + ["--offload", "disk"]
    return cmds


def _file_cases(work: Path, stories: Path) -> list[tuple[str, list[str], dict]]:
    from prunepilot.testing.hostile_files import GGUF_DAMAGE, SAFETENSORS_KINDS, hostile_gguf, hostile_safetensors

    cases = []
    for kind in sorted(GGUF_DAMAGE):
        folder = hostile_gguf(work / f"gguf-{kind}", kind)
        cases += [(f"gguf {kind}: {c}", argv, {}) for c, argv in model_commands(str(folder), work).items()]
    for kind in SAFETENSORS_KINDS:
        folder = hostile_safetensors(work / f"st-{kind}", kind, stories)
        cases += [(f"safetensors {kind}: {c}", argv, {})
                  for c, argv in model_commands(str(folder), work, offload=True).items()]
    empty, gguf_only = work / "empty", hostile_gguf(work / "gguf-only", "random-bytes")
    empty.mkdir()
    (gguf_only / "model.gguf").write_bytes((SHARED / "models" / "smollm2-135m-instruct" /
                                            "SmolLM2-135M-Instruct.Q4_1.gguf").read_bytes()[:4096])
    for name, folder in (("empty folder", empty), ("gguf-only folder", gguf_only)):
        cases.append((f"{name}: prune --offload disk", model_commands(str(folder), work, True)["prune --offload disk"],
                      {}))
    return cases


def _path_cases(work: Path, stories: str) -> list[tuple[str, list[str], dict]]:
    blocker = work / "a-file"
    blocker.write_text("x")
    cases = []
    for where, out in (("under /proc", "/proc/prunepilot-bad"), ("under a file", str(blocker / "out"))):
        cases += [(f"--out {where}: prune", ["prune", stories, *QUICK_PRUNE, "--out", out], {}),
                  (f"--out {where}: eval", ["eval", stories, "--ppl", "wikitext2", "--max-windows", "1", "--seqlen",
                                            "32", "--out", out + ".json"], {}),
                  (f"--out {where}: agent", ["agent", stories, *QUICK_AGENT, "--out", out], {}),
                  (f"--out {where}: export", ["export", "gguf", stories, "--out", out + ".gguf"], {})]
    cases.append(("eval --out EXISTING_DIR", ["eval", stories, "--ppl", "wikitext2", "--max-windows", "1",
                                              "--seqlen", "32", "--out", str(work)], {}))
    for name, doc in (("ppl string", {"model": "m", "perplexity": {"wikitext2": {"ppl": "abc"}}}),
                      ("acc string", {"model": "m", "results": {"arc_easy": {"acc": "high"}}}),
                      ("main not a name", {"model": "m", "results": {"arc_easy": {"acc": 0.5, "main": 3}}})):
        f = work / f"result-{name.replace(' ', '-')}.json"
        f.write_text(json.dumps(doc))
        cases.append((f"report {name}", ["report", str(f), "--out", str(work / "cmp")], {}))
    deep = work / "result-deep.json"
    deep.write_text('{"model": "m", "results": ' + "[" * 100_000 + "]" * 100_000 + "}")
    cases.append(("report deep JSON", ["report", str(deep), "--out", str(work / "cmp")], {}))
    result = work / "result-ok.json"
    result.write_text(json.dumps({"model": "m", "perplexity": {"wikitext2": {"ppl": 3.0}}}))
    cases.append(("report --out under /proc", ["report", str(result), "--out", "/proc/prunepilot-cmp"], {}))
    return cases


def _option_cases(work: Path, stories: str) -> list[tuple[str, list[str], dict]]:
    cases = []
    prune = ["prune", stories, "--sparsity", "0.3", "--eval", "none", "--n-samples", "2", "--seqlen", "32",
             "--calib", "web", "--overwrite", "--out", str(work / "opt")]  # --overwrite: a case that ran does
    #                                                                       not make the next one fail
    for env in ({"WORLD_SIZE": "2"}, {"WORLD_SIZE": "abc"}, {"WORLD_SIZE": "0"}, {"WORLD_SIZE": "-1"}):
        cases += [(f"WORLD_SIZE={env['WORLD_SIZE']}: prune", prune + ["--method", "magnitude"], env),
                  (f"WORLD_SIZE={env['WORLD_SIZE']}: methods", ["methods"], env)]
    for flags in (["--method", "wanda", "--ratios", "uniform"], ["--method", "wanda", "--domain-stats", "fused"],
                  ["--method", "magnitude", "--remove-experts", "0.25"], ["--method", "flap", "--allocation", "owl"],
                  ["--method", "flap", "--steps", "3"], ["--method", "wanda", "--allocation", "explicit"],
                  ["--method", "flap", "--remove-experts", "0.25"]):
        cases.append((f"ignored option: {' '.join(flags)}", prune + flags, {}))
    for value in ("inf", "nan"):
        cases.append((f"agent --timeout {value}", ["agent", stories, "--controller", "openai", "--base-url",
                                                   "http://127.0.0.1:9/v1", "--model-name", "m", "--timeout", value,
                                                   "--out", str(work / f"t-{value}")], {}))
    for name, line in (("nested 100,000 deep", "[" * 100_000 + "]" * 100_000), ("not JSON", "{oops")):
        run = work / f"journal-{len(cases)}"
        run.mkdir()
        (run / "journal.jsonl").write_text('{"type": "header", "version": 2}\n' + line + '\n{"type": "x"}\n')
        cases.append((f"agent --resume, journal line {name}", ["agent", stories, "--out", str(run), "--resume"], {}))
    return cases


def run_case(argv: list[str], env: dict, timeout: float) -> tuple[str, str, float]:
    """(outcome, last stderr line, seconds) of `prunepilot ARGV` in a forked child."""
    err_r, err_w = os.pipe()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:  # child
        os.dup2(err_w, 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        os.environ.update(env)
        code = 3
        try:
            from prunepilot.cli import main

            code = main(argv)
        except SystemExit as e:  # argparse
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001 - what the sweep counts
            traceback.print_exc()
            print("SWEEP-TRACEBACK", file=sys.stderr)
            code = 99
        sys.stderr.flush()
        os._exit(code)
    os.close(err_w)
    chunks, deadline = [], t0 + timeout
    while True:
        ready, _, _ = select.select([err_r], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(err_r)
            return "hang", "", time.monotonic() - t0
        data = os.read(err_r, 65536)
        if not data:
            break
        chunks.append(data)
    _, status = os.waitpid(pid, 0)
    os.close(err_r)
    return _classify(os.waitstatus_to_exitcode(status), b"".join(chunks).decode(errors="replace")), \
        _last_line(b"".join(chunks).decode(errors="replace")), time.monotonic() - t0


def _last_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip() and line != "SWEEP-TRACEBACK"]
    return lines[-1][:200] if lines else ""


def _classify(rc: int, err: str) -> str:
    if "SWEEP-TRACEBACK" in err or "Traceback (most recent call last)" in err:
        return "traceback"
    if rc == 0:
        return "silent"
    last = _last_line(err)
    if rc == 2 and last.startswith("prunepilot") and ": error: " in last:  # ours, or argparse's usage error
        return "clean"
    return "other"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="run the cases whose name contains this")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per case before it counts as a hang")
    ap.add_argument("--verbose", action="store_true", help="print every case, not only the failures")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    import importlib

    for module in ("transformers", "gguf", "prunepilot.cli", "prunepilot.modeling", "prunepilot.api",
                   "prunepilot.agent.loop", "prunepilot.agent.controllers", "prunepilot.export.writer",
                   "prunepilot.eval.perplexity", "prunepilot.compare", "prunepilot.engine.offload"):
        try:  # imported once, before forking (a module missing in an older version is skipped)
            importlib.import_module(module)
        except ImportError:
            pass

    stories = SHARED / "models" / "stories260K"
    work = Path(tempfile.mkdtemp(prefix="prunepilot-bad-inputs-"))
    cases = _file_cases(work, stories) + _path_cases(work, str(stories)) + _option_cases(work, str(stories))
    cases = [c for c in cases if not args.only or args.only in c[0]]
    counts = Counter()
    for name, argv, env in cases:
        outcome, last, seconds = run_case(argv, env, args.timeout)
        counts[outcome] += 1
        if args.verbose or outcome != "clean":
            print(f"{outcome:9s} {seconds:6.1f}s  {name}  | {last}")
    print(json.dumps({"cases": len(cases), **{k: counts.get(k, 0) for k in
                                                 ("clean", "traceback", "silent", "hang", "other")}}))
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 0 if counts["clean"] == len(cases) else 1


if __name__ == "__main__":
    sys.exit(main())
