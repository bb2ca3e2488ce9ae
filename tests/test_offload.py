"""--offload disk: decoder blocks stay in the safetensors files and are read one at a time; the result equals the
in-memory run bit for bit, the output is an ordinary sharded checkpoint, and passes that change nothing write
nothing."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import shared_path
from prunepilot.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

ARGS = ["--calib", "tinystories", "--n-samples", "8", "--seqlen", "128", "--eval", "tinystories", "--eval-seqlen",
        "128", "--eval-max-windows", "4", "--device", "cpu"]


def tensors(folder):
    out = {}
    for f in sorted((folder / "model").glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("method", ["sparsegpt", "magnitude"])
def test_offloaded_prune_equals_in_memory(method, tmp_path):
    model = str(shared_path("models", "stories260K"))
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["prune", model, "--method", method, "--sparsity", "0.5", *ARGS, "--out", str(one)]) == 0
    assert main(["prune", model, "--method", method, "--sparsity", "0.5", *ARGS, "--offload", "disk",
                 "--out", str(two)]) == 0
    a, b = tensors(one), tensors(two)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (one, two))
    assert ra["layers"] == rb["layers"] and ra["perplexity_after"]["tinystories"]["ppl"] == \
        rb["perplexity_after"]["tinystories"]["ppl"]
    index = json.loads((two / "model" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 1 + 5  # what stays in memory, then one shard per block
    config = lambda d: json.loads((d / "model" / "config.json").read_text())  # noqa: E731
    assert config(two) == config(one) and "sparsity_config" in config(two)["prunepilot"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # the scratch folder is gone


def test_offloaded_output_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model = str(shared_path("models", "stories260K"))
    out = tmp_path / "x"
    assert main(["prune", model, "--method", "wanda", "--sparsity", "0.5", *ARGS, "--offload", "disk",
                 "--out", str(out)]) == 0
    m = AutoModelForCausalLM.from_pretrained(out / "model")
    w = m.model.layers[2].mlp.down_proj.weight
    assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert m(torch.tensor([[1, 5, 9]])).logits.isfinite().all()


def test_a_pass_that_changes_nothing_writes_nothing(tmp_path):
    from prunepilot.engine import ModelAdapter
    from prunepilot.engine.offload import load_offloaded
    from prunepilot.eval.perplexity import perplexity_sequential

    model = load_offloaded(shared_path("models", "stories260K"), torch.float32, lambda m: ModelAdapter(m).block_path,
                           tmp_path / "scratch")
    assert all(p.is_meta for p in model.model.layers.parameters())
    assert not any(p.is_meta for p in model.model.embed_tokens.parameters())
    r = perplexity_sequential(model, torch.arange(3, 259) % 500, 128, "cpu")
    assert r["ppl"] > 1 and model.prunepilot_offload.written == 0 and not (tmp_path / "scratch").exists()
    assert all(p.is_meta for p in model.model.layers.parameters())  # every block released after its visit


@pytest.mark.parametrize("argv, message", [
    (["--method", "flap"], "--offload disk works with the per-block methods"),
    (["--method", "wanda", "--gguf-file", "x.gguf"], "--offload disk needs a local folder of safetensors"),
])
def test_offload_refuses_what_it_cannot_do(argv, message, tmp_path, capsys):
    model = str(shared_path("models", "stories260K"))
    assert main(["prune", model, *argv, "--offload", "disk", *ARGS, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists() and list(tmp_path.iterdir()) == []


def test_a_checkpoint_whose_blocks_do_not_match_its_config_is_one_line(tmp_path, capsys):
    """A shard edited to another width: the block that does not fit is named, nothing is written."""
    import shutil

    from safetensors.torch import save_file

    src = shared_path("models", "stories260K")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    state = load_file(bad / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"][:100]
    save_file(state, str(bad / "model.safetensors"))
    out = tmp_path / "runs" / "x"
    assert main(["prune", str(bad), "--method", "wanda", *ARGS, "--offload", "disk", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "block model.layers.1 does not match the model's config" in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()
