"""The lm-evaluation-harness adapter against a stand-in lm_eval package: result keys, filtered metrics, groups,
a missing dependency and harness failures (the real harness on local data: test_lm_eval_local.py)."""
from __future__ import annotations

import pytest

from prunepilot.errors import PrunepilotError

from eval_fakes import Bigram, Chars


def test_lm_eval_results_keep_filtered_generation_metrics():
    from prunepilot.eval.lm_eval_adapter import _convert

    assert _convert({"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": "arc_easy"}) == {"acc": 0.5, "acc_stderr": 0.1}
    trivia = _convert({"exact_match,remove_whitespace": 0.31, "exact_match_stderr,remove_whitespace": 0.01})
    assert trivia == {"exact_match": 0.31, "exact_match_stderr": 0.01, "filters": {"exact_match": "remove_whitespace"}}
    gsm = _convert({"exact_match,strict-match": 0.2, "exact_match,flexible-extract": 0.3})
    assert gsm["exact_match"] == 0.2 and gsm["filters"] == {"exact_match": "strict-match"}


def test_lm_eval_adapter_missing_dependency(monkeypatch):
    import sys

    from prunepilot.eval import lm_eval_adapter

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as on a machine without it: `import lm_eval` fails
    with pytest.raises(PrunepilotError, match="pip install lm-eval"):
        lm_eval_adapter.run_lm_eval(Bigram(), Chars(), ["arc_easy"])


def fake_lm_eval(monkeypatch, output=None, error=None) -> list:
    """Install a stand-in lm_eval package whose simple_evaluate returns `output` (or raises `error`)."""
    import sys
    import types

    calls = []
    pkg, models, hf = (types.ModuleType(n) for n in ("lm_eval", "lm_eval.models", "lm_eval.models.huggingface"))

    class HFLM:
        def __init__(self, pretrained, tokenizer, batch_size, **kw):
            calls.append(("HFLM", batch_size, kw))

    def simple_evaluate(model, tasks, limit, num_fewshot, log_samples):
        calls.append(("simple_evaluate", tasks, limit, num_fewshot))
        if error:
            raise error
        return output

    hf.HFLM, pkg.simple_evaluate, pkg.__version__, pkg.models, models.huggingface = HFLM, simple_evaluate, "9.9", models, hf
    for name, mod in (("lm_eval", pkg), ("lm_eval.models", models), ("lm_eval.models.huggingface", hf)):
        monkeypatch.setitem(sys.modules, name, mod)
    return calls


def test_lm_eval_adapter_keys_filters_and_errors(monkeypatch):
    """Harness results are keyed lm_eval:TASK (never overwriting the suite's own arc_easy), a group keeps its
    members under "subtasks" instead of adding a column each, and harness failures are one clear error."""
    from prunepilot.eval.lm_eval_adapter import run_lm_eval

    out = {"results": {"arc_easy": {"acc,none": 0.6, "acc_norm,none": 0.55, "alias": "arc_easy"},
                       "mmlu": {"acc,none": 0.3}, "mmlu_stem": {"acc,none": 0.28}, "mmlu_anatomy": {"acc,none": 0.25}},
           "group_subtasks": {"mmlu": ["mmlu_stem"], "mmlu_stem": ["mmlu_anatomy"]},
           "n-samples": {"arc_easy": {"effective": 5}}, "n-shot": {"arc_easy": 0, "mmlu": 5}}
    calls = fake_lm_eval(monkeypatch, out)
    res = run_lm_eval(Bigram(), Chars(), ["arc_easy", "mmlu"], limit=5, batch_size=4, device="cpu")
    assert set(res) == {"lm_eval:arc_easy", "lm_eval:mmlu"}
    assert res["lm_eval:arc_easy"]["acc"] == 0.6 and res["lm_eval:arc_easy"]["main"] == "acc"
    assert res["lm_eval:arc_easy"]["n"] == 5 and res["lm_eval:arc_easy"]["protocol"]["harness"] == "lm-eval 9.9"
    assert set(res["lm_eval:mmlu"]["subtasks"]) == {"mmlu_stem", "mmlu_anatomy"}
    assert res["lm_eval:mmlu"]["protocol"]["shots"] == 5
    assert calls == [("HFLM", 4, {"device": "cpu"}), ("simple_evaluate", ["arc_easy", "mmlu"], 5, None)]
    with pytest.raises(PrunepilotError, match="no result for 'piqa'"):
        run_lm_eval(Bigram(), Chars(), ["piqa"])
    fake_lm_eval(monkeypatch, error=ValueError("Tasks not found: arc_eazy"))
    with pytest.raises(PrunepilotError, match="lm-eval failed on arc_eazy: ValueError: Tasks not found"):
        run_lm_eval(Bigram(), Chars(), ["arc_eazy"])

