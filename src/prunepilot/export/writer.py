"""Write a (pruned) model as one GGUF file that llama.cpp and the runtimes built on it load.

    export_gguf("runs/flap50", "flap50.gguf", file_type="q8_0")     # run folder, model folder or GGUF
    write_gguf(model, "tiny.gguf", vocab=byte_vocab())               # an in-memory model

The file is written with the gguf package's GGUFWriter into a temporary file beside the target, then renamed
over it: a failure never leaves a half-written FILE, and an existing FILE is replaced only with overwrite=True.
Hyperparameters and tensors: export/arch.py and export/tensors.py; tokenizer: export/vocab.py.
"""
from __future__ import annotations

import logging
from pathlib import Path

from ..errors import PrunepilotError
from ..io import atomic_file, check_output_location
from .arch import ExportPlan, check_saved_config, plan_export, write_hparams
from .tensors import FILE_TYPES, encode, gguf_tensors
from .vocab import VocabWriter

log = logging.getLogger(__name__)


def check_target(out: str | Path, overwrite: bool) -> Path:
    """The output path, refused (before any work) if it is a folder or an existing file without overwrite."""
    out = Path(out).expanduser()
    if out.is_dir():
        raise PrunepilotError(f"--out {out} is a folder; give a file name such as {out / 'model.gguf'}")
    if out.exists() and not overwrite:
        raise PrunepilotError(f"{out} exists; pass --overwrite to replace it")
    check_output_location(out)
    if out.suffix != ".gguf":
        log.warning("%s does not end in .gguf; runtimes such as LM Studio look for that suffix", out)
    return out


def _file_type(file_type: str):
    import gguf

    if file_type not in FILE_TYPES:
        raise PrunepilotError(f"unknown GGUF type {file_type!r}; choose one of {', '.join(FILE_TYPES)}")
    return gguf.LlamaFileType.MOSTLY_Q8_0 if file_type == "q8_0" else gguf.LlamaFileType.MOSTLY_F16


def _fill(writer, model, plan: ExportPlan, file_type: str, vocab: VocabWriter, name: str) -> dict:
    """Add metadata, tokenizer and tensors to a GGUFWriter; returns what was written (arch, widths, types)."""
    import gguf

    n_vocab = model.get_input_embeddings().weight.shape[0]
    writer.add_name(name)
    writer.add_file_type(int(_file_type(file_type)))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_hparams(writer, model, plan, n_vocab)
    vocab(writer, n_vocab)
    types: dict[str, int] = {}
    for gname, tensor in gguf_tensors(model, plan):
        data, qtype = encode(gname, tensor, file_type)
        writer.add_tensor(gname, data, raw_dtype=qtype)
        types[qtype.name] = types.get(qtype.name, 0) + 1
    return {"arch": plan.arch, "layers": len(plan.widths), "tensor_types": types,
            "per_layer_widths": plan.arch == "deci"}


def write_gguf(model, out: str | Path, vocab: VocabWriter, file_type: str = "f16", overwrite: bool = False,
               name: str | None = None) -> dict:
    """Write `model` (an HF causal LM, pruned or not) to `out` atomically; returns a summary dict."""
    import gguf

    _file_type(file_type)
    out = check_target(out, overwrite)
    plan = plan_export(model)  # refuses what llama.cpp cannot run before any file is created
    with atomic_file(out) as tmp:  # a crash never leaves a short file at `out`
        writer = gguf.GGUFWriter(str(tmp), arch=plan.arch)
        summary = _fill(writer, model, plan, file_type, vocab, name or out.stem)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    summary.update(path=str(out), bytes=out.stat().st_size, file_type=file_type)
    return summary


def export_gguf(model_or_run: str | Path, out: str | Path, file_type: str = "f16", overwrite: bool = False,
                vocab: VocabWriter | None = None) -> dict:
    """Export a model folder, GGUF or `prunepilot prune` run folder to one GGUF file (see export/source.py)."""
    from ..guarded_gguf import check_gguf
    from ..guarded_reader import check_model_input
    from ..modeling import load_model
    from .source import resolve_source
    from .vocab import tokenizer_for

    _file_type(file_type)
    check_target(out, overwrite)
    src = resolve_source(model_or_run)
    check_model_input(src.model_dir, src.gguf_file)  # damaged or hostile files: one line before any reading
    check_saved_config(src.model_dir)
    if src.tokenizer_gguf is not None:
        check_gguf(src.tokenizer_gguf)
    vocab = vocab or tokenizer_for(src.model_dir, src.tokenizer_gguf)
    try:
        model = load_model(src.model_dir, dtype="float32", device="cpu", gguf_file=src.gguf_file)
    except (OSError, RuntimeError, ValueError) as e:
        raise PrunepilotError(f"cannot load {src.model_dir}: {str(e).splitlines()[0]}") from None
    summary = write_gguf(model, out, vocab, file_type, overwrite)
    summary["source"] = str(src.model_dir)
    return summary
