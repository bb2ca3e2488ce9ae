"""Issue 14 beside the GGUF export: the sparsity recorded in config.json, the --semi-structured guards (CPU
side; the GPU conversion itself needs CUDA), and lm-eval's local task folders (--harness-include)."""
from __future__ import annotations

import json

import pytest
import torch
import transformers as tf

from prunepilot.api import prune
from prunepilot.cli import main
from prunepilot.errors import PrunepilotError
from prunepilot.recipe import Recipe
from prunepilot.report import save_result
from prunepilot.testing.tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def calib() -> torch.Tensor:
    return torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))


def pruned(method: str = "wanda", pattern: str = "unstructured", sparsity: float = 0.5):
    model = tiny_model("llama")
    report = prune(model, {"method": method, "sparsity": sparsity, "pattern": pattern}, calibration=calib())
    return model, report


def saved_run(tmp_path, model, report, method="wanda", pattern="unstructured"):
    recipe = Recipe.from_dict({"method": method, "sparsity": report.target_sparsity, "pattern": pattern})
    out = tmp_path / "run"
    save_result(model, None, out, recipe, {"model": "tiny", **report.to_dict()})
    return out


# ------------------------------------------------------------------------------- sparsity in config.json

@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsity_recorded_in_config_and_plain_transformers_loads_it(tmp_path, pattern):
    model, report = pruned(pattern=pattern)
    out = saved_run(tmp_path, model, report, pattern=pattern)
    entry = json.loads((out / "model" / "config.json").read_text())["prunepilot"]["sparsity_config"]
    assert entry["method"] == "wanda" and entry["pattern"] == pattern and entry["format"] == "prunepilot-sparsity/1"
    assert entry["global_sparsity"] == pytest.approx(report.global_sparsity, abs=1e-6)
    assert set(entry["layers"]) == set(report.layers) and "explicit zeros" in entry["storage"]
    loaded = tf.AutoModelForCausalLM.from_pretrained(out / "model").eval()
    assert loaded.config.prunepilot["sparsity_config"]["pattern"] == pattern
    ids = calib()[:1]
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)


def test_structured_results_carry_no_sparsity_entry(tmp_path):
    model, report = pruned("flap", "unstructured", 0.3)
    out = saved_run(tmp_path, model, report, method="flap")
    assert "prunepilot" not in json.loads((out / "model" / "config.json").read_text())


# ---------------------------------------------------------------------------------------- --semi-structured

def test_semi_structured_argument_guards():
    from prunepilot.eval.semi_structured import check_semi_structured_args

    with pytest.raises(PrunepilotError, match="applies to --speed"):
        check_semi_structured_args(False, "cuda", "float16")
    with pytest.raises(PrunepilotError, match="needs a CUDA GPU"):
        check_semi_structured_args(True, "cpu", "float16")
    with pytest.raises(PrunepilotError, match="float16 or bfloat16"):
        check_semi_structured_args(True, "cuda", "float32")
    check_semi_structured_args(True, "cuda:0", "bfloat16")


def test_semi_structured_finds_2_4_linears_and_refuses_dense_or_cpu_models():
    from prunepilot.eval.semi_structured import is_2_4, plan_semi_structured, to_semi_structured

    assert is_2_4(torch.tensor([[1.0, 0, 2, 0, 0, 0, 3, 4]])) and not is_2_4(torch.tensor([[1.0, 2, 3, 0]]))
    assert not is_2_4(torch.ones(2, 6))
    with pytest.raises(PrunepilotError, match="no linear layer is 2:4"):
        plan_semi_structured(tiny_model("llama").half())
    model, _ = pruned(pattern="2:4")
    model = model.half()
    ok, bad_shape, dense = plan_semi_structured(model)
    assert "model.layers.0.self_attn.q_proj" in ok                   # (64, 64): fits the fp16 kernels
    assert "model.layers.0.mlp.down_proj" in bad_shape               # 96 input columns: not a multiple of 64
    assert "lm_head" not in ok + bad_shape + dense
    with pytest.raises(PrunepilotError, match="needs a CUDA GPU"):
        to_semi_structured(model)


def test_cli_semi_structured_fails_before_loading(capsys):
    code = main(["eval", "/no/such/model", "--speed", "--semi-structured", "--device", "cpu", "--dtype", "float16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "needs a CUDA GPU" in err[0]


# ------------------------------------------------------------------------------------------ --harness-include

def fake_lm_eval(monkeypatch, output: dict) -> list:
    """A stand-in lm_eval with TaskManager(include_path=...) and simple_evaluate(..., task_manager=...)."""
    import sys
    import types

    calls = []
    names = ("lm_eval", "lm_eval.models", "lm_eval.models.huggingface", "lm_eval.tasks")
    pkg, models, hf, tasks = (types.ModuleType(n) for n in names)

    class HFLM:
        def __init__(self, pretrained, tokenizer, batch_size, **kw):
            calls.append(("HFLM", batch_size))

    class TaskManager:
        def __init__(self, include_path=None, **kw):
            calls.append(("TaskManager", include_path))

    def simple_evaluate(model, tasks, limit, num_fewshot, log_samples, task_manager=None):
        calls.append(("simple_evaluate", tasks, type(task_manager).__name__))
        return output

    hf.HFLM, tasks.TaskManager, pkg.simple_evaluate, pkg.__version__ = HFLM, TaskManager, simple_evaluate, "9.9"
    pkg.models, pkg.tasks, models.huggingface = models, tasks, hf
    for name, mod in zip(names, (pkg, models, hf, tasks)):
        monkeypatch.setitem(sys.modules, name, mod)
    return calls


def task_folder(tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "qa.jsonl").write_text('{"question": "1+1?", "choices": ["2", "3"], "gold": 0}\n')
    (folder / "local_qa.yaml").write_text(
        f"task: local_qa\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'qa.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{gold}}'\nmetric_list:\n  - metric: acc\n")
    return folder


def test_harness_include_reaches_the_task_manager(tmp_path, monkeypatch):
    from prunepilot.eval.lm_eval_adapter import run_lm_eval

    folder = task_folder(tmp_path)
    calls = fake_lm_eval(monkeypatch, {"results": {"local_qa": {"acc,none": 1.0}}})
    res = run_lm_eval(tiny_model("llama"), object(), ["local_qa"], batch_size=2, include_path=folder)
    assert ("TaskManager", str(folder)) in calls and ("simple_evaluate", ["local_qa"], "TaskManager") in calls
    assert res["lm_eval:local_qa"]["acc"] == 1.0
    assert res["lm_eval:local_qa"]["protocol"]["include_path"] == str(folder)
    calls.clear()
    run_lm_eval(tiny_model("llama"), object(), ["local_qa"])  # without a folder: lm-eval's own registry only
    assert [c[0] for c in calls] == ["HFLM", "simple_evaluate"] and calls[-1][2] == "NoneType"


def test_cli_harness_include_errors(tmp_path, monkeypatch, capsys):
    fake_lm_eval(monkeypatch, {"results": {}})
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [(["--ppl", "wikitext2", "--harness-include", str(task_folder(tmp_path))], "applies to --harness-tasks"),
             (["--harness-tasks", "local_qa", "--harness-include", str(tmp_path / "missing")], "is not a folder"),
             (["--harness-tasks", "local_qa", "--harness-include", str(empty)], "holds no task .yaml files")]
    for extra, message in cases:
        code = main(["eval", "/no/such/model", *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], err
