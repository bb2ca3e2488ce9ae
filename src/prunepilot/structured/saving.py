"""The per-layer widths format of structurally pruned models: ``prunepilot_widths.json`` beside the original config.

A model whose layers keep different widths (or biases its architecture cannot declare) is saved with its dense
config plus this file; reloading builds the model from the config, shrinks every block to the recorded widths,
then loads the state dict (modeling.load_pruned). Uniform widths are written into the config instead
(write_widths), so plain ``from_pretrained`` loads them.

    {"format": "prunepilot-structured/1", "model_type": ..., "head_dim": hd,
     "layers": [engine.layout.block_widths of every block]}
"""
from __future__ import annotations

import json
from pathlib import Path

from ..engine import ModelAdapter
from ..errors import PrunepilotError
from .slicing import shrink_block

WIDTHS_FILE = "prunepilot_widths.json"
FORMAT = "prunepilot-structured/1"


def write_widths(text_cfg, w: dict) -> dict:
    """Set one layer's widths (block_widths) as the config's model-wide widths; returns the previous values."""
    new = {"intermediate_size": w["intermediate_size"], "num_attention_heads": w["num_heads"],
           "num_key_value_heads": w["num_kv_heads"], "head_dim": w["head_dim"]}
    old = {k: getattr(text_cfg, k, None) for k in new}
    for k, v in new.items():
        setattr(text_cfg, k, v)
    return old


def write_widths_file(folder: Path, model_type: str, head_dim: int, widths: list[dict]) -> None:
    info = {"format": FORMAT, "model_type": model_type, "head_dim": head_dim, "layers": widths}
    (folder / WIDTHS_FILE).write_text(json.dumps(info, indent=1) + "\n")


def read_widths_file(folder: Path) -> dict:
    """The recorded widths of a model saved in this format (PrunepilotError for a damaged or foreign file)."""
    widths_file = folder / WIDTHS_FILE
    try:
        info = json.loads(widths_file.read_text())
    except json.JSONDecodeError as e:
        raise PrunepilotError(f"{widths_file} is not valid JSON ({e.msg})") from None
    if info.get("format") != FORMAT:
        raise PrunepilotError(f"{widths_file}: unknown format {info.get('format')!r} (expected {FORMAT})")
    return info


def shrink_to_widths(model, info: dict, folder: Path) -> None:
    """Reshape a freshly built dense model's blocks to the recorded widths (read_widths_file)."""
    adapter = ModelAdapter(model)
    if len(info["layers"]) != len(adapter.blocks):
        raise PrunepilotError(f"{folder / WIDTHS_FILE} has {len(info['layers'])} layers, the config "
                              f"{len(adapter.blocks)}")
    for block, widths in zip(adapter.blocks, info["layers"]):
        shrink_block(block, widths, info["head_dim"])
