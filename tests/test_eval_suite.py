"""The evaluation suite: every task in one call, checkpointed runs that resume after a crash (and refuse a
checkpoint of other data, tokenizer or protocol), skipped and unknown tasks, and one real-data check."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from prunepilot.errors import PrunepilotError
from prunepilot.eval import zeroshot
from prunepilot.eval.loglik import Request, encode_pair, score_requests
from prunepilot.eval.suite import TASKS, run_suite

from eval_fakes import V, Bigram, Chars, data_dir, tiny_llama, write_jsonl  # noqa: F401 (data_dir: a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


# ----------------------------------------------------------------------------- the suite

def test_run_suite_all_tasks(data_dir):
    model = Bigram({"m": {" ": 0.6}, "n": {" ": 0.1}, ":": {" ": 0.9},
                    " ": {"B": 0.3, "o": 0.35, "a": 0.2, "b": 0.05}, "o": {"k": 0.9}, "k": {"\n": 0.9}})
    res = run_suite(model, Chars(), ["all"], data_dir, batch_size=4)
    assert list(res) == [t for t in TASKS if t != "freebaseqa"]
    assert (res["arc_easy"]["acc"], res["arc_easy"]["acc_norm"]) == (0.5, 0.5)
    assert res["winogrande"]["acc"] == 0.5 and "acc_norm" not in res["winogrande"]
    assert res["boolq"]["main"] == "acc" and res["arc_challenge"]["main"] == "acc_norm"
    assert res["mmlu"]["acc"] == pytest.approx(2 / 3) and res["mmlu"]["protocol"]["shots"] == 5
    assert res["triviaqa"]["acc"] == 0.5 and res["triviaqa"]["examples"][0]["prediction"] == "ok"
    assert res["gsm8k"]["n"] == 2 and res["gsm8k"]["protocol"]["shots"] == 8
    for r in res.values():
        assert {"n", "protocol", "seconds", "main"} <= set(r) and r["protocol"]["data"]
    limited = run_suite(model, Chars(), ["arc_easy", "mmlu"], data_dir, limit=1)
    assert limited["arc_easy"]["n"] == 1 and limited["arc_easy"]["protocol"]["n_total"] == 2
    assert limited["mmlu"]["n"] == 2  # ceil(1 / 2 subjects) = 1 question per subject


def test_checkpointed_suite_resumes_after_a_crash_and_matches_an_uninterrupted_run(data_dir, tmp_path, monkeypatch):
    from prunepilot.eval import suite

    monkeypatch.setattr(suite, "CHUNK_ITEMS", 1)  # one unit per item (MMLU: per subject)
    model, tok = tiny_llama(seed=4), Chars()
    tasks = ["hellaswag", "winogrande", "mmlu", "triviaqa"]
    keys = {"hellaswag": "acc_norm", "winogrande": "acc", "mmlu": "acc", "triviaqa": "acc"}
    plain = run_suite(model, tok, tasks, data_dir, batch_size=3)
    ck = tmp_path / "runs" / "eval.ckpt.jsonl"
    run_suite(model, tok, tasks, data_dir, batch_size=3, checkpoint=ck)
    lines = ck.read_text().splitlines()
    assert [json.loads(x)["task"] for x in lines] == ["hellaswag"] * 2 + ["winogrande"] * 2 + ["mmlu"] * 2 + \
        ["triviaqa"] * 2
    ck.write_text("\n".join(lines[:5]) + "\n" + lines[5][:30])  # killed while writing the second MMLU subject

    resumed = run_suite(model, tok, tasks, data_dir, batch_size=3, checkpoint=ck)
    assert {t: r["checkpoint"]["units_resumed"] for t, r in resumed.items()} == \
        {"hellaswag": 2, "winogrande": 2, "mmlu": 1, "triviaqa": 0}
    for t, metric in keys.items():
        assert resumed[t][metric] == plain[t][metric] and resumed[t]["n"] == plain[t]["n"]
    assert resumed["mmlu"]["subjects"] == plain["mmlu"]["subjects"]
    assert resumed["triviaqa"]["examples"] == plain["triviaqa"]["examples"]
    n_lines = len(ck.read_text().splitlines())
    assert n_lines == 5 + 1 + 3  # the cut line stays (ignored); the 3 missing units were appended

    again = run_suite(model, tok, tasks, data_dir, batch_size=3, checkpoint=ck)
    assert all(r["checkpoint"]["units_resumed"] == r["checkpoint"]["units"] for r in again.values())
    assert len(ck.read_text().splitlines()) == n_lines
    other = run_suite(tiny_llama(seed=5), tok, ["winogrande"], data_dir, checkpoint=ck)  # another model's weights
    assert other["winogrande"]["checkpoint"]["units_resumed"] == 0
    limited = run_suite(model, tok, ["winogrande"], data_dir, limit=1, checkpoint=ck)  # another protocol
    assert limited["winogrande"]["checkpoint"] == {"units": 1, "units_resumed": 0}
    with pytest.raises(PrunepilotError, match="not a file"):
        run_suite(model, tok, ["winogrande"], data_dir, checkpoint=tmp_path)


def test_checkpoint_is_not_reused_for_other_data_another_tokenizer_or_a_short_unit(data_dir, tmp_path, monkeypatch,
                                                                                    caplog):
    from prunepilot.eval import suite

    monkeypatch.setattr(suite, "CHUNK_ITEMS", 1)
    model, ck = tiny_llama(seed=4), tmp_path / "ck.jsonl"
    first = run_suite(model, Chars(), ["arc_easy", "mmlu"], data_dir, checkpoint=ck)
    assert first["arc_easy"]["checkpoint"]["units_resumed"] == 0
    # the same file path with other contents: the edited item and the edited MMLU subject run again
    arc = data_dir / "zeroshot" / "arc_easy.jsonl"
    rows = [json.loads(x) for x in arc.read_text().splitlines()]
    rows[1]["gold"] = 0
    write_jsonl(arc, rows)
    test_csv = data_dir / "mmlu" / "test" / "philosophy_test.csv"
    test_csv.write_text(test_csv.read_text().replace(",B\n", ",C\n"))
    edited = run_suite(model, Chars(), ["arc_easy", "mmlu"], data_dir, checkpoint=ck)
    assert edited["arc_easy"]["checkpoint"]["units_resumed"] == 1  # item 0 unchanged, item 1 rescored
    assert edited["mmlu"]["checkpoint"]["units_resumed"] == 1      # abstract_algebra unchanged
    assert edited["arc_easy"]["acc"] == run_suite(model, Chars(), ["arc_easy"], data_dir)["arc_easy"]["acc"]

    class Shifted(Chars):  # another tokenizer: different ids for the same text
        def encode(self, text, add_special_tokens=True, **_):
            return [min(i + 1, V - 1) for i in super().encode(text, add_special_tokens)]

    other = run_suite(model, Shifted(), ["arc_easy"], data_dir, checkpoint=ck)
    assert other["arc_easy"]["checkpoint"]["units_resumed"] == 0
    # a unit whose stored outcomes do not cover its items is run again, with a warning
    lines = [json.loads(x) for x in ck.read_text().splitlines()]
    for rec in lines:
        if rec["task"] == "arc_easy" and rec["unit"] == "items 0-1":
            rec["data"]["n"], rec["data"]["lls"] = 2, rec["data"]["lls"] * 2
    ck.write_text("".join(json.dumps(r) + "\n" for r in lines))
    with caplog.at_level("WARNING"):
        again = run_suite(model, Chars(), ["arc_easy"], data_dir, checkpoint=ck)
    assert again["arc_easy"]["checkpoint"]["units_resumed"] == 1 and "running it again" in caplog.text


def test_all_skips_tasks_without_data_and_fails_when_none_has_any(data_dir, tmp_path, caplog):
    (data_dir / "hellaswag" / "hellaswag_val_full.txt.bz2").unlink()
    with caplog.at_level("WARNING"):
        res = run_suite(Bigram(), Chars(), ["all"], data_dir, limit=1)
    assert "hellaswag" not in res and {"arc_easy", "mmlu", "triviaqa"} <= set(res)
    assert "skipping hellaswag" in caplog.text
    with pytest.raises(PrunepilotError, match="no task data found"):
        run_suite(Bigram(), Chars(), ["all"], tmp_path / "empty")


def test_errors(data_dir, tmp_path):
    with pytest.raises(PrunepilotError, match="unknown task 'arc_hard'"):
        run_suite(Bigram(), Chars(), ["arc_hard"], data_dir)
    with pytest.raises(PrunepilotError, match="not found"):
        run_suite(Bigram(), Chars(), ["arc_easy"], tmp_path / "empty")
    with pytest.raises(PrunepilotError, match="freebaseqa=PATH"):
        run_suite(Bigram(), Chars(), ["freebaseqa"], data_dir)
    with pytest.raises(PrunepilotError, match="not a FreebaseQA"):
        bad = tmp_path / "bad.json"
        bad.write_text("[1, 2]")
        run_suite(Bigram(), Chars(), [f"freebaseqa={bad}"], data_dir)


# ----------------------------------------------------------------------------- real data

def shared_dir() -> Path:
    return Path(os.environ.get("PRUNEPILOT_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))


@pytest.mark.slow
def test_real_arc_easy_stories260k():
    root = shared_dir()
    model_dir, data = root / "models" / "stories260K", root / "data"
    if not (model_dir / "model.safetensors").exists() or not (data / "zeroshot" / "arc_easy.jsonl").exists():
        pytest.skip(f"shared models/data not found under {root} (set PRUNEPILOT_SHARED)")
    from prunepilot.modeling import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(model_dir)
    res = run_suite(model, tok, ["arc_easy"], data, limit=20)["arc_easy"]
    assert res["n"] == 20 and 0.0 <= res["acc"] <= 1.0 and res["protocol"]["n_total"] == 2376
    items = zeroshot.load_query_choices(data / "zeroshot" / "arc_easy.jsonl", limit=5)
    reqs = [Request(*encode_pair(tok, c, t)) for it in items for c, t in zip(it.contexts, it.continuations)]
    reused, plain = score_requests(model, reqs), score_requests(model, reqs, reuse_prefix=False)
    assert [r.logprob for r in reused] == pytest.approx([p.logprob for p in plain], abs=1e-3)

