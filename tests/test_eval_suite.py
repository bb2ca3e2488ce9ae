"""Evaluation suite: exact scores from a bigram "model" whose log-probs we set by hand, batching/prefix-reuse
equivalence on tiny random transformers, data loaders on tiny files, errors, and one real-data check."""
from __future__ import annotations

import bz2
import json
import math
import os
import random
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers as tf

from prunepilot.errors import PrunepilotError
from prunepilot.eval import factual_qa, mmlu, zeroshot
from prunepilot.eval.loglik import Request, _plan_batches, can_reuse_prefix, encode_pair, score_requests, truncate
from prunepilot.eval.suite import TASKS, run_suite

V = 128  # ASCII


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


class Chars:
    """ASCII tokenizer: one token per character, id = ord(c)."""
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __len__(self):
        return V

    def encode(self, text, add_special_tokens=True, **_):
        ids = [ord(c) for c in text]
        return [self.bos_token_id] + ids if add_special_tokens else ids

    def decode(self, ids, **_):
        return "".join(chr(int(i)) for i in ids if int(i) >= 9)


def dist(probs: dict[str, float]) -> torch.Tensor:
    """Logits whose softmax is exactly `probs`, the remaining mass spread evenly over the other tokens."""
    rest = (1.0 - sum(probs.values())) / (V - len(probs))
    logits = torch.full((V,), math.log(rest))
    for ch, p in probs.items():
        logits[ord(ch)] = math.log(p)
    return logits


U = {" ": 0.35, "a": 0.2, "b": 0.05}  # default next-token distribution


class Bigram(torch.nn.Module):
    """p(next | current token) = rows[current]; every other row is U. Accepts (and ignores) HF kwargs."""

    def __init__(self, rows: dict[str, dict[str, float]] | None = None):
        super().__init__()
        table = dist(U).repeat(V, 1)  # (V, V)
        for ch, probs in (rows or {}).items():
            table[ord(ch)] = dist(probs)
        self.table = torch.nn.Parameter(table, requires_grad=False)

    def forward(self, input_ids, **_):
        return SimpleNamespace(logits=self.table[input_ids], past_key_values=None)  # (b, L, V)


def lp(p: float) -> float:
    return math.log(p)


def tiny_llama(seed: int = 0, vocab: int = V) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


# ----------------------------------------------------------------------------- tiny data on disk

def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_mmlu(root: Path, subjects: dict[str, list[tuple]]) -> None:
    for split in ("dev", "test"):
        (root / "mmlu" / split).mkdir(parents=True, exist_ok=True)
    for subject, questions in subjects.items():
        dev = "".join(f"Shot {i}?,ab,ba,aa,bb,A\n" for i in range(5))
        (root / "mmlu" / "dev" / f"{subject}_dev.csv").write_text(dev)
        test = "".join(f'"{q}",a,b,"a, b",bb,{ans}\n' for q, ans in questions)
        (root / "mmlu" / "test" / f"{subject}_test.csv").write_text(test)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    z = tmp_path / "zeroshot"
    mc = [{"query": "Question: Q1?", "choices": ["aaaa", "b"], "gold": 0},
          {"query": "Question: Q2?", "choices": ["aaaa", "b"], "gold": 1}]
    for name in ("arc_easy", "arc_challenge", "boolq", "piqa", "openbook_qa"):
        write_jsonl(z / f"{name}.jsonl", mc)
    wino = {"context_options": ["Sam beat Ann so Sam", "Sam beat Ann so Ann"], "continuation": "ab"}
    write_jsonl(z / "winogrande.jsonl", [{**wino, "gold": 0}, {**wino, "gold": 1}])
    write_jsonl(z / "triviaqa_sm_sub.jsonl", [
        {"context": "Question: Which?\nAnswer:", "answer": "ok", "aliases": ["OK", "okay"]},
        {"context": "Question: Other?\nAnswer:", "answer": "yes", "aliases": []}])
    (tmp_path / "hellaswag").mkdir()
    with bz2.open(tmp_path / "hellaswag" / "hellaswag_val_full.txt.bz2", "wt") as f:
        f.write("Ctx one\n0\naaaa\nb\nab\nba\nCtx two\n2\naaaa\nb\nab\nba\n")
    write_mmlu(tmp_path, {"abstract_algebra": [("Q1", "B"), ("Q2", "C")], "philosophy": [("Q3", "B")]})
    write_jsonl(tmp_path / "gsm8k" / "train.jsonl", [{"question": f"S{i}?", "answer": f"{i}+1=<<{i}+1={i + 1}>>{i + 1}\n"
                                                      f"#### {i + 1}"} for i in range(8)])
    write_jsonl(tmp_path / "gsm8k" / "test.jsonl", [{"question": "T?", "answer": "#### 7"},
                                                    {"question": "U?", "answer": "#### 1,000"}])
    return tmp_path


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


def test_acc_and_acc_norm_choose_differently():
    # context-free model: ll(" aaaa") = log .35 + 4 log .2 = -7.49 (per char -1.87)
    #                     ll(" b")    = log .35 + log .05  = -4.05 (per char -4.05)
    items = [zeroshot.MCItem(["Q:"] * 2, [" aaaa", " b"], gold, [4, 1]) for gold in (0, 1)]
    lls = zeroshot.choice_loglikelihoods(Bigram(), Chars(), items, batch_size=3)
    expected = [lp(.35) + 4 * lp(.2), lp(.35) + lp(.05)]
    assert lls[0] == pytest.approx(expected, abs=1e-4)
    m = zeroshot.mc_metrics(items, lls)
    assert m["acc"] == 0.5 and m["acc_norm"] == 0.5  # acc picks " b" (item 2 right), acc_norm " aaaa" (item 1)
    assert [int(torch.tensor(x).argmax()) for x in lls] == [1, 1]


def test_winogrande_partial_scoring():
    # the shared continuation " ab" differs only in p(" " | last context char): 'm' -> .6, 'n' -> .1
    model = Bigram({"m": {" ": 0.6}, "n": {" ": 0.1}})
    ctx = ["Sam beat Ann so Sam", "Sam beat Ann so Ann"]
    items = [zeroshot.MCItem(ctx, [" ab"] * 2, 0, [2, 2]), zeroshot.MCItem(ctx, [" ab"] * 2, 1, [2, 2])]
    lls = zeroshot.choice_loglikelihoods(model, Chars(), items)
    assert lls[0] == pytest.approx([lp(.6) + lp(.2) + lp(.05), lp(.1) + lp(.2) + lp(.05)], abs=1e-4)
    m = zeroshot.mc_metrics(items, lls, norm=False)
    assert m["acc"] == 0.5 and "acc_norm" not in m


def test_encode_pair_moves_trailing_space_and_truncate_keeps_continuation():
    ctx, cont = encode_pair(Chars(), "Answer: ", "yes")
    assert ctx == [ord(c) for c in "Answer:"] and cont == [ord(c) for c in " yes"]
    r = truncate(Request(list(range(3, 13)), [20, 21, 22], shared=6), max_length=8)
    assert r.continuation == [20, 21, 22] and r.context == list(range(7, 13)) and r.shared == 2
    r = truncate(Request(list(range(3, 13)), list(range(20, 28))), max_length=8)  # 1 context + 7 = 8 inputs
    assert r.context == [12] and len(r.continuation) == 8
    with pytest.raises(PrunepilotError, match="a choice of 9 tokens does not fit the model's context of 8"):
        truncate(Request([3, 4], list(range(20, 29))), max_length=8)


# ----------------------------------------------------------------------------- batching and prefix reuse

def _random_requests(n_items: int = 6, seed: int = 0) -> list[Request]:
    rng = random.Random(seed)
    reqs = []
    for _ in range(n_items):
        ctx = [rng.randrange(3, V) for _ in range(rng.randint(1, 14))]
        for _ in range(rng.choice([2, 4])):
            reqs.append(Request(ctx, [rng.randrange(3, V) for _ in range(rng.randint(1, 6))]))
    return reqs


def test_plan_batches_cover_every_request_once():
    reqs = _random_requests(12, seed=1)
    keys = [tuple(r.context[:-1]) for r in reqs]
    rests = [r.context[-1:] + r.continuation[:-1] for r in reqs]
    for bs in (1, 3, 8):
        batches = _plan_batches(keys, rests, bs)
        assert sorted(i for b in batches for i in b) == list(range(len(reqs)))
        assert max(len(b) for b in batches) <= bs


@pytest.mark.parametrize("batch_size", [3, 8])
def test_batched_and_prefix_reuse_match_one_by_one(batch_size):
    model = tiny_llama()
    assert can_reuse_prefix(model) and not can_reuse_prefix(Bigram())
    reqs = _random_requests()
    one = [score_requests(model, [r], batch_size=1, reuse_prefix=False)[0] for r in reqs]
    plain = score_requests(model, reqs, batch_size=batch_size, reuse_prefix=False)
    reused = score_requests(model, reqs, batch_size=batch_size)  # automatic: prefix KV reuse on llama
    for a, b, c in zip(one, plain, reused):
        assert b.logprob == pytest.approx(a.logprob, abs=1e-4)
        assert c.logprob == pytest.approx(a.logprob, abs=1e-4)
        assert a.greedy == b.greedy == c.greedy


@pytest.mark.parametrize("reuse", [True, False])
def test_lm_head_runs_only_on_scored_positions_and_scores_match_a_full_forward(reuse):
    model = tiny_llama(seed=2)
    rng = random.Random(3)
    reqs = [Request([rng.randrange(3, V) for _ in range(rng.randint(5, 30))], [], [10, 11, 12, 13])
            for _ in range(5)]
    reqs += [Request([rng.randrange(3, V) for _ in range(12)], [rng.randrange(3, V) for _ in range(3)])]
    positions = []  # sequence length seen by the lm-head, per call
    hook = model.lm_head.register_forward_hook(lambda m, inp, out: positions.append(inp[0].shape[1]))
    try:
        score_requests(model, reqs[:5], batch_size=8, reuse_prefix=reuse)  # the candidate rows: one batch
    finally:
        hook.remove()
    lens = [len(r.context) for r in reqs[:5]]
    # reuse: the prefix pass keeps one position, then each row's rest is its last context token; plain:
    # right-padded whole contexts, scored from the shortest row's last position on
    assert positions == ([1, 1] if reuse else [max(lens) - min(lens) + 1]) and max(lens) - min(lens) + 1 < max(lens)
    scores = score_requests(model, reqs, batch_size=3, reuse_prefix=reuse)
    with torch.no_grad():
        for r, s in zip(reqs, scores):
            ids = torch.tensor([r.context + r.continuation[:-1]])
            logp = model(input_ids=ids).logits[0].float().log_softmax(-1)  # every position, by hand
            n = len(r.context)
            if r.candidates is not None:
                assert s.candidates == pytest.approx(logp[n - 1, r.candidates].tolist(), abs=1e-4)
            else:
                want = sum(float(logp[n - 1 + j, t]) for j, t in enumerate(r.continuation))
                assert s.logprob == pytest.approx(want, abs=1e-4)


def test_mmlu_prefix_cache_matches_no_cache():
    model, tok = tiny_llama(seed=1), Chars()
    shots = [(f"Shot {i}?", ["ab", "ba", "aa", "bb"], "A") for i in range(5)]
    questions = [("What is it?", ["a", "b", "c", "d"], "B"), ("A longer question here?", ["x", "y", "z", "w"], "D"),
                 ("Q?", ["1", "2", "3", "4"], "A")]
    reqs, reduced = mmlu.subject_requests(tok, "abstract_algebra", shots, questions, 5, max_length=4096)
    assert reduced == 0 and all(r.shared > 100 for r in reqs)
    cached = score_requests(model, reqs, batch_size=2)
    plain = score_requests(model, reqs, batch_size=2, reuse_prefix=False)
    for a, b in zip(cached, plain):
        assert a.candidates == pytest.approx(b.candidates, abs=1e-4)


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


# ----------------------------------------------------------------------------- factual QA

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


def test_prefill_flops_hand_counted_on_a_tiny_llama():
    """hidden 8, intermediate 12, 2 layers, 2 heads x head_dim 4, 1 KV head, vocab 16, seq 3:
    per block q 8x8, k 8x4, v 8x4, o 8x8, gate/up/down 3 x 8x12 = 64+32+32+64+288 = 480 weights -> 960 FLOPs;
    attention 4 x 8 x (3+1)/2 = 64 per layer; head 2 x 8 x 16 = 256 per token, / 3 with the last logits only."""
    import transformers as tf

    from prunepilot.eval.flops import ideal_speedup, prefill_flops

    cfg = tf.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=4, tie_word_embeddings=False)
    model = tf.LlamaForCausalLM(cfg)
    f = prefill_flops(model, 3)
    assert f == {"blocks": 2 * 960, "attention": 2 * 64, "head": 256 / 3, "total": 1920 + 128 + 256 / 3}
    assert prefill_flops(model, 3, last_logits_only=False)["head"] == 256
    small = tf.LlamaForCausalLM(tf.LlamaConfig(**{**cfg.to_dict(), "intermediate_size": 6}))
    assert ideal_speedup(model, small, 3) == pytest.approx(f["total"] / (f["total"] - 2 * 2 * 3 * 8 * 6))
