"""`prunepilot export gguf MODEL_OR_RUN --out FILE [--type f16|q8_0] [--overwrite]`

Wiring (prunepilot.cli): ``add_export_parser(subparsers)`` registers the sub-command (dest command = "export",
format in args.format); ``run_export(args) -> int`` runs it. User errors raise PrunepilotError (one line,
exit code 2), before anything is loaded where they can be seen from the arguments alone.
"""
from __future__ import annotations

import argparse
import json

from ..errors import PrunepilotError


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("export", help="write a (pruned) model in a format other runtimes load (GGUF)")
    formats = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    g = formats.add_parser(
        "gguf", help="one GGUF file for llama.cpp / LM Studio / Ollama-style runtimes",
        description="Write MODEL_OR_RUN as one GGUF file. Per-layer widths (FLAP's global ranking) are written "
                    "as llama.cpp's deci architecture, uniform ones as llama (or qwen2 / qwen3); FLAP's "
                    "compensation biases become attn_output.bias / ffn_down.bias. The tokenizer is copied "
                    "from the GGUF the model came from, or built from its Hugging Face tokenizer files.")
    g.add_argument("model", metavar="MODEL_OR_RUN",
                   help="model folder (safetensors, incl. prunepilot's per-layer-width ones), GGUF folder or file, "
                        "or a `prunepilot prune` output folder (its model/ is exported)")
    g.add_argument("--out", required=True, help="the .gguf file to write")
    g.add_argument("--type", default="f16", choices=["f16", "q8_0"],
                   help="matrix storage: f16 (default) or q8_0 (about half the size; rows whose length is not a "
                        "multiple of 32 stay f16)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    return p


def run_export(args) -> int:
    from .writer import export_gguf

    if args.format != "gguf":
        raise PrunepilotError(f"unknown export format {args.format!r}")
    summary = export_gguf(args.model, args.out, file_type=args.type, overwrite=args.overwrite)
    print(json.dumps(summary))
    return 0
