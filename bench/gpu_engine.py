"""The engine at full scale on a GPU: prune time and peak memory for an 8B-shaped Qwen3 (random weights), and
the generation speed of structurally pruned models against the dense one.

Quality needs real weights and is measured on SmolLM2-135M on the CPU (the other bench scripts); this script
answers the scale questions: does each method fit and how long does it take on an 8B model, what does the
sequential engine add on top of the model's own memory, and how much faster is a model with 20% / 50% of its
block parameters physically removed. The model is built from its config directly on the GPU with random
weights (seeded: every method starts from the same weights); calibration is random token ids.

    python bench/gpu_engine.py --out docs/bench/gpu_engine.md                 # Qwen3-8B shape, bf16
    python bench/gpu_engine.py --shape tiny --device cpu --n-samples 2 --seqlen 64   # smoke run

Memory: peak of torch.cuda.max_memory_allocated during prune() minus what was allocated before it (the
model itself), i.e. the engine's working set: calibration activations of one block, statistics, scratch.
Speed: prefill (--prefill-batch x --prefill-seq tokens) and decode (--speed-new greedy steps at batch 1 with
the KV cache), medians of alternating dense/pruned runs, as ratios and as tokens per second on this GPU.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from common import md_table, publish  # noqa: E402

from prunepilot.api import prune  # noqa: E402
from prunepilot.eval.speed import measure_speed  # noqa: E402

# Qwen3-8B's published config (hidden 4096, FFN 12288, 36 layers, 32 query / 8 KV heads of 128, vocab 151,936)
SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=151936),
    "32b": dict(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64,
                num_key_value_heads=8, head_dim=128, vocab_size=151936),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=512),
}
# method:pattern:sparsity[@channel_multiple]
CONFIGS = "wanda:unstructured:0.5,sparsegpt:unstructured:0.5,wanda:2:4:0.5,sparsegpt:2:4:0.5," \
          "flap:unstructured:0.2,flap:unstructured:0.2@128,flap_iterative:unstructured:0.2@128,flap:unstructured:0.5@128"


def build(shape: str, dtype: torch.dtype, device: str, seed: int = 0):
    import transformers as tf

    cfg = tf.Qwen3Config(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def parse_configs(text: str) -> list[tuple[str, str, float, int]]:
    out = []
    for entry in text.split(","):
        entry, _, multiple = entry.partition("@")
        method, rest = entry.split(":", 1)
        pattern, sparsity = rest.rsplit(":", 1)
        out.append((method, pattern, float(sparsity), int(multiple or 1)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="8b")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--configs", default=CONFIGS, help="method:pattern:sparsity,... (structured: pattern unstructured)")
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=4, help="calibration rows per forward")
    ap.add_argument("--prefill-batch", type=int, default=8)
    ap.add_argument("--prefill-seq", type=int, default=1024)
    ap.add_argument("--speed-new", type=int, default=64, help="decode steps (batch 1, after a 128-token prompt)")
    ap.add_argument("--speed-repeats", type=int, default=5)
    ap.add_argument("--out", help="markdown table (atomic write); a .jsonl with one record per row is written beside")
    ap.add_argument("--render", type=Path, metavar="JSONL",
                    help="print the table of an earlier run's records (with --gpu naming its device) and exit")
    ap.add_argument("--gpu", default="the GPU", help="--render: the device the records were measured on")
    ap.add_argument("--torch", default=torch.__version__, help="--render: the torch version of that run")
    args = ap.parse_args()
    if args.render:
        records = [json.loads(x) for x in args.render.read_text().splitlines() if x.strip()]
        if not records:
            sys.exit(f"gpu_engine: no records in {args.render}")
        publish(table_of(records), protocol_of(args, records, args.gpu, args.render), args.out)
        return
    dtype = getattr(torch, args.dtype)
    cuda = torch.device(args.device).type == "cuda"
    configs = parse_configs(args.configs)
    ids = torch.randint(0, SHAPES[args.shape]["vocab_size"], (args.n_samples, args.seqlen),
                        generator=torch.Generator().manual_seed(0))
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"{args.shape}-shaped Qwen3, {args.dtype}, {gpu}, torch {torch.__version__}", flush=True)

    def speed(model) -> dict:
        prefill = measure_speed(model, args.prefill_seq, args.prefill_batch, 0, repeats=1, warmup=0)
        decode = measure_speed(model, 128, 1, args.speed_new, repeats=1, warmup=0)
        return {"prefill_tok_s": prefill["prefill_tok_s"], "decode_tok_s": decode["decode_tok_s"]}

    dense = None
    if any(m.startswith("flap") or m.endswith("_sp") for m, _, _, _ in configs):
        dense = build(args.shape, dtype, args.device)  # kept for the alternating speed pairs
        speed(dense)
        speed(dense)
    records = []
    jsonl = Path(args.out).with_suffix(".jsonl") if args.out else None
    if jsonl:
        jsonl.parent.mkdir(parents=True, exist_ok=True)
        jsonl.unlink(missing_ok=True)
    for method, pattern, sparsity, multiple in configs:
        model = build(args.shape, dtype, args.device)
        params_before = n_params(model)
        model_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if cuda else 0
        recipe = {"method": method, "sparsity": sparsity, "pattern": pattern, "device": args.device,
                  "calibration": {"batch_size": args.batch_size}}
        if multiple > 1:
            recipe["structured"] = {"channel_multiple": multiple}
        t0 = time.time()
        rep = prune(model, recipe, calibration=ids)
        if cuda:
            torch.cuda.synchronize()
        prune_s = time.time() - t0
        peak_gib = (torch.cuda.max_memory_allocated() - before) / 2**30 if cuda else float("nan")
        model.to(args.device)
        widths = [layer["intermediate_size"] for layer in rep.extra.get("layers", [])]
        rec = {"method": method, "pattern": pattern, "sparsity": sparsity, "channel_multiple": multiple,
               "gpu": gpu, "torch": torch.__version__,
               "prune_s": round(prune_s, 1), "engine_peak_gib": round(peak_gib, 2), "model_gib": round(model_gib, 2),
               "mlp_widths": [min(widths), max(widths), sum(w % 128 == 0 for w in widths)] if widths else None,
               "params_before": params_before, "params_after": n_params(model),
               "global_sparsity": round(rep.global_sparsity, 4) if rep.layers else None,
               "achieved_sparsity": rep.extra.get("achieved_sparsity")}
        if dense is not None and rec["params_after"] < params_before:
            speed(model)
            pairs = [(speed(dense), speed(model)) for _ in range(args.speed_repeats)]
            for k in ("prefill_tok_s", "decode_tok_s"):
                rec[f"dense_{k}"] = round(statistics.median(d[k] for d, _ in pairs), 1)
                rec[k] = round(statistics.median(p[k] for _, p in pairs), 1)
                rec[f"{k.split('_')[0]}_speedup"] = round(statistics.median(p[k] / d[k] for d, p in pairs), 3)
        print(json.dumps(rec), flush=True)
        records.append(rec)
        if jsonl:
            with open(jsonl, "a") as f:
                f.write(json.dumps(rec) + "\n")
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    publish(table_of(records), protocol_of(args, records, gpu, jsonl), args.out)


def table_of(records: list[dict]) -> str:
    rows = [[r["method"] + (f" (widths x{r['channel_multiple']})" if r.get("channel_multiple", 1) > 1 else ""),
             r["pattern"], f"{r['sparsity']:.0%}", r["prune_s"], r["engine_peak_gib"], f"{r['params_after'] / 1e9:.2f}",
             str(r["mlp_widths"][:2]) if r.get("mlp_widths") else "-", r.get("prefill_speedup", "-"),
             r.get("decode_speedup", "-")] for r in records]
    return md_table(["method", "pattern", "sparsity", "prune (s)", "engine peak over the model (GiB)",
                     "params after (B)", "MLP widths (min, max)", "prefill speed-up", "decode speed-up"], rows)


def protocol_of(args, records: list[dict], gpu: str, jsonl: Path | None) -> str:
    model_gib = records[0]["model_gib"] if records else 0
    gpu_name = gpu
    return (f"{args.shape}-shaped Qwen3 ({records[0]['params_before'] / 1e9:.2f}B parameters, {args.dtype}, "
                f"{model_gib} GiB on the device), random weights built on {gpu_name}; calibration {args.n_samples} x "
                f"{args.seqlen} random tokens, {args.batch_size} rows per forward; torch {args.torch}. Structured "
                f"sparsity = fraction of the decoder blocks' linear parameters removed; 'widths xN' = "
                f"structured.channel_multiple N. Speed (eager PyTorch, no CUDA graphs): prefill {args.prefill_batch} x "
                f"{args.prefill_seq} tokens; decode {args.speed_new} greedy steps at batch 1 after 128 tokens; medians of "
                f"{args.speed_repeats} alternating dense/pruned pairs. Raw records (MLP widths: min, max, layers at a "
                f"multiple of 128): {jsonl.name if jsonl else 'stdout'}.")


if __name__ == "__main__":
    main()
