"""CLI: end to end on the real stories260K model, recipes, and one clear line for every bad argument."""
import json
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from conftest import REPO, shared_path
from prunepilot.cli import main
from prunepilot.io import atomic_dir
from prunepilot.errors import PrunepilotError

QUICK = ["--calib", "tinystories", "--n-samples", "8", "--seqlen", "128", "--eval", "tinystories",
         "--eval-seqlen", "128", "--eval-max-windows", "8", "--device", "cpu"]


def test_prune_save_reload_keeps_sparsity(tmp_path, capsys):
    model_dir = shared_path("models", "stories260K")
    out = tmp_path / "run"
    assert main(["prune", str(model_dir), "--method", "sparsegpt", "--sparsity", "0.5", "--out", str(out), *QUICK]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["global_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert report["environment"]["torch"] == torch.__version__  # every result says what produced it
    ppl = report["perplexity_after"]["tinystories"]
    assert ppl["seqlen"] == 128 and ppl["windows"] == 8 and ppl["tokens"] == 8 * 127
    assert report["perplexity_before"]["tinystories"]["ppl"] < ppl["ppl"]
    assert (out / "sparsity.png").stat().st_size > 0
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["method"] == "sparsegpt" and recipe["calibration"]["n_samples"] == 8
    reloaded = AutoModelForCausalLM.from_pretrained(out / "model")  # plain transformers
    for name, stats in report["layers"].items():
        W = reloaded.get_submodule(name).weight
        assert int((W == 0).sum()) == stats["zeros"], name
    # the saved recipe reproduces the run
    out2 = tmp_path / "run2"
    assert main(["prune", str(model_dir), "--recipe", str(out / "recipe.yaml"), "--out", str(out2)]) == 0
    again = AutoModelForCausalLM.from_pretrained(out2 / "model")
    for (n, a), b in zip(reloaded.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), n


def test_structured_methods_keep_their_defaults_from_the_command_line(tmp_path, capsys):
    model = str(shared_path("models", "stories260K"))
    common = ["--sparsity", "0.2", "--n-samples", "4", "--eval", "none", "--no-save-model", "--device", "cpu"]
    assert main(["prune", model, "--method", "flap_iterative", "--steps", "2", "--out", str(tmp_path / "a"), *common]) == 0
    rep = json.loads((tmp_path / "a" / "report.json").read_text())
    assert rep["calibration"]["sources"] == ["wiki", "web", "code", "math"] and rep["calibration"]["seqlen"] == 128
    assert len(rep["extra"]["steps"]) == 2 and rep["extra"]["ratios"] == "global"
    saved = yaml.safe_load((tmp_path / "a" / "recipe.yaml").read_text())
    assert saved == {"method": "flap_iterative", "sparsity": 0.2, "calibration": {"n_samples": 4},
                     "evaluation": {"datasets": []}, "structured": {"steps": 2}, "device": "cpu"}  # only what was said
    assert main(["prune", model, "--method", "wanda_sp", "--out", str(tmp_path / "b"), *common]) == 0
    rep = json.loads((tmp_path / "b" / "report.json").read_text())
    assert rep["extra"]["ratios"] == "uniform" and not rep["extra"]["bias_compensation"]  # Wanda-sp's defaults
    assert main(["prune", model, "--method", "wanda_sp", "--ratios", "global", "--out", str(tmp_path / "c"),
                 *common]) == 0
    assert json.loads((tmp_path / "c" / "report.json").read_text())["extra"]["ratios"] == "global"
    assert main(["prune", model, "--method", "flap", "--channel-multiple", "8", "--out", str(tmp_path / "d"),
                 *common]) == 0
    rep = json.loads((tmp_path / "d" / "report.json").read_text())
    assert rep["extra"]["channel_multiple"] == 8
    assert all(layer["intermediate_size"] % 8 == 0 for layer in rep["extra"]["layers"])


def test_output_folder_is_not_clobbered(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code = main(["prune", str(shared_path("models", "stories260K")), "--method", "magnitude", "--out", str(out),
                 "--eval", "none"])
    assert code == 2 and "not empty" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"
    with pytest.raises(RuntimeError):  # a failure inside the atomic folder leaves the old one intact
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "half.bin").write_text("x")
            raise RuntimeError("crash")
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


BAD = [
    (["prune", "{m}", "--sparsity", "1.5", "--out", "{o}"], "sparsity"),
    (["prune", "{m}", "--method", "nope", "--out", "{o}"], "unknown method 'nope'"),
    (["prune", "{m}", "--pattern", "3-4", "--out", "{o}"], "pattern"),
    (["prune", "/does/not/exist", "--out", "{o}"], "does not exist"),
    (["prune", "{m}", "--calib", "/no/such.jsonl", "--out", "{o}", "--eval", "none"], "does not exist"),
    (["prune", "{m}", "--recipe", "/no/recipe.yaml", "--out", "{o}"], "recipe file"),
    (["prune", "{m}", "--recipe", "{bad_recipe}", "--out", "{o}"], "invalid recipe: colour"),
    (["prune", "{m}", "--device", "cuda:0", "--out", "{o}"], "CUDA is not available"),
    (["prune", "{m}", "--method", "wanda", "--pattern", "4:8", "--calib", "tinystories", "--n-samples", "2",
      "--seqlen", "32", "--eval", "none", "--out", "{o}"], "divisible by 8"),
    (["eval", "{m}"], "nothing to evaluate"),
    (["eval", "{m}", "--ppl", "tinystories", "--checkpoint", "{o}.jsonl"], "--checkpoint applies to --tasks"),
    (["eval", "{m}", "--tasks", "arc_easy", "--checkpoint", "{tmp}"], "is a folder"),
    (["report", "/no/result.json", "--out", "{o}"], "does not exist"),
    (["eval", "/does/not/exist", "--tasks", "arc_eazy"], "unknown task 'arc_eazy'"),  # checked before loading
    (["eval", "/does/not/exist", "--tasks", "freebaseqa=/no/fb.json"], "data not found at /no/fb.json"),
]


@pytest.mark.parametrize("argv,message", BAD)
def test_bad_arguments_give_one_line_and_exit_2(argv, message, tmp_path, capsys):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("CUDA present")
    bad_recipe = tmp_path / "bad.yaml"
    bad_recipe.write_text("method: wanda\ncolour: red\n")
    m = str(shared_path("models", "stories260K"))
    argv = [a.format(m=m, o=tmp_path / "o", bad_recipe=bad_recipe, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prunepilot: error:") and message in err[0], err


def test_eval_all_tasks_and_perplexity_window_capped_to_the_context(tmp_path, capsys):
    model = str(shared_path("models", "stories260K"))  # context 512 tokens
    out = tmp_path / "eval.json"
    assert main(["eval", model, "--tasks", "all", "--limit", "2", "--ppl", "tinystories", "--max-windows", "2",
                 "--gsm8k-max-tokens", "16", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["results"]) == {"arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq",
                                      "openbookqa", "mmlu", "triviaqa", "gsm8k"}  # every task whose data ships
    assert result["perplexity"]["tinystories"]["seqlen"] == 512  # default 2048 shortened to the context
    capsys.readouterr()
    ck = tmp_path / "eval.units.jsonl"  # a checkpointed run, then the same command again: nothing is rerun
    args = ["eval", model, "--tasks", "arc_easy,mmlu", "--limit", "2", "--checkpoint", str(ck), "--out", str(out)]
    assert main(args) == 0 and main(args) == 0
    again = json.loads(out.read_text())["results"]
    assert again["mmlu"]["checkpoint"]["units_resumed"] == again["mmlu"]["checkpoint"]["units"] == 57
    assert again["arc_easy"]["acc"] == result["results"]["arc_easy"]["acc"]
    assert again["mmlu"]["acc"] == result["results"]["mmlu"]["acc"]
    capsys.readouterr()
    assert main(["eval", model, "--speed", "--out", str(out)]) == 0
    speed = json.loads(out.read_text())["speed"]
    assert speed["prefill_tok_s"] > 0 and speed["decode_tok_s"] > 0 and speed["seq_len"] == 128
    capsys.readouterr()
    assert main(["eval", model, "--ppl", "tinystories", "--seqlen", "1024"]) == 2
    assert "exceeds the model's context of 512" in capsys.readouterr().err


def test_eval_keeps_finished_stages_when_a_later_one_fails(tmp_path, capsys, monkeypatch):
    import prunepilot.eval.suite as suite

    def fail(*a, **k):
        raise PrunepilotError("task data broke")

    monkeypatch.setattr(suite, "run_suite", fail)
    out = tmp_path / "eval.json"
    args = ["eval", str(shared_path("models", "stories260K")), "--ppl", "tinystories", "--max-windows", "1",
            "--tasks", "arc_easy", "--out", str(out)]
    assert main(args) == 2 and "task data broke" in capsys.readouterr().err
    saved = json.loads(out.read_text())
    assert saved["perplexity"]["tinystories"]["ppl"] > 1 and saved["results"] == {} and saved["dtype"] == "float32"


def test_console_script_exit_code_and_methods(tmp_path):
    r = subprocess.run([sys.executable, "-m", "prunepilot", "prune", "/does/not/exist", "--out", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "prunepilot", "methods"], capture_output=True, text=True)
    assert r.returncode == 0  # a fresh process lists the structured methods too
    assert {"magnitude", "wanda", "sparsegpt", "wanda_sp", "flap", "flap_iterative"} <= {
        line.split()[0] for line in r.stdout.splitlines() if line.strip()}
    r = subprocess.run([sys.executable, "-m", "prunepilot", "prune"], capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr


def test_recipe_rejects_unknown_keys():
    from prunepilot.recipe import Recipe

    with pytest.raises(PrunepilotError, match="calibration.n_sample"):
        Recipe.from_dict({"calibration": {"n_sample": 3}})
    r = Recipe.from_dict({"method": "sparsegpt", "pattern": "2:4"})
    assert Recipe.from_dict(yaml.safe_load(r.to_yaml())) == r


def test_shipped_recipes_are_valid():
    from prunepilot.agent import AgentConfig
    from prunepilot.recipe import Recipe
    from prunepilot.registry import get_method

    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    assert len(recipes) >= 5
    for path in recipes:
        if path.name.startswith("agent"):
            AgentConfig.from_yaml(path)
        else:
            get_method(Recipe.from_yaml(path).method)


def test_outputs_get_ordinary_permissions(tmp_path):
    import os

    from prunepilot.io import atomic_dir, atomic_write_json

    mask = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            atomic_write_json(tmp / "report.json", {"a": 1})
        assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
        assert (tmp_path / "out" / "report.json").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(mask)


def test_evo_allocation_resumes_in_its_output_folder(tmp_path, capsys):
    """--allocation evo logs every generation to <out>/evo_search.jsonl; a run stopped during the search leaves
    only that log in <out>, and the same command continues it to the allocation of an uninterrupted run."""
    model = str(shared_path("models", "stories260K"))
    evo = ["--allocation", "evo", "--evo-generations", "4", "--evo-offspring", "3", "--evo-tokens", "128,256",
           "--no-save-model", "--eval", "none", *QUICK[:6], "--device", "cpu"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["prune", model, "--method", "wanda", "--out", str(full), *evo]) == 0
    lines = (full / "evo_search.jsonl").read_text().splitlines()
    assert len(lines) == 1 + 4
    cut.mkdir()
    (cut / "evo_search.jsonl").write_text("\n".join(lines[:3]) + "\n")  # header + generations 1, 2
    assert main(["prune", model, "--method", "wanda", "--out", str(cut), *evo]) == 0
    a, b = (json.loads((d / "report.json").read_text()) for d in (full, cut))
    assert a["extra"]["evo"]["linear_targets"] == b["extra"]["evo"]["linear_targets"]
    def generations(folder):
        return [(r["generation"], r["levels"], r["fitness"]) for r in map(json.loads, (folder / "evo_search.jsonl")
                                                                          .read_text().splitlines()[1:])]
    assert generations(cut) == generations(full) and len(generations(cut)) == 4
    assert "log" not in yaml.safe_load((cut / "recipe.yaml").read_text())["allocation"].get("evo", {})
