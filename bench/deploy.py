"""Issue 14 benchmark: pruned SmolLM2-135M as files other runtimes use (safetensors, GGUF f16 / q8_0 in llama.cpp).

Rows: dense; Wanda 50% unstructured; FLAP 20% (one-shot, web calibration) and iterative multi-domain FLAP 50%
(wiki+web+code+math, --steps steps), each with global ranking (per-layer widths: GGUF arch deci) and uniform
ratios (the same widths in every layer: GGUF arch llama, plain from_pretrained loads the safetensors).

For every row: size on disk of the safetensors folder prunepilot saves (float32, as loaded) and of the GGUF
exports (f16, q8_0; tokenizer copied from the source GGUF); WikiText-2 test perplexity from prunepilot
(transformers, float32) and from llama.cpp (llama-cpp-python, the same token ids: rows joined with "\\n\\n",
tokenized once, the first W non-overlapping windows of L tokens, each window scored from its first token);
llama.cpp prompt (prefill) and generation tokens/s of each pruned model as a ratio to the dense GGUF of the
same type, measured in alternating dense/pruned pairs with the same thread count (median of the pair ratios).
A second table: the quality cost of uniform widths vs global ranking on WikiText-2, C4 held-out (docs
150-199) and CodeParrot test (prunepilot perplexity, same windows).

    python bench/deploy.py                                       # defaults: 8 + 2 windows, about 15-20 min
    python bench/deploy.py --max-windows 16 --cpp-windows 4 --out docs/bench/deploy.md   # docs/RESULTS.md section 8
"""
from __future__ import annotations

import argparse
import copy
import logging
import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import machine, md_table, publish, smollm2_path

from prunepilot.api import prune
from prunepilot.data import TextSource, load_documents, tokenize_stream
from prunepilot.eval.perplexity import perplexity_of_tokens
from prunepilot.export import export_gguf
from prunepilot.export.vocab import gguf_tokenizer
from prunepilot.engine.layout import model_widths
from prunepilot.modeling import load_model_and_tokenizer, save_pruned
from prunepilot.structured.saving import WIDTHS_FILE

EVALS = [("wikitext2", "wikitext2"), ("c4", "c4"), ("code", "code-test")]


def rows(args) -> list[tuple[str, dict | None]]:
    flap_cal = {"n_samples": args.n_samples, "seqlen": 128, "batch_size": 8}
    wanda = {"method": "wanda", "sparsity": 0.5, "calibration": {"sources": ["web"], "n_samples": args.wanda_samples,
                                                                  "seqlen": args.wanda_seqlen, "batch_size": 4}}
    out = [("dense", None), ("wanda 50% unstructured", wanda)]
    for ratios, multiple in (("global", 1), ("global", 64), ("uniform", 1)):
        name = f"flap 20% {ratios}" + (f" x{multiple}" if multiple > 1 else "")
        out.append((name, {"method": "flap", "sparsity": 0.2, "calibration": flap_cal,
                           "structured": {"ratios": ratios, "channel_multiple": multiple}}))
    for ratios in ("global", "uniform"):
        out.append((f"flap_iterative 50% {ratios}", {"method": "flap_iterative", "sparsity": 0.5,
                                                     "calibration": flap_cal,
                                                     "structured": {"ratios": ratios, "steps": args.steps}}))
    return out


# ------------------------------------------------------------------------------------------------ llama.cpp

def cpp_model(path: Path, n_ctx: int, threads: int, logits_all: bool):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                           n_threads_batch=threads, logits_all=logits_all, verbose=False)


def cpp_perplexity(path: Path, windows: torch.Tensor, threads: int) -> float:
    """exp(mean next-token NLL) over windows (n, seqlen), each scored from a fresh context, as prunepilot does."""
    n, seqlen = windows.shape
    llm = cpp_model(path, seqlen, threads, logits_all=True)
    total = 0.0
    for w in windows.tolist():
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[:seqlen], dtype=np.float64)          # (seqlen, vocab)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        total -= logp[np.arange(seqlen - 1), w[1:]].sum()
    llm.close()
    return math.exp(total / (n * (seqlen - 1)))


def cpp_speed_once(llm, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(prompt tokens/s, generated tokens/s) of one greedy generation after `prompt`."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), new_tokens / (t2 - t1)


def cpp_speed_ratios(dense: Path, pruned: Path, args) -> tuple[float, float, tuple[float, float]]:
    """Median over alternating (dense, pruned) runs of pruned / dense (prompt, generation) tokens/s."""
    prompt = torch.randint(0, 49152, (args.speed_prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    n_ctx = args.speed_prompt + args.speed_new + 8
    a, b = (cpp_model(p, n_ctx, args.threads, logits_all=False) for p in (dense, pruned))
    cpp_speed_once(a, prompt[:16], 2), cpp_speed_once(b, prompt[:16], 2)  # warm-up
    pairs = [(cpp_speed_once(a, prompt, args.speed_new), cpp_speed_once(b, prompt, args.speed_new))
             for _ in range(args.speed_repeats)]
    a.close(), b.close()
    ratios = [statistics.median(p[k] / d[k] for d, p in pairs) for k in (0, 1)]
    dense_abs = tuple(statistics.median(d[k] for d, _ in pairs) for k in (0, 1))
    return ratios[0], ratios[1], dense_abs


# ------------------------------------------------------------------------------------------------- one row

def size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.iterdir() if p.suffix in (".safetensors", ".json")
                                           and p.name.startswith(("model", "config", WIDTHS_FILE))]
    return sum(p.stat().st_size for p in files) / 1e6


def build_row(name, recipe, dense_model, tok, work: Path, vocab, streams, args) -> dict:
    model = copy.deepcopy(dense_model)
    t0 = time.time()
    if recipe is not None:
        prune(model, {**recipe, "device": "cpu"}, tok)
    prune_s = time.time() - t0
    folder = work / name.replace(" ", "_").replace("%", "") / "model"
    save_pruned(model, tok, folder)
    ggufs = {}
    for ft in ("f16", "q8_0"):
        ggufs[ft] = folder.parent / f"model.{ft}.gguf"
        arch = export_gguf(folder, ggufs[ft], file_type=ft, vocab=vocab)["arch"]
    ppl = {n: perplexity_of_tokens(model, streams[n], args.eval_seqlen, max_windows=args.max_windows)
           for n, _ in EVALS}
    same = perplexity_of_tokens(model, streams["wikitext2"], args.eval_seqlen, max_windows=args.cpp_windows)
    windows = streams["wikitext2"][: same["windows"] * args.eval_seqlen].view(-1, args.eval_seqlen)
    widths = [w["intermediate_size"] for w in model_widths(model)[2]]
    row = {"name": name, "params": sum(p.numel() for p in model.parameters()) / 1e6, "arch": arch,
           "plain": not (folder / WIDTHS_FILE).exists(), "mlp": (min(widths), max(widths)),
           "st_mb": size_mb(folder), "gguf": ggufs, "f16_mb": size_mb(ggufs["f16"]), "q8_mb": size_mb(ggufs["q8_0"]),
           "ppl": {n: r["ppl"] for n, r in ppl.items()}, "proto": {**ppl, "same": same}, "prune_s": prune_s,
           "pp_same": same["ppl"],
           "cpp_f16": cpp_perplexity(ggufs["f16"], windows, args.threads),
           "cpp_q8": cpp_perplexity(ggufs["q8_0"], windows, args.threads)}
    print(f"{name}: {arch}, pp {row['pp_same']:.3f} llama.cpp f16 {row['cpp_f16']:.3f} q8_0 "
          f"{row['cpp_q8']:.3f} (prune {prune_s:.0f}s)", flush=True)
    del model
    return row


# ------------------------------------------------------------------------------------------------ tables

def deploy_table(rows_: list[dict]) -> str:
    headers = ["model", "params (M)", "GGUF arch", "plain from_pretrained", "safetensors MB", "GGUF f16 MB",
               "GGUF q8_0 MB", "wikitext2 ppl (prunepilot)", "llama.cpp f16 ppl", "f16 diff %", "llama.cpp q8_0 ppl",
               "prompt x (f16)", "gen x (f16)", "prompt x (q8_0)", "gen x (q8_0)"]
    body = []
    for r in rows_:
        sp = r.get("speed", {})
        body.append([r["name"], f"{r['params']:.1f}", r["arch"], "yes" if r["plain"] else "no", f"{r['st_mb']:.0f}",
                     f"{r['f16_mb']:.0f}", f"{r['q8_mb']:.0f}", r["pp_same"], r["cpp_f16"],
                     f"{100 * (r['cpp_f16'] / r['pp_same'] - 1):+.2f}", r["cpp_q8"],
                     *(f"{sp[k]:.2f}" if k in sp else "1.00" for k in ("f16_p", "f16_g", "q8_p", "q8_g"))])
    return md_table(headers, body)


def uniform_table(rows_: list[dict]) -> str:
    headers = ["removed", "method", "ratios", "MLP widths (min, max)", "wikitext2 ppl", "c4 ppl", "code ppl",
               "wikitext2 vs global", "c4 vs global", "code vs global"]
    by_name = {r["name"]: r for r in rows_}
    body = []
    for base in ("flap 20%", "flap_iterative 50%"):
        g = by_name.get(f"{base} global")
        for suffix in ("global", "global x64", "uniform"):
            r = by_name.get(f"{base} {suffix}")
            if r is None:
                continue
            cost = [f"{100 * (r['ppl'][n] / g['ppl'][n] - 1):+.1f}%" if (r is not g and g) else "-" for n, _ in EVALS]
            method, removed = base.split(" ")
            body.append([removed, method, suffix, str(r["mlp"]), *(r["ppl"][n] for n, _ in EVALS), *cost])
    return md_table(headers, body)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=smollm2_path())
    ap.add_argument("--n-samples", type=int, default=64, help="FLAP-family calibration samples (x 128 tokens)")
    ap.add_argument("--wanda-samples", type=int, default=16)
    ap.add_argument("--wanda-seqlen", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5, help="flap_iterative steps")
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=8, help="prunepilot perplexity windows per set")
    ap.add_argument("--cpp-windows", type=int, default=2,
                    help="WikiText-2 windows scored by llama.cpp (f16 and q8_0) and by prunepilot for the comparison")
    ap.add_argument("--speed-prompt", type=int, default=128)
    ap.add_argument("--speed-new", type=int, default=16)
    ap.add_argument("--speed-repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch and llama.cpp threads (1: OpenMP threads spin against each other on a busy 2-core box)")
    ap.add_argument("--rows", help="comma-separated row names to run (default all); dense always runs")
    ap.add_argument("--work", help="folder for the saved models and GGUFs (default: a temporary folder)")
    ap.add_argument("--out")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="pp-deploy-"))
    dense_model, tok = load_model_and_tokenizer(args.model)
    src_gguf = next(Path(args.model).glob("*.gguf"))
    vocab = gguf_tokenizer(src_gguf)
    streams = {n: tokenize_stream(tok, load_documents(TextSource.parse(s)), add_special_tokens=True) for n, s in EVALS}
    wanted = None if not args.rows else {r.strip() for r in args.rows.split(",")} | {"dense"}
    results = []
    for name, recipe in rows(args):
        if wanted is None or name in wanted:
            results.append(build_row(name, recipe, dense_model, tok, work, vocab, streams, args))
    dense_abs = add_speed(results, args)
    publish(deploy_table(results) + "\n\nUniform widths vs global ranking (prunepilot perplexity, same windows):\n\n"
            + uniform_table(results), protocol(results[0], dense_abs, args), args.out)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


def add_speed(results: list[dict], args) -> dict:
    """llama.cpp speed ratios of every pruned row vs the dense row (f16 and q8_0); returns dense tokens/s."""
    dense, dense_abs = results[0], {}
    for r in results[1:]:
        r["speed"] = {}
        for ft, key in (("f16", "f16"), ("q8_0", "q8")):
            p, g, dense_abs[ft] = cpp_speed_ratios(dense["gguf"][ft], r["gguf"][ft], args)
            r["speed"][f"{key}_p"], r["speed"][f"{key}_g"] = p, g
        print(f"{r['name']}: llama.cpp speed {r['speed']}", flush=True)
    return dense_abs


def protocol(dense: dict, dense_abs: dict, args) -> str:
    import llama_cpp

    p = dense["proto"]
    evals = "; ".join(f"{n}: seqlen {p[n]['seqlen']}, {p[n]['windows']} windows = {p[n]['tokens']} scored tokens"
                      for n, _ in EVALS)
    same = p["same"]
    f16, q8 = dense_abs.get("f16", (0, 0)), dense_abs.get("q8_0", (0, 0))
    return (f"model {args.model} (GGUF Q4_1, dequantized to float32 at load); calibration: Wanda web (C4 docs "
            f"0-149) {args.wanda_samples} x {args.wanda_seqlen} tokens; flap web, flap_iterative wiki+web+code+math "
            f"with {args.steps} steps, {args.n_samples} x 128 tokens; seed 0; 'x64' = --channel-multiple 64. "
            f"prunepilot perplexity (float32): {evals}. llama.cpp vs prunepilot columns: WikiText-2 test, the same "
            f"first {same['windows']} windows of {same['seqlen']} token ids = {same['tokens']} scored tokens, each "
            f"window a fresh context. safetensors = the model/ folder prunepilot saves (float32); GGUF = `prunepilot "
            f"export gguf` (tokenizer copied from the source GGUF). Speed: llama-cpp-python {llama_cpp.__version__} "
            f"(CPU build, GGML_NATIVE=OFF), {args.threads} thread(s), prompt {args.speed_prompt} tokens then "
            f"{args.speed_new} greedy tokens, batch 1, ratio to the dense GGUF of the same type, median of "
            f"{args.speed_repeats} alternating dense/pruned pairs; dense about {f16[0]:.0f} prompt / {f16[1]:.1f} "
            f"generation tok/s (f16), {q8[0]:.0f} / {q8[1]:.1f} (q8_0). {machine()}")


if __name__ == "__main__":
    main()
