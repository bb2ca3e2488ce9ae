"""Arguments and paths checked before any work: each bad invocation is one line `prunepilot: error: ...`, exit 2,
and nothing is loaded, pruned or left behind (an unwritable --out used to fail after the model was pruned)."""
import json
import os

import pytest
import torch

from conftest import shared_path
from prunepilot.cli import main
from prunepilot.io import atomic_dir, remove_stale, stale_prefix
from prunepilot.testing.tiny_models import tiny_model

torch.set_num_threads(1)
PRUNE = ["--method", "magnitude", "--sparsity", "0.5", "--eval", "none"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "good"
    tiny_model("llama").save_pretrained(folder)
    return str(folder)


def one_error_line(capsys, argv, match: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("prunepilot: error: ") and match in err[-1], err[-3:]
    return err[-1]


@pytest.fixture
def never_load(monkeypatch):
    """Checks that must come before the model is loaded: loading fails the test."""
    import prunepilot.modeling as modeling

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(modeling, "load_model_and_tokenizer", boom)


@pytest.mark.parametrize("out", ["/proc/prunepilot-out", "/proc/self/x/y"])
def test_unwritable_out_is_refused_before_loading(saved, capsys, never_load, out):
    for argv in (["prune", saved, *PRUNE, "--out", out], ["eval", saved, "--ppl", "c4", "--out", out + ".json"],
                 ["agent", saved, "--out", out], ["export", "gguf", saved, "--out", out + ".gguf"]):
        one_error_line(capsys, argv, "cannot be written")


def test_out_under_a_file_and_report_out(saved, tmp_path, capsys, never_load):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    one_error_line(capsys, ["prune", saved, *PRUNE, "--out", str(blocker / "run")], "is a file, not a folder")
    result = tmp_path / "r.json"
    result.write_text(json.dumps({"model": "m", "perplexity": {"wikitext2": {"ppl": 3.0}}}))
    one_error_line(capsys, ["report", str(result), "--out", "/proc/prunepilot-report"], "cannot be written")


def test_eval_out_that_is_a_folder(saved, tmp_path, capsys, never_load):
    one_error_line(capsys, ["eval", saved, "--ppl", "c4", "--out", str(tmp_path)], "is a folder; give a file path")


@pytest.mark.parametrize("doc, match", [
    ({"model": "m", "perplexity": {"wikitext2": {"ppl": "abc"}}}, "perplexity.wikitext2.ppl is 'abc'"),
    ({"model": "m", "results": {"arc_easy": {"acc": "high"}}}, "results.arc_easy.acc is 'high'"),
    ({"model": "m", "results": {"arc_easy": {"acc": 0.5, "main": 3}}}, "main is 3"),
])
def test_report_on_non_numeric_metrics(tmp_path, capsys, doc, match):
    result = tmp_path / "r.json"
    result.write_text(json.dumps(doc))
    one_error_line(capsys, ["report", str(result), "--out", str(tmp_path / "cmp")], match)


@pytest.mark.parametrize("env, match", [({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not a positive integer"),
                                        ({"WORLD_SIZE": "0"}, "not a positive integer"),
                                        ({"WORLD_SIZE": "2"}, "launch with torchrun")])
def test_world_size_without_torchrun(saved, tmp_path, capsys, monkeypatch, never_load, env, match):
    for var in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    one_error_line(capsys, ["prune", saved, *PRUNE, "--out", str(tmp_path / "o")], match)
    one_error_line(capsys, ["methods"], match)


@pytest.mark.parametrize("flags, match", [
    (["--method", "wanda", "--ratios", "uniform"], "--ratios (recipe structured:) apply to the structured methods"),
    (["--method", "wanda", "--domain-stats", "fused"], "--domain-stats"),
    (["--method", "magnitude", "--remove-experts", "0.25"], "--remove-experts"),
    (["--method", "flap", "--allocation", "owl"], "--allocation (recipe allocation:) apply to the per-block"),
    (["--method", "flap", "--steps", "3"], "this method prunes in one step"),
    (["--method", "wanda", "--allocation", "explicit"], "--allocation explicit needs per-block sparsities"),
])
def test_options_the_method_ignores_are_refused(saved, tmp_path, capsys, never_load, flags, match):
    one_error_line(capsys, ["prune", saved, *flags, "--sparsity", "0.3", "--eval", "none", "--out",
                            str(tmp_path / "o")], match)
    assert not (tmp_path / "o").exists()


def test_remove_experts_on_a_dense_model(tmp_path, capsys):
    stories = str(shared_path("models", "stories260K"))
    one_error_line(capsys, ["prune", stories, "--method", "flap", "--sparsity", "0.2", "--remove-experts", "0.25",
                            "--n-samples", "2", "--seqlen", "16", "--calib", "web", "--eval", "none",
                            "--out", str(tmp_path / "o")], "needs a mixture-of-experts model")


def test_timeout_inf_is_refused(saved, tmp_path, capsys, never_load):
    one_error_line(capsys, ["agent", saved, "--controller", "openai", "--base-url", "http://127.0.0.1:9/v1",
                            "--model-name", "m", "--timeout", "inf", "--out", str(tmp_path / "a")], "timeout_s")


def test_leftovers_of_a_killed_run_are_removed_by_the_next_run_into_the_same_out(tmp_path, capsys):
    stories, out = str(shared_path("models", "stories260K")), tmp_path / "run"
    dead = 2**22 + 12345  # no such process (pid_max is at most 2**22)
    leftovers = [tmp_path / ".run.tmp-abc123", tmp_path / f".run.tmp-{dead}-x", tmp_path / f".run.offload-{dead}-y",
                 tmp_path / f".run.old-{dead}-0"]
    alive = tmp_path / f".run.tmp-{os.getppid()}-z"  # a run still going is left alone
    other = tmp_path / ".other.tmp-abc"             # another --out's is left alone
    for d in (*leftovers, alive, other):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x" * 10)
    assert main(["prune", stories, *PRUNE, "--n-samples", "2", "--seqlen", "16", "--calib", "web", "--offload", "disk",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    assert not any(d.exists() for d in leftovers) and alive.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".other.tmp-abc", alive.name, "run"])


def test_atomic_dir_names_its_temporary_folder_with_the_pid(tmp_path):
    with atomic_dir(tmp_path / "x") as tmp:
        assert tmp.name.startswith(stale_prefix("x", "tmp"))
        remove_stale(tmp_path, "x")  # its own folder is not stale
        assert tmp.exists()
