"""Host memory of `prunepilot prune` with the model in memory versus `--offload disk` (blocks read one at a time).

Builds a Llama-shaped model with random weights (stories260K's 512-token tokenizer, so the embeddings are small and
the decoder blocks are nearly all of it), saves it as sharded safetensors, then runs the same `prune` command twice,
each in a fresh process: peak resident set size (ru_maxrss of that process), wall time, and whether the two saved
models are equal tensor for tensor.

    python bench/offload_memory.py --out docs/bench/offload_memory.md
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine, md_table, publish, shared_dir

WRAP = r"""
import resource, subprocess, sys
rc = subprocess.run(sys.argv[1:]).returncode
print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "RC", rc)
"""


def build(folder: Path, layers: int, hidden: int, inter: int) -> float:
    import torch
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                         max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(folder, max_shard_size="200MB")
    shutil.copy(shared_dir() / "models" / "stories260K" / "tok512.model", folder / "tok512.model")
    return sum(p.numel() for p in model.parameters()) * 4 / 2**20


def run(model: Path, out: Path, offload: bool, threads: int) -> dict:
    cmd = [sys.executable, "-m", "prunepilot", "prune", str(model), "--method", "wanda", "--sparsity", "0.5",
           "--calib", "tinystories", "--n-samples", "8", "--seqlen", "128", "--eval", "tinystories",
           "--eval-seqlen", "128", "--eval-max-windows", "4", "--device", "cpu", "--out", str(out)]
    if offload:
        cmd += ["--offload", "disk"]
    env = {"TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(threads), "PATH": "/usr/bin:/bin"}
    t0 = time.time()
    res = subprocess.run([sys.executable, "-c", WRAP, *cmd], capture_output=True, text=True, env=env)
    wall = time.time() - t0
    last = res.stdout.strip().splitlines()[-1].split()
    if last[3] != "0":
        raise SystemExit(f"prune failed ({'offload' if offload else 'in memory'}):\n{res.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    return {"rss_mb": int(last[1]) / 1024, "wall_s": wall, "ppl": report["perplexity_after"]["tinystories"]["ppl"]}


def equal_models(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    def tensors(folder):
        out = {}
        for f in sorted((folder / "model").glob("*.safetensors")):
            out.update(load_file(f))
        return out

    x, y = tensors(a), tensors(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        tmp = Path(tmp)
        size_mb = build(tmp / "model", args.layers, args.hidden, args.intermediate)
        mem = run(tmp / "model", tmp / "in_memory", False, args.threads)
        off = run(tmp / "model", tmp / "offload", True, args.threads)
        same = equal_models(tmp / "in_memory", tmp / "offload")
    rows = [["in memory", f"{mem['rss_mb']:.0f}", f"{mem['wall_s']:.1f}", f"{mem['ppl']:.4f}", "-"],
            ["--offload disk", f"{off['rss_mb']:.0f}", f"{off['wall_s']:.1f}", f"{off['ppl']:.4f}",
             "yes" if same else "NO"]]
    publish(md_table(["run", "peak RSS (MB)", "wall s", "tinystories ppl after", "saved tensors equal"], rows),
            f"Llama-shaped model with random weights, {args.layers} layers, hidden {args.hidden}, intermediate "
            f"{args.intermediate}, vocab 512 (tied): {size_mb:.0f} MB of float32 weights, saved in 200 MB shards; "
            f"`prunepilot prune --method wanda --sparsity 0.5`, calibration 8 x 128 tinystories tokens, perplexity "
            f"before and after on 4 x 128 tokens, saved model; peak RSS = ru_maxrss of the prune process; "
            f"{args.threads} thread(s); {machine()}", args.out)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
