"""Inputs that used to pass silently or end in a traceback: each is one line `prunepilot: error: ...`, exit 2."""
import json
import shutil

import pytest
import torch

from conftest import shared_path
from prunepilot.api import prune
from prunepilot.cli import main
from prunepilot.errors import PrunepilotError
from prunepilot.testing.tiny_models import tiny_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "good"
    tiny_model("llama").save_pretrained(folder)
    return folder


def one_error_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("prunepilot")]
    assert len(err) == 1 and err[0].startswith("prunepilot: error: ")
    return err[0]


def test_damaged_weights_are_named(saved, tmp_path, capsys):
    for name, damage in (("truncated", lambda b: b[: len(b) // 2]), ("garbage", lambda b: b"\0" * 64)):
        bad = tmp_path / name
        shutil.copytree(saved, bad)
        f = bad / "model.safetensors"
        f.write_bytes(damage(f.read_bytes()))
        line = one_error_line(capsys, ["eval", str(bad), "--ppl", "c4"])  # found by the guarded reader, before loading
        assert "model.safetensors: damaged" in line and "safetensors file" in line


def test_a_model_that_needs_remote_code_is_refused_without_asking(saved, tmp_path, capsys, monkeypatch):
    bad = tmp_path / "remote"
    shutil.copytree(saved, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg.update(model_type="mystery", auto_map={"AutoConfig": "configuration_x.XConfig",
                                               "AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    (bad / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr("sys.stdin", None)  # a prompt would hang a real run: none may be shown
    assert "needs its own Python code (trust_remote_code)" in one_error_line(capsys, ["eval", str(bad), "--ppl", "c4"])


def test_a_binary_file_given_to_report(tmp_path, capsys):
    f = tmp_path / "x.json"
    f.write_bytes(bytes(range(128, 256)))
    assert "is not a text file" in one_error_line(capsys, ["report", str(f), "--out", str(tmp_path / "r")])


@pytest.mark.parametrize("flag,value", [("--seqlen", "0"), ("--max-windows", "0")])
def test_zero_windows_or_seqlen_are_errors_not_defaults(saved, flag, value, capsys):
    assert f"{flag} must be >=" in one_error_line(capsys, ["eval", str(saved), "--ppl", "c4", flag, value])


def test_calibration_longer_than_the_models_context_is_an_error(capsys, tmp_path):
    model = tiny_model("llama")  # context 256
    with pytest.raises(PrunepilotError, match="calibration token ids of length 300 exceeds the model's context of 256"):
        prune(model, {"method": "wanda", "device": "cpu"}, calibration=torch.randint(3, 128, (2, 300)))
    with pytest.raises(PrunepilotError, match="calibration seqlen 4096 exceeds the model's context of 256"):
        prune(model, {"method": "flap", "sparsity": 0.2, "calibration": {"seqlen": 4096}}, tokenizer=object())
    stories = shared_path("models", "stories260K")  # context 512, through the CLI
    line = one_error_line(capsys, ["prune", str(stories), "--method", "wanda", "--seqlen", "4096", "--calib",
                                   "tinystories", "--eval", "none", "--out", str(tmp_path / "out")])
    assert "calibration seqlen 4096 exceeds the model's context of 512" in line
    assert not (tmp_path / "out").exists()


def test_agent_target_above_the_per_layer_cap_and_resume_without_a_run(tmp_path, capsys):
    stories = str(shared_path("models", "stories260K"))
    line = one_error_line(capsys, ["agent", stories, "--out", str(tmp_path / "a"), "--target", "0.99"])
    assert line == ("prunepilot: error: invalid agent config: target_sparsity 0.99 is unreachable: no layer is pruned "
                    "beyond max_layer_sparsity 0.9 (raise it, or lower the target)")
    line = one_error_line(capsys, ["agent", stories, "--out", str(tmp_path / "b"), "--resume"])
    assert "nothing to resume" in line and not (tmp_path / "b").exists()
