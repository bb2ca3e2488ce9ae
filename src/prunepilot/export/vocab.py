"""The tokenizer part of a GGUF file (tokenizer.ggml.* keys), from one of three places, in this order:

1. the GGUF the model came from: every tokenizer.* key is copied as it is (tokens, merges, types, special
   ids, pre-tokenizer, chat template), so llama.cpp tokenizes exactly as with the original file;
2. the Hugging Face tokenizer files beside the weights, through the gguf package's own helpers
   (gguf.vocab: SentencePieceVocab for tokenizer.model, BpeVocab for a byte-level BPE tokenizer.json with
   its pre-tokenizer identified as llama.cpp's converter does (bpe_pre), LlamaHfVocab for a byte-fallback
   tokenizer.json; SpecialVocab for merges, special ids and the chat template);
3. `byte_vocab()`, a minimal SentencePiece-type vocabulary (<unk>, <s>, </s> and byte tokens) for models
   that have no tokenizer (tests); only through the Python API.

Anything else is refused with one line. A tokenizer with fewer entries than the model's embedding rows is
padded with unused "[PADi]" tokens (as convert_hf_to_gguf pads); one with more is an error.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from ..errors import PrunepilotError

log = logging.getLogger(__name__)

VocabWriter = Callable[[object, int], None]   # (gguf.GGUFWriter, embedding rows) -> adds tokenizer.* keys
TOKENS, SCORES, TYPES = "tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"


def _pad(values: dict, n_vocab: int, where: str) -> None:
    """Pad tokens / scores / token types (key -> [values, vtype, subtype]) in place to n_vocab entries."""
    import gguf

    n = len(values[TOKENS][0])
    if n > n_vocab:
        raise PrunepilotError(f"{where}: the tokenizer has {n} tokens but the model only {n_vocab} embedding rows")
    extra = range(n, n_vocab)
    values[TOKENS][0] += [f"[PAD{i}]".encode() for i in extra]
    if SCORES in values:
        values[SCORES][0] += [-1000.0] * len(extra)
    if TYPES in values:
        values[TYPES][0] += [int(gguf.TokenType.UNUSED)] * len(extra)


def _field_value(field):
    """(value, type, array item type) of a GGUFReader field; strings stay raw bytes."""
    from gguf import GGUFValueType as T

    main = T(field.types[0])
    if main == T.ARRAY:
        sub = T(field.types[-1])
        if sub == T.STRING:
            return [bytes(field.parts[i]) for i in field.data], main, sub
        return [field.parts[i].tolist()[0] for i in field.data], main, sub
    if main == T.STRING:
        return bytes(field.parts[field.data[0]]), main, None
    return field.parts[field.data[0]].tolist()[0], main, None


def gguf_tokenizer(path: str | Path) -> VocabWriter:
    """Copy every tokenizer.* key of an existing GGUF file."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    values = {k: list(_field_value(f)) for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    if TOKENS not in values:
        raise PrunepilotError(f"{path} has no tokenizer.ggml.tokens to copy")

    def write(writer, n_vocab: int) -> None:
        _pad(values, n_vocab, str(path))
        for key, (value, vtype, sub) in values.items():
            writer.add_key_value(key, value, vtype, sub)
    return write


def _write_tokens(writer, model_name: str, tokens: list, scores: list | None, types: list, n_vocab: int,
                  where: str) -> None:
    from gguf import GGUFValueType as T

    values = {TOKENS: [list(tokens), T.ARRAY, T.STRING], TYPES: [[int(t) for t in types], T.ARRAY, T.INT32]}
    if scores is not None:
        values[SCORES] = [[float(s) for s in scores], T.ARRAY, T.FLOAT32]
    _pad(values, n_vocab, where)
    writer.add_tokenizer_model(model_name)
    for key, (value, vtype, sub) in values.items():
        writer.add_key_value(key, value, vtype, sub)


def _bpe_pre(folder: Path) -> str:
    from transformers import AutoTokenizer

    from .bpe_pre import pre_tokenizer_name

    name = pre_tokenizer_name(AutoTokenizer.from_pretrained(str(folder)))
    if name is None:
        raise PrunepilotError(f"{folder}: llama.cpp does not know this BPE tokenizer's pre-tokenizer (its "
                              f"converter's hash table has no entry); export from the original GGUF instead")
    return name


def _hf_vocab(folder: Path):
    """(gguf.vocab object, pre-tokenizer name or None, load merges) for the tokenizer files in folder."""
    import gguf

    if (folder / "tokenizer.model").is_file():
        return gguf.SentencePieceVocab(folder), None, False
    tok_json = folder / "tokenizer.json"
    if not tok_json.is_file():
        raise PrunepilotError(f"{folder} has no tokenizer (tokenizer.model or tokenizer.json) to put in the GGUF")
    model = json.loads(tok_json.read_text()).get("model", {})
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return gguf.LlamaHfVocab(folder), None, False
    try:
        vocab = gguf.BpeVocab(folder)
    except (FileNotFoundError, ValueError) as e:
        raise PrunepilotError(f"{folder}: cannot convert this tokenizer for llama.cpp ({e})") from None
    return vocab, _bpe_pre(folder), True


def hf_tokenizer(folder: str | Path) -> VocabWriter:
    """Build tokenizer.* keys from Hugging Face tokenizer files with the gguf package's vocab helpers."""
    import gguf

    folder = Path(folder)
    vocab, pre, merges = _hf_vocab(folder)
    tokens, scores, types = zip(*vocab.all_tokens())

    def write(writer, n_vocab: int) -> None:
        _write_tokens(writer, vocab.tokenizer_model, list(tokens), None if merges else list(scores), list(types),
                      n_vocab, str(folder))
        if pre:
            writer.add_tokenizer_pre(pre)
        gguf.SpecialVocab(folder, load_merges=merges, n_vocab=n_vocab).add_to_gguf(writer, quiet=True)
    return write


def byte_vocab() -> VocabWriter:
    """Minimal SentencePiece-type vocabulary: 0 <unk>, 1 <s>, 2 </s>, then byte tokens <0x00>, <0x01>, ...
    (then unused padding). For models without a tokenizer, e.g. tests; logits do not depend on it."""
    import gguf

    def write(writer, n_vocab: int) -> None:
        T = gguf.TokenType
        n_bytes = max(0, min(256, n_vocab - 3))
        tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{b:02X}>".encode() for b in range(n_bytes)]
        types = [T.UNKNOWN, T.CONTROL, T.CONTROL] + [T.BYTE] * n_bytes
        _write_tokens(writer, "llama", tokens[:n_vocab], [0.0] * len(tokens[:n_vocab]), types[:n_vocab], n_vocab,
                      "byte vocabulary")
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)
    return write


def tokenizer_for(model_dir: Path, tokenizer_gguf: Path | None) -> VocabWriter:
    """The source GGUF's tokenizer when there is one, else the HF files in model_dir."""
    if tokenizer_gguf is not None:
        log.info("tokenizer: copied from %s", tokenizer_gguf)
        return gguf_tokenizer(tokenizer_gguf)
    log.info("tokenizer: built from the Hugging Face files in %s", model_dir)
    return hf_tokenizer(model_dir)
