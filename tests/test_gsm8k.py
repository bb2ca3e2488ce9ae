"""GSM8K: answer extraction on hand-written generations, the prompt, and the task end to end."""
import json

import pytest

from prunepilot.errors import PrunepilotError
from prunepilot.eval import gsm8k
from prunepilot.eval.suite import run_suite

from conftest import shared_path
from eval_fakes import Bigram, Chars, write_jsonl


@pytest.mark.parametrize("generation,expected", [
    (" Natalia sold 48/2 = 24 clips.\nThe answer is 72.", "72"),
    (" 3 + 4 = 7. The answer is $1,250.50", "$1,250.50"),
    (" the answer is: -3\nSo 5 apples", "-3"),                   # case-insensitive, an optional colon
    (" She has 12 - 4 = 8 left.\n#### 8", "8"),                   # "####" when "The answer is" is absent
    (" 5 cars, then 7 more, 12 in all", "12"),                    # else the last number
    (" I do not know", None),
])
def test_extract_answer(generation, expected):
    assert gsm8k.extract_answer(generation) == expected


@pytest.mark.parametrize("generation,gold,correct", [
    ("The answer is 1,000.", "1000", True),      # commas and the final "." do not count
    ("The answer is $18.00", "18", True),        # compared by value
    ("The answer is 18, not 20", "20", False),   # "The answer is" wins over the last number
    ("so 3 + 4 = 7", "7", True),
    ("nothing", "7", False),
])
def test_is_correct(generation, gold, correct):
    assert gsm8k.is_correct(generation, gold) is correct


def test_loader_and_shot_text(tmp_path):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, [{"question": "Q?", "answer": "48/2 = <<48/2=24>>24 clips.\n24+48 = <<24+48=72>>72\n#### 72"}])
    item = gsm8k.load_gsm8k(path)[0]
    assert (item.solution, item.answer) == ("48/2 = 24 clips.\n24+48 = 72", "72")
    assert item.prompt == "Question: Q?\nAnswer:"
    assert item.shot() == "Question: Q?\nAnswer: 48/2 = 24 clips.\n24+48 = 72 The answer is 72.\n\n"
    write_jsonl(path, [{"question": "Q?", "answer": "no final line"}])
    with pytest.raises(PrunepilotError, match="####"):
        gsm8k.load_gsm8k(path)


def gsm_data(root, n_train=2):
    write_jsonl(root / "gsm8k" / "train.jsonl", [{"question": f"S{i}?", "answer": f"#### {i}"} for i in range(n_train)])
    write_jsonl(root / "gsm8k" / "test.jsonl", [{"question": "T?", "answer": "x\n#### 7"},
                                                {"question": "U?", "answer": "#### 8"}])
    return root


def test_task_generates_greedily_and_stops_at_question(tmp_path):
    # the bigram answers " 7\nQuestion:" after "Answer:": cut at "Question:", last number 7
    chain = " 7\nQuestion: "
    model = Bigram({a: {b: 0.9} for a, b in zip(":" + chain, chain)})
    res = run_suite(model, Chars(), ["gsm8k"], gsm_data(tmp_path), gsm8k_shots=2)["gsm8k"]
    assert (res["acc"], res["n"], res["protocol"]["shots"]) == (0.5, 2, 2)
    assert res["examples"][0]["prediction"] == "7" and res["examples"][0]["correct"]
    prompts = res["tokens"]["prompt_tokens"]  # 2 x (2 shots + the question), one token per character
    shots = "Question: S0?\nAnswer:  The answer is 0.\n\nQuestion: S1?\nAnswer:  The answer is 1.\n\n"
    assert prompts == 2 * len(shots + "Question: T?\nAnswer:")


def test_too_few_shots_is_an_error(tmp_path):
    with pytest.raises(PrunepilotError, match="fewer than 8 shots"):
        run_suite(Bigram(), Chars(), ["gsm8k"], gsm_data(tmp_path))


@pytest.mark.usefixtures("one_thread")
def test_cli_gsm8k_on_smollm2(tmp_path):
    """End to end on the real SmolLM2-135M: `prunepilot eval MODEL --tasks gsm8k --limit 2` (8 shots; 32 new
    tokens at most, so it takes seconds, not minutes, on a busy CPU)."""
    from prunepilot.cli import main

    model = shared_path("models", "smollm2-135m-instruct")
    shared_path("data", "gsm8k", "test.jsonl")
    out = tmp_path / "gsm8k.json"
    assert main(["eval", str(model), "--tasks", "gsm8k", "--limit", "2", "--gsm8k-max-tokens", "32",
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())["results"]["gsm8k"]
    assert res["n"] == 2 and res["protocol"]["shots"] == 8 and res["protocol"]["max_new_tokens"] == 32
    assert 0.0 <= res["acc"] <= 1.0 and all(isinstance(e["prediction"], str) for e in res["examples"])


def test_cli_refuses_negative_shots_before_loading(capsys):
    from prunepilot.cli import main

    assert main(["eval", "no-such-model", "--tasks", "gsm8k", "--gsm8k-shots", "-1"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("prunepilot")]
    assert len(err) == 1 and "--gsm8k-shots must be >= 0" in err[0]
