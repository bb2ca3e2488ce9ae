"""lm-evaluation-harness on local data: --harness-include DIR registers a folder of task YAMLs, so a harness
task runs offline on a local jsonl (the real lm_eval package, on the real SmolLM2-135M)."""
import json

import pytest

from prunepilot.eval.lm_eval_adapter import run_lm_eval

ROWS = [{"question": "The capital of France is", "choices": [" Paris", " Banana"], "label": 0},
        {"question": "Two plus two equals", "choices": [" purple", " four"], "label": 1},
        {"question": "The sun rises in the", "choices": [" east", " sandwich"], "label": 0},
        {"question": "Water is made of hydrogen and", "choices": [" oxygen", " guitars"], "label": 0}]


def test_a_local_task_folder_runs_offline(smollm2, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-eval is installed by scripts/setup.sh --test (test extra)")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "local_qa.yaml").write_text(f"""task: local_qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / "qa.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
""")
    model, tok = smollm2
    res = run_lm_eval(model, tok, ["local_qa"], batch_size=4, include_path=tmp_path)["lm_eval:local_qa"]
    assert res["n"] == 4 and res["main"] == "acc" and res["protocol"]["include_path"] == str(tmp_path)
    assert res["acc"] >= 0.75  # four easy two-way questions: far above chance for SmolLM2
