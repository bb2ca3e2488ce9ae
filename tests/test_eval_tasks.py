"""Evaluation tasks: data loaders on tiny files (lm-eval's prompts), MMLU prompt and letter scoring, factual QA
(normalisation, greedy generation, shots), and malformed data files named by file and line."""
from __future__ import annotations

import bz2
import json
import re

import pytest
import torch

from prunepilot.errors import PrunepilotError
from prunepilot.eval import factual_qa, mmlu, zeroshot
from prunepilot.eval.suite import run_suite

from eval_fakes import Bigram, Chars, data_dir, tiny_llama, write_jsonl  # noqa: F401 (data_dir: a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


# ----------------------------------------------------------------------------- zero-shot multiple choice

def test_loaders_build_lm_eval_prompts(data_dir):
    item = zeroshot.load_query_choices(data_dir / "zeroshot" / "arc_easy.jsonl")[0]
    assert item.contexts == ["Question: Q1?\nAnswer:"] * 2
    assert item.continuations == [" aaaa", " b"] and item.norm_lens == [4, 1] and item.gold == 0
    assert zeroshot.load_obqa(data_dir / "zeroshot" / "openbook_qa.jsonl")[0].contexts[0] == "Question: Q1?"
    hs = zeroshot.load_hellaswag(data_dir / "hellaswag" / "hellaswag_val_full.txt.bz2")
    assert len(hs) == 2 and hs[1].gold == 2 and hs[1].contexts[0] == "Ctx two" and hs[1].continuations[3] == " ba"
    assert len(zeroshot.load_hellaswag(data_dir / "hellaswag" / "hellaswag_val_full.txt.bz2", limit=1)) == 1
    w = zeroshot.load_winogrande(data_dir / "zeroshot" / "winogrande.jsonl")[0]
    assert w.contexts == ["Sam beat Ann so Sam", "Sam beat Ann so Ann"] and w.continuations == [" ab", " ab"]
    # the local copies' own shapes: BoolQ's query starts "Passage: " (lm-eval has none), PIQA's ends in "\n"
    write_jsonl(data_dir / "b.jsonl", [{"query": "Passage: Cats purr.\nQuestion: do cats purr?", "choices": ["no", "yes"],
                                        "gold": 1}])
    assert zeroshot.load_boolq(data_dir / "b.jsonl")[0].contexts[0] == "Cats purr.\nQuestion: do cats purr?\nAnswer:"
    write_jsonl(data_dir / "p.jsonl", [{"query": "Question: Open a jar?\n", "choices": ["twist", "bite"], "gold": 0}])
    assert zeroshot.load_query_choices(data_dir / "p.jsonl")[0].contexts[0] == "Question: Open a jar?\nAnswer:"


# ----------------------------------------------------------------------------- MMLU

def test_mmlu_prompt_format():
    shots = [("1+1?", ["1", "2", "3", "4"], "B")]
    question = ("2+2?", ["4", "5", "6", "7"], "A")
    text = mmlu.prompt_prefix("high_school_mathematics", shots) + mmlu.format_example(question, False)
    assert text == ("The following are multiple choice questions (with answers) about high school mathematics.\n\n"
                    "1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n2+2?\nA. 4\nB. 5\nC. 6\nD. 7\nAnswer:")
    assert len(mmlu.CATEGORIES) == 57
    assert set(mmlu.CATEGORIES.values()) == {"STEM", "humanities", "social sciences", "other"}


def test_mmlu_letter_scoring(data_dir):
    # after "Answer:" the shared " " of " A".." D" is appended; p(letter | " ") favours B for every question
    model = Bigram({" ": {"B": 0.4, "C": 0.2, "A": 0.1, "D": 0.05}})
    res = mmlu.evaluate_mmlu(model, Chars(), data_dir / "mmlu", num_fewshot=5)
    assert res["n"] == 3 and res["acc"] == pytest.approx(2 / 3)
    assert res["acc_subject_avg"] == pytest.approx(0.75)
    assert res["subjects"]["abstract_algebra"] == {"acc": 0.5, "n": 2}
    assert res["categories"] == {"STEM": {"acc": 0.5, "n": 2}, "humanities": {"acc": 1.0, "n": 1}}


def test_mmlu_letters_as_continuations_when_not_single_tokens(data_dir):
    class Spaced(Chars):  # "...: A" ends [" ", "A"] but "...: B" ends in one token: no shared single-token layout
        def encode(self, text, add_special_tokens=True, **_):
            if text.endswith(" B"):
                return super().encode(text[:-2], add_special_tokens) + [5]
            return super().encode(text, add_special_tokens)

    assert mmlu.letter_tokens(Spaced()) is None
    model = Bigram({" ": {"B": 0.4, "C": 0.2, "A": 0.1, "D": 0.05}, ":": {" ": 0.5, "\x05": 0.01}})
    res = mmlu.evaluate_mmlu(model, Spaced(), data_dir / "mmlu", num_fewshot=5)
    # " A" = log .5 + log .1 = -3.0, " B" = log .01 = -4.6, " C" = log .5 + log .2 = -2.3, " D" = -3.7: always C
    assert res["acc"] == pytest.approx(1 / 3)  # only Q2 (gold C) is right


def test_mmlu_letters_are_tokenized_in_context_like_the_shots():
    class DummyPrefix(Chars):  # SentencePiece-like: a word-initial space is part of the token ("▁A" = 200 + ord)
        def encode(self, text, add_special_tokens=True, **_):
            ids, i = [], 0
            text = " " + text  # the dummy prefix
            while i < len(text):
                if text[i] == " " and i + 1 < len(text) and text[i + 1] != " ":
                    ids.append(200 + ord(text[i + 1]))
                    i += 2
                else:
                    ids.append(ord(text[i]))
                    i += 1
            return ids

    tok = DummyPrefix()
    assert tok.encode(" A") == [32, 265]  # on its own " A" would be a space token + "▁A": one space too many
    shared, letters = mmlu.letter_tokens(tok)
    assert shared == [] and letters == [265, 266, 267, 268]  # in context: "...Answer:" + "▁A", as in the shots


# ----------------------------------------------------------------------------- factual QA

def test_normalize_and_exact_match():
    assert factual_qa.normalize_answer("  The Beatles!! ") == "beatles"
    assert factual_qa.normalize_answer("An apple, a day") == "apple day"
    assert factual_qa.exact_match("an Onion.", ["Allium", "onion"])
    assert not factual_qa.exact_match("Paris, France", ["Paris"])


def test_greedy_generation_stops_at_newline():
    model = Bigram({":": {" ": 0.9}, " ": {"o": 0.9}, "o": {"k": 0.9}, "k": {"\n": 0.9}})
    out = factual_qa.greedy_generate(model, Chars(), ["Question: Which?\nAnswer:", "Answer:"], batch_size=2)
    assert out == ["ok", "ok"]
    looping = Bigram({":": {" ": 0.9}, " ": {"a": 0.9}, "a": {"a": 0.9}})
    assert factual_qa.greedy_generate(looping, Chars(), ["x:"], max_new_tokens=16) == ["a" * 15]  # " " + 15 "a"
    newline_first = Bigram({":": {"\n": 0.9}, "\n": {"o": 0.9}, "o": {"k": 0.9}, "k": {"\n": 0.9}})
    assert factual_qa.greedy_generate(newline_first, Chars(), ["Answer:"]) == ["ok"]  # a leading newline is skipped
    comma = Bigram({":": {" ": 0.9}, " ": {"o": 0.9}, "o": {"k": 0.9}, "k": {",": 0.9}, ",": {" ": 0.9}})
    assert factual_qa.greedy_generate(comma, Chars(), ["Answer:"]) == ["ok"]  # lm-eval's triviaqa stops: \n . ,


def test_batched_generation_matches_one_by_one():
    model, tok = tiny_llama(seed=2), Chars()
    prompts = ["Question: short?\nAnswer:", "Question: a much longer question, padded on the left?\nAnswer:", "Q:"]
    batched = factual_qa.greedy_generate(model, tok, prompts, max_new_tokens=6, batch_size=3)
    single = [factual_qa.greedy_generate(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single
    ids = torch.tensor([tok.encode(prompts[0], add_special_tokens=False)])
    ref = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
    assert single[0] == factual_qa.cut_at_stop(tok.decode(ref.tolist()))[0].strip()


def test_qa_shots_come_from_the_end_of_the_file_and_are_not_evaluated(data_dir):
    seen = []

    class Recorder(Bigram):
        def forward(self, input_ids, **kw):
            seen.append(Chars().decode(input_ids[0].tolist()))
            return super().forward(input_ids, **kw)

    res = run_suite(Recorder(), Chars(), ["triviaqa"], data_dir, qa_shots=1, batch_size=1)["triviaqa"]
    assert res["n"] == 1 and res["protocol"]["shots"] == 1 and res["protocol"]["n_total"] == 1
    assert seen[0].startswith("Question: Other?\nAnswer: yes\n\nQuestion: Which?\nAnswer:")  # shot = last item
    with pytest.raises(PrunepilotError, match="cannot give 2 shots"):
        run_suite(Bigram(), Chars(), ["triviaqa"], data_dir, qa_shots=2)


def test_freebaseqa_file(tmp_path):
    data = {"Questions": [
        {"RawQuestion": "which word means fine?", "ProcessedQuestion": "which word means fine",
         "Parses": [{"Answers": [{"AnswersName": ["OK"]}]}, {"Answers": [{"AnswersName": ["okay"]}]}]},
        {"RawQuestion": "opposite of yes?", "Parses": [{"Answers": [{"AnswersName": ["no"]}]}]}]}
    path = tmp_path / "FreebaseQA-eval.json"
    path.write_text(json.dumps(data))
    items = factual_qa.load_freebaseqa(path)
    assert items[0].prompt == "Question: which word means fine?\nAnswer:" and items[0].aliases == ["OK", "okay"]
    model = Bigram({":": {" ": 0.9}, " ": {"o": 0.9}, "o": {"k": 0.9}, "k": {"\n": 0.9}})
    res = run_suite(model, Chars(), [f"freebaseqa={path}"], tmp_path / "nowhere")
    assert res["freebaseqa"]["acc"] == 0.5 and res["freebaseqa"]["n"] == 2


# ----------------------------------------------------------------------------- malformed data

@pytest.mark.parametrize("task,content,message", [
    ("arc_easy", '{"query": "Q", "choices": ["a", "b"], "gold": 0}\n{"query": "Q", "choices": ["a"', ":2: not valid JSON"),
    ("arc_easy", '{"query": "Q", "choices": ["a", "b"]}', ":1: expected a JSON object with 'query', 'choices', "
                                                          "'gold'; missing 'gold'"),
    ("piqa", '\n{"query": "Q", "choices": ["a", "b"], "gold": 2}', ":2: gold 2 is not one of the 2 choices"),
    ("boolq", '{"query": "Q", "choices": [], "gold": 0}', ":1: choices must be a list of at least 2 strings"),
    ("openbookqa", '{"query": "Q", "choices": ["a", "b"], "gold": "yes"}', ":1: gold must be a choice index"),
    ("winogrande", '{"context_options": ["x"], "continuation": "c", "gold": 0}', ":1: context_options must be a list"),
    ("triviaqa", '{"context": "Question: Q?\\nAnswer:", "aliases": []}', ":1: expected a JSON object with "
                                                                        "'context', 'answer'; missing 'answer'"),
    ("triviaqa", '[1, 2]', ":1: expected a JSON object"),
    ("hellaswag", "Ctx one\n0\naaaa\nb\nab\nba\nCtx two\n2\naaaa\n", ":7: the file ends inside a task"),
    ("hellaswag", "Ctx one\n4\naaaa\nb\nab\nba\n", ":1: gold 4 is not one of the 4 choices"),
])
def test_malformed_data_files_name_the_file_and_line(task, content, message, tmp_path, data_dir):
    bad = tmp_path / ("bad.txt.bz2" if task == "hellaswag" else "bad.jsonl")
    if task == "hellaswag":
        with bz2.open(bad, "wt") as f:
            f.write(content)
    else:
        bad.write_text(content)
    with pytest.raises(PrunepilotError, match=f"^{re.escape(str(bad) + message)}"):
        run_suite(Bigram(), Chars(), [f"{task}={bad}"], data_dir)

