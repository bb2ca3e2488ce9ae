"""Every damaged or hostile model file is one line `prunepilot: error: ...` and exit 2 for every command that
reads models (22 of 39 hand-made GGUFs ended in gguf-reader tracebacks in `export gguf`; a block_count of
100,000 ran past 120 s; a checkpoint missing layers 0-1 was pruned with those layers filled at random)."""
import time

import pytest
import torch

from prunepilot.cli import main
from prunepilot.errors import PrunepilotError
from prunepilot.guarded_gguf import check_gguf
from prunepilot.guarded_reader import check_model_input
from prunepilot.testing.hostile_files import (GGUF_DAMAGE, SAFETENSORS_KINDS, hostile_gguf, hostile_safetensors,
                                              valid_gguf)
from prunepilot.testing.tiny_models import tiny_model

torch.set_num_threads(1)


def commands(model: str, tmp) -> dict:
    return {"eval": ["eval", model, "--ppl", "wikitext2", "--max-windows", "1"],
            "prune": ["prune", model, "--method", "magnitude", "--sparsity", "0.5", "--eval", "none",
                      "--out", str(tmp / "pruned")],
            "agent": ["agent", model, "--out", str(tmp / "agent")],
            "export": ["export", "gguf", model, "--out", str(tmp / "x.gguf")]}


def one_error_line(capsys, argv) -> str:
    t0 = time.monotonic()
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err and err[-1].startswith("prunepilot: error: "), (argv, rc, err[-3:])
    assert not any("Traceback" in line for line in err)
    assert time.monotonic() - t0 < 30
    return err[-1]


@pytest.fixture(scope="module")
def good_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good") / "llama"
    tiny_model("llama").save_pretrained(folder)
    return folder


def test_the_valid_gguf_passes_the_guard(tmp_path):
    check_gguf(valid_gguf(tmp_path / "ok.gguf"))


@pytest.mark.parametrize("kind", sorted(GGUF_DAMAGE))
def test_hostile_gguf_is_one_line_for_every_command(tmp_path, capsys, kind):
    folder = hostile_gguf(tmp_path / "m", kind)
    with pytest.raises(PrunepilotError):
        check_model_input(folder)
    for name, argv in commands(str(folder), tmp_path).items():
        line = one_error_line(capsys, argv)
        assert "model.gguf" in line, (name, line)
    line = one_error_line(capsys, ["export", "gguf", str(folder / "model.gguf"), "--out", str(tmp_path / "y.gguf")])
    assert not (tmp_path / "y.gguf").exists()


@pytest.mark.parametrize("kind", SAFETENSORS_KINDS)
def test_hostile_safetensors_is_one_line_for_every_command(tmp_path, capsys, good_model, kind):
    folder = hostile_safetensors(tmp_path / "m", kind, good_model)
    argvs = commands(str(folder), tmp_path)
    argvs["prune --offload disk"] = argvs["prune"] + ["--offload", "disk"]
    for name, argv in argvs.items():
        line = one_error_line(capsys, argv)
        assert str(folder) in line, (name, line)


def test_missing_layers_are_named(tmp_path, good_model):
    folder = hostile_safetensors(tmp_path / "m", "missing-layers-0-1", good_model)
    with pytest.raises(PrunepilotError, match=r"do not cover the model: config.json declares 3 layers, the weights "
                                              r"hold none for layer\(s\) 0, 1"):
        check_model_input(folder)


def test_a_missing_weight_inside_a_covered_layer_is_refused_after_load(tmp_path, good_model):
    from safetensors.torch import load_file, save_file

    from prunepilot.modeling import load_model

    folder = hostile_safetensors(tmp_path / "m", "missing-layers-0-1", good_model)
    tensors = load_file(good_model / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if k != "model.layers.2.mlp.up_proj.weight"},
              folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(PrunepilotError, match="1 weight.s. missing, e.g. model.layers.2.mlp.up_proj.weight"):
        load_model(folder)


def test_a_config_wider_than_its_weights_is_refused_before_loading(tmp_path, good_model):
    folder = hostile_safetensors(tmp_path / "m", "config-mismatched-width", good_model)
    with pytest.raises(PrunepilotError, match=r"hidden size 128 does not match the token embedding in the weights "
                                              r"\(shape \[128, 64\]\)"):
        check_model_input(folder)
