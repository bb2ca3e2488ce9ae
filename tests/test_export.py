"""GGUF export (prunepilot export gguf): files the real llama.cpp loads, with logits equal to transformers'.

llama.cpp is run through llama-cpp-python (installed by scripts/setup.sh --test); tests that need it skip with a
message when it is not importable. Tiny random models (prunepilot.testing.tiny_models) carry no tokenizer: they are
exported with the minimal byte vocabulary, or with a small SentencePiece model trained here.
"""
from __future__ import annotations

import io
import json
import zlib

import numpy as np
import pytest
import torch
import transformers as tf

from prunepilot.api import prune
from prunepilot.cli import main
from prunepilot.engine.layout import model_widths
from prunepilot.errors import PrunepilotError
from prunepilot.export import write_gguf
from prunepilot.export.tensors import rope_interleave
from prunepilot.export.vocab import byte_vocab
from prunepilot.modeling import save_pruned
from prunepilot.testing.tiny_models import tiny_model

from conftest import shared_path

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = [1, 17, 33, 5, 98, 64, 2, 120, 77, 45, 3, 9, 101, 56, 88, 23]   # fixed token ids (vocab 128)


def llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama_cpp (llama-cpp-python) is not installed; scripts/setup.sh --test installs it")
    return llama_cpp


def cpp_logits(path, ids) -> np.ndarray:
    """(len(ids), vocab) logits of the GGUF file at `path` from llama.cpp."""
    llm = llama_cpp().Llama(model_path=str(path), logits_all=True, n_ctx=64, n_batch=64, n_threads=2,
                            verbose=False)
    llm.eval(list(ids))
    out = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    return out


@torch.no_grad()
def hf_logits(model, ids) -> np.ndarray:
    return model(torch.tensor([list(ids)])).logits[0].float().numpy()


def assert_close(cpp: np.ndarray, ref: np.ndarray, rel: float = 1e-2) -> float:
    """Max abs difference within rel x the largest |logit| (f16 weights, f16 activations in ggml's matmuls give
    about 1e-3 here; q/k rows left in HF's rotate_half order give about 0.7, test_missing_rope_permutation)."""
    err = float(np.abs(cpp - ref).max())
    scale = float(np.abs(ref).max())
    assert err <= rel * scale, f"llama.cpp vs transformers: max |diff| {err:.4g}, logits up to {scale:.3g}"
    return err


def heads_config(**kw) -> tf.LlamaConfig:
    """A tiny llama with 4 KV groups, so FLAP at 50% gives layers different head counts (4/6/6 query heads).
    Weights drawn 5x wider than the default 0.02, so attention (and rope) visibly shapes the logits."""
    return tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                          num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                          initializer_range=0.1, **kw)


def build(cfg, seed: int = 0):
    torch.manual_seed(seed)
    cfg._attn_implementation = "eager"
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


def tiny(arch: str):
    """prunepilot.testing.tiny_models's config of `arch`, with heads_config's wider weights and non-zero biases (Qwen2's
    q/k/v biases start at zero: random ones check that the q/k biases are permuted with their rows)."""
    from prunepilot.testing.tiny_models import CONFIGS

    cfg = CONFIGS[arch]()
    cfg.initializer_range = 0.1
    model = build(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))
    return model


def calib() -> torch.Tensor:
    return torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))


def flap(model, sparsity: float = 0.5, **structured):
    prune(model, {"method": "flap", "sparsity": sparsity, "structured": structured}, calibration=calib())
    return model


# ------------------------------------------------------------------------------------------ llama.cpp logits

def test_dense_llama_logits_match(tmp_path):
    model = build(heads_config())
    out = write_gguf(model, tmp_path / "dense.gguf", byte_vocab())
    assert out["arch"] == "llama" and not out["per_layer_widths"]
    assert_close(cpp_logits(tmp_path / "dense.gguf", IDS), hf_logits(model, IDS))


def test_flap_per_layer_widths_and_biases_match(tmp_path):
    """Global FLAP: every layer its own MLP width and head count, compensation biases on o_proj / down_proj;
    written as llama.cpp's deci architecture with per-layer arrays and attn_output/ffn_down biases."""
    model = flap(build(heads_config()))
    widths = model_widths(model)[2]
    assert len({w["num_heads"] for w in widths}) > 1 and len({w["intermediate_size"] for w in widths}) > 1
    assert all(w["o_bias"] and w["down_bias"] for w in widths)
    out = write_gguf(model, tmp_path / "flap.gguf", byte_vocab())
    assert out["arch"] == "deci" and out["per_layer_widths"]
    from gguf import GGUFReader

    fields = GGUFReader(str(tmp_path / "flap.gguf")).fields
    assert list(fields["deci.feed_forward_length"].contents()) == [w["intermediate_size"] for w in widths]
    assert list(fields["deci.attention.head_count"].contents()) == [w["num_heads"] for w in widths]
    assert_close(cpp_logits(tmp_path / "flap.gguf", IDS), hf_logits(model, IDS))


def test_missing_rope_permutation_is_caught(tmp_path, monkeypatch):
    """The check is sensitive to the classic bug: q/k rows left in HF's rotate_half order give other logits."""
    from prunepilot.export import arch

    model = build(heads_config())
    monkeypatch.setattr(arch, "NORM_ROPE", ())
    monkeypatch.setattr(arch, "_choose_arch", lambda *a: "llama")
    write_gguf(model, tmp_path / "bad.gguf", byte_vocab())
    with pytest.raises(AssertionError, match="llama.cpp vs transformers"):
        assert_close(cpp_logits(tmp_path / "bad.gguf", IDS), hf_logits(model, IDS))


def test_uniform_flap_with_biases_is_plain_llama(tmp_path):
    model = flap(build(heads_config()), ratios="uniform")
    assert len({(w["intermediate_size"], w["num_heads"]) for w in model_widths(model)[2]}) == 1
    out = write_gguf(model, tmp_path / "uniform.gguf", byte_vocab())
    assert out["arch"] == "llama"
    assert_close(cpp_logits(tmp_path / "uniform.gguf", IDS), hf_logits(model, IDS))


@pytest.mark.parametrize("arch, expected", [("qwen2", "qwen2"), ("qwen3", "qwen3"), ("mistral", "llama")])
def test_other_architectures_match(tmp_path, arch, expected):
    model = tiny(arch)
    out = write_gguf(model, tmp_path / f"{arch}.gguf", byte_vocab())
    assert out["arch"] == expected
    ids = IDS[:6] if arch == "mistral" else IDS  # tiny mistral's sliding window is 8 tokens
    assert_close(cpp_logits(tmp_path / f"{arch}.gguf", ids), hf_logits(model, ids))


def test_qwen2_structured_goes_to_deci_with_qkv_biases(tmp_path):
    model = flap(tiny("qwen2"), 0.4)
    out = write_gguf(model, tmp_path / "q2.gguf", byte_vocab())
    assert out["arch"] in ("deci", "llama")
    assert_close(cpp_logits(tmp_path / "q2.gguf", IDS), hf_logits(model, IDS))


def test_llama3_rope_scaling_matches(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    model = build(heads_config(rope_parameters=rope))
    write_gguf(model, tmp_path / "l3.gguf", byte_vocab())
    ids = (IDS * 4)[:60]  # long enough for the scaled low frequencies to matter (without rope_freqs: |diff| 0.9)
    assert_close(cpp_logits(tmp_path / "l3.gguf", ids), hf_logits(model, ids))


def test_q8_0_is_smaller_and_close(tmp_path):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.1)
    model = build(cfg)
    f16 = write_gguf(model, tmp_path / "m.f16.gguf", byte_vocab())
    q8 = write_gguf(model, tmp_path / "m.q8.gguf", byte_vocab(), file_type="q8_0")
    assert q8["tensor_types"].get("Q8_0") and q8["bytes"] < 0.7 * f16["bytes"]
    # 8-bit weights, and ggml quantizes the activations to 8 bits for Q8_0 matmuls: a looser bound
    assert_close(cpp_logits(tmp_path / "m.q8.gguf", IDS), hf_logits(model, IDS), rel=0.1)


# --------------------------------------------------------------------------------------- pieces, no llama.cpp

def test_rope_interleave_is_convert_hf_to_gguf_permute():
    """Per head, HF pairs dims (j, j + d/2); GGML's NORM rope pairs (2j, 2j+1)."""
    w = torch.arange(2 * 8 * 3).reshape(2 * 8, 3)           # 2 heads of head_dim 8
    out = rope_interleave(w, 2)
    head0 = out[:8, 0] // 3
    assert head0.tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert rope_interleave(torch.arange(16), 2)[8:].tolist() == [8, 12, 9, 13, 10, 14, 11, 15]
    with pytest.raises(PrunepilotError, match="even head size"):
        rope_interleave(torch.zeros(10, 2), 2)


def test_qwen3_per_layer_widths_refused(tmp_path):
    model = flap(tiny_model("qwen3"), 0.3)
    with pytest.raises(PrunepilotError, match="qwen3"):
        write_gguf(model, tmp_path / "x.gguf", byte_vocab())
    assert not list(tmp_path.iterdir())  # nothing written, no temp file left


# ---------------------------------------------------------------------------------------------- the CLI

def train_spm(vocab_size: int = 60) -> bytes:
    import sentencepiece as spm

    text = [f"the quick brown fox jumps over the lazy dog {i} times" for i in range(200)]
    f = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=f, vocab_size=vocab_size,
                                   model_type="bpe", character_coverage=1.0, minloglevel=2)
    return f.getvalue()


def saved_model(folder, model, spm_proto: bytes | None = None):
    save_pruned(model, None, folder)
    if spm_proto is not None:
        (folder / "tokenizer.model").write_bytes(spm_proto)
    return folder


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(map(str, argv)))
    out, err = capsys.readouterr()
    return code, out, err


def fake_run(tmp_path, model, spm_proto) -> object:
    run = tmp_path / "run"
    saved_model(run / "model", model, spm_proto)
    (run / "report.json").write_text(json.dumps({"model": "nowhere", "method": "flap"}))
    return run


def test_cli_exports_run_folder_with_sentencepiece_tokenizer(tmp_path, capsys):
    model = flap(build(heads_config()))
    proto = train_spm()
    run = fake_run(tmp_path, model, proto)
    code, out, err = run_cli(capsys, "export", "gguf", run, "--out", tmp_path / "m.gguf")
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["arch"] == "deci" and summary["source"].endswith("model")
    from gguf import GGUFReader

    fields = GGUFReader(str(tmp_path / "m.gguf")).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert len(fields["tokenizer.ggml.tokens"].contents()) == 128        # 60 pieces, padded to the embedding
    llama_cpp()
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=proto)
    llm = llama_cpp().Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=64, n_threads=1, verbose=False)
    assert llm.tokenize(b"the lazy fox", add_bos=False) == sp.encode("the lazy fox")
    llm.close()
    assert_close(cpp_logits(tmp_path / "m.gguf", IDS), hf_logits(model, IDS))


def test_cli_bad_inputs_one_line_exit_2(tmp_path, capsys):
    proto = train_spm()
    model_dir = saved_model(tmp_path / "m", build(heads_config()), proto)
    target = tmp_path / "out.gguf"
    target.write_bytes(b"keep me")
    half = tmp_path / "half"
    half.mkdir()
    (half / "report.json").write_text("{}")
    no_weights = tmp_path / "noweights"
    (no_weights / "model").mkdir(parents=True)
    (no_weights / "recipe.yaml").write_text("method: flap\n")
    gpt2 = saved_model(tmp_path / "gpt2", tiny_model("gpt2"), proto)
    cases = [
        ((model_dir, "--out", target), "exists; pass --overwrite"),
        ((half, "--out", tmp_path / "a.gguf"), "has no model/ subfolder"),
        ((no_weights, "--out", tmp_path / "a.gguf"), "has no config.json"),
        ((gpt2, "--out", tmp_path / "a.gguf"), "cannot export model_type 'gpt2'"),
        ((tmp_path / "missing", "--out", tmp_path / "a.gguf"), "does not exist"),
        ((model_dir, "--out", tmp_path), "is a folder"),
    ]
    for args, message in cases:
        code, out, err = run_cli(capsys, "export", "gguf", *args)
        assert code == 2 and err.startswith("prunepilot: error: ") and message in err, (args, err)
        assert len(err.strip().splitlines()) == 1, err
    assert target.read_bytes() == b"keep me"
    assert not (tmp_path / "a.gguf").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left behind
    code, _, err = run_cli(capsys, "export", "gguf", model_dir, "--out", target, "--overwrite", "--type", "q8_0")
    assert code == 0, err
    assert target.read_bytes()[:4] == b"GGUF"


def test_cli_no_tokenizer_is_refused(tmp_path, capsys):
    model_dir = saved_model(tmp_path / "m", build(heads_config()))
    code, _, err = run_cli(capsys, "export", "gguf", model_dir, "--out", tmp_path / "a.gguf")
    assert code == 2 and "has no tokenizer" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------- real models

def test_stories260k_flap_with_its_sentencepiece_tokenizer(tmp_path, stories):
    make, tok = stories
    model = make()
    ids = tok.encode("Once upon a time, there was a little girl named Lily.")
    prune(model, {"method": "flap", "sparsity": 0.3}, calibration=torch.tensor([ids[:16]] * 4))
    folder = tmp_path / "model"
    save_pruned(model, tok, folder)
    out = tmp_path / "s.gguf"
    from prunepilot.export import export_gguf

    assert export_gguf(folder, out)["arch"] in ("deci", "llama")
    llm = llama_cpp().Llama(model_path=str(out), n_ctx=64, n_threads=1, verbose=False)
    text = "Once upon a time, there was a little girl."
    assert llm.tokenize(text.encode(), add_bos=True) == tok.encode(text)
    llm.close()
    assert_close(cpp_logits(out, ids), hf_logits(model, ids))


@pytest.mark.slow
def test_smollm2_gguf_tokenizer_is_copied(tmp_path, smollm2):
    """SmolLM2 comes as a GGUF: its tokenizer metadata (BPE merges, smollm pre-tokenizer) is copied as is."""
    model, tok = smollm2
    src = shared_path("models", "smollm2-135m-instruct")
    from prunepilot.export import export_gguf

    out = tmp_path / "smol.gguf"
    assert export_gguf(src, out, file_type="q8_0")["arch"] == "llama"
    from gguf import GGUFReader

    fields = GGUFReader(str(out)).fields
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"
    text = "The capital of France is Paris. 123 tokens!"
    llm = llama_cpp().Llama(model_path=str(out), n_ctx=64, n_threads=2, verbose=False)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text, add_special_tokens=False)
    llm.close()
    ids = tok.encode(text, add_special_tokens=False)
    assert_close(cpp_logits(out, ids), hf_logits(model, ids), rel=5e-2)
