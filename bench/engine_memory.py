"""Peak memory of the sequential engine versus the number of decoder layers.

Each configuration runs in a fresh subprocess: build a Llama-shaped model with L layers (random weights),
draw calibration ids, record the resident set size (RSS) high-water mark, prune with SparseGPT (the method
with the largest per-layer state), and report the peak *above* the pre-pruning level. With one block
processed at a time and its statistics freed before the next, this overhead must not grow with L.

    python bench/engine_memory.py --layers 2 4 8 16
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, torch, transformers as tf
from prunepilot.api import prune
L, hidden, inter, n, seq, method = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
torch.manual_seed(0)
cfg = tf.LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=L,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq)
model = tf.AutoModelForCausalLM.from_config(cfg).eval()
ids = torch.randint(0, 256, (n, seq))
with torch.no_grad():
    model(ids[:1])  # warm up the allocator and kernels
def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
before = rss_mb()
prune(model, {"method": method, "sparsity": 0.5, "device": "cpu", "calibration": {"batch_size": 4}}, calibration=ids)
print(json.dumps({"layers": L, "model_mb": sum(p.numel() for p in model.parameters()) * 4 / 2**20,
                  "rss_before_mb": before, "peak_overhead_mb": rss_mb() - before}))
"""


def measure(layers: int, hidden=256, inter=512, n=32, seq=512, method="sparsegpt") -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(layers), str(hidden), str(inter), str(n), str(seq), method],
                         capture_output=True, text=True, check=True, env={"TQDM_DISABLE": "1", "PATH": ""})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--method", default="sparsegpt")
    args = ap.parse_args()
    print("| layers | model MB | peak RSS over pre-pruning level, MB |\n|---|---|---|")
    for L in args.layers:
        r = measure(L, method=args.method)
        print(f"| {L} | {r['model_mb']:.1f} | {r['peak_overhead_mb']:.1f} |", flush=True)
    print(f"\nProtocol: Llama config hidden 256, FFN 512, 4 heads/2 KV, random weights; {args.method} 50%, "
          "32 calibration samples x 512 tokens, batch 4, CPU; ru_maxrss in a fresh process per row.")


if __name__ == "__main__":
    main()
