"""MMLU, k-shot (default 5) with the dev split as shots, the hendrycks/test prompt as lm-eval writes it
(one space in "about {subject}", where the original script has two) and its scoring.

Prompt: "The following are multiple choice questions (with answers) about {subject words}.\\n\\n", then k
dev examples "Q\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: X\\n\\n", then the test question ending "Answer:".
The prediction is the argmax of the next-token log-probs of " A", " B", " C", " D" (one forward per
question). When a prompt exceeds the model's context, shots are dropped for that question (as the
reference code does). The k-shot prefix of a subject is computed once and its KV cache reused by all the
subject's questions (see loglik.py). Questions and choices are used exactly as in the CSV files, as the
hendrycks code does (lm-eval strips surrounding whitespace from the question: 1,165 test questions differ).

Reports accuracy over all questions (micro, as hendrycks and lm-eval), the mean of subject accuracies,
and per-subject and per-category accuracy with the standard mapping of the 57 subjects.
"""
from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

from ..errors import PrunepilotError
from ..engine.model_config import context_length
from .loglik import Request, encode, encode_pair, score_requests
from .zeroshot import stderr

log = logging.getLogger(__name__)

LETTERS = ["A", "B", "C", "D"]

# hendrycks/test categories.py: subject -> subcategory -> category
_CATEGORY_OF_SUBCATEGORY = {
    "math": "STEM", "physics": "STEM", "chemistry": "STEM", "biology": "STEM", "computer science": "STEM",
    "engineering": "STEM",
    "history": "humanities", "philosophy": "humanities", "law": "humanities",
    "politics": "social sciences", "culture": "social sciences", "economics": "social sciences",
    "geography": "social sciences", "psychology": "social sciences",
    "other": "other", "business": "other", "health": "other",
}
SUBCATEGORIES = {
    "abstract_algebra": "math", "anatomy": "health", "astronomy": "physics", "business_ethics": "business",
    "clinical_knowledge": "health", "college_biology": "biology", "college_chemistry": "chemistry",
    "college_computer_science": "computer science", "college_mathematics": "math", "college_medicine": "health",
    "college_physics": "physics", "computer_security": "computer science", "conceptual_physics": "physics",
    "econometrics": "economics", "electrical_engineering": "engineering", "elementary_mathematics": "math",
    "formal_logic": "philosophy", "global_facts": "other", "high_school_biology": "biology",
    "high_school_chemistry": "chemistry", "high_school_computer_science": "computer science",
    "high_school_european_history": "history", "high_school_geography": "geography",
    "high_school_government_and_politics": "politics", "high_school_macroeconomics": "economics",
    "high_school_mathematics": "math", "high_school_microeconomics": "economics", "high_school_physics": "physics",
    "high_school_psychology": "psychology", "high_school_statistics": "math", "high_school_us_history": "history",
    "high_school_world_history": "history", "human_aging": "health", "human_sexuality": "culture",
    "international_law": "law", "jurisprudence": "law", "logical_fallacies": "philosophy",
    "machine_learning": "computer science", "management": "business", "marketing": "business",
    "medical_genetics": "health", "miscellaneous": "other", "moral_disputes": "philosophy",
    "moral_scenarios": "philosophy", "nutrition": "health", "philosophy": "philosophy", "prehistory": "history",
    "professional_accounting": "other", "professional_law": "law", "professional_medicine": "health",
    "professional_psychology": "psychology", "public_relations": "politics", "security_studies": "politics",
    "sociology": "culture", "us_foreign_policy": "politics", "virology": "health", "world_religions": "philosophy",
}
CATEGORIES = {s: _CATEGORY_OF_SUBCATEGORY[c] for s, c in SUBCATEGORIES.items()}

Row = tuple[str, list[str], str]  # question, 4 choices, answer letter


# ----------------------------------------------------------------------------- data and prompts

def list_subjects(mmlu_dir: Path) -> list[str]:
    test_dir = Path(mmlu_dir) / "test"
    if not test_dir.is_dir():
        raise PrunepilotError(f"MMLU test folder not found: {test_dir}")
    subjects = sorted(p.name[: -len("_test.csv")] for p in test_dir.glob("*_test.csv"))
    if not subjects:
        raise PrunepilotError(f"no *_test.csv files in {test_dir}")
    return subjects


def load_rows(path: Path, limit: int | None = None) -> list[Row]:
    if not Path(path).exists():
        raise PrunepilotError(f"MMLU file not found: {path}")
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for rec in csv.reader(f):
            if limit is not None and len(rows) >= limit:
                break
            if len(rec) != 6 or rec[5].strip() not in LETTERS:
                raise PrunepilotError(f"{path}: expected 'question,A,B,C,D,answer' rows, got {rec[:2]}...")
            rows.append((rec[0], rec[1:5], rec[5].strip()))
    return rows


def format_example(row: Row, include_answer: bool) -> str:
    question, choices, answer = row
    text = question + "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, choices)) + "\nAnswer:"
    return text + f" {answer}\n\n" if include_answer else text


def prompt_prefix(subject: str, shots: list[Row]) -> str:
    header = f"The following are multiple choice questions (with answers) about {' '.join(subject.split('_'))}.\n\n"
    return header + "".join(format_example(s, True) for s in shots)


ANSWER_PROBE = "\nAnswer:"  # every prompt ends with this; letters are tokenized after it, as in the shots


def letter_tokens(tokenizer) -> tuple[list[int], list[int]] | None:
    """(shared leading tokens of " A".." D", one distinguishing token id per letter), or None.

    The letters are tokenized in context, as the tail of "\\nAnswer: A" beyond the tokens of "\\nAnswer:"
    (encoding " A" on its own would give a SentencePiece tokenizer's dummy-prefix "▁" an extra space).
    BPE tokenizers give one token each (" A"); some tokenizers give ["▁", "A"]: the shared "▁" is appended to
    the prompt and the letters compared one token later, which ranks them identically. None when the letters
    do not end in one distinct token each (then each " X" is scored as a continuation).
    """
    base = encode(tokenizer, ANSWER_PROBE)
    whole = [encode(tokenizer, f"{ANSWER_PROBE} {letter}") for letter in LETTERS]
    if any(w[:len(base)] != base for w in whole):  # the tokenizer merges ":" with the letter: no clean split
        return None
    encs = [w[len(base):] for w in whole]
    n = 0
    while all(len(e) > n + 1 for e in encs) and len({e[n] for e in encs}) == 1:
        n += 1
    if any(len(e) != n + 1 for e in encs) or len({e[n] for e in encs}) != 4:
        return None
    return encs[0][:n], [e[n] for e in encs]


# ----------------------------------------------------------------------------- evaluation

def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def subject_requests(tokenizer, subject: str, shots: list[Row], questions: list[Row], num_fewshot: int,
                     max_length: int, add_bos: bool = False) -> tuple[list[Request], int]:
    """Requests for a subject's questions and the number of questions whose shots were cut to fit max_length.

    Normally one request per question: context = prompt (+ shared letter tokens), candidates = letter ids.
    When the letters do not tokenize to one distinct token each, four requests per question score " A" ..
    " D" as continuations (lm-eval's way). Either way the k-shot prefix is marked as shared.
    """
    letters = letter_tokens(tokenizer)
    tail = letters[0] if letters else []
    prefix_ids: dict[int, list[int]] = {}
    requests, reduced = [], 0
    for q in questions:
        for k in range(num_fewshot, -1, -1):
            text = prompt_prefix(subject, shots[:k])
            if k not in prefix_ids:
                prefix_ids[k] = encode(tokenizer, text, add_bos)
            full = encode(tokenizer, text + format_example(q, False), add_bos) + tail
            if len(full) + 1 <= max_length:
                break
        reduced += k < num_fewshot
        shared = _common_prefix_len(prefix_ids[k], full)
        if letters:
            requests.append(Request(full, [], letters[1], shared=shared))
        else:
            prompt = text + format_example(q, False)
            for x in LETTERS:
                ctx, cont = encode_pair(tokenizer, prompt, " " + x, add_bos)
                requests.append(Request(ctx, cont, shared=_common_prefix_len(prefix_ids[k], ctx)))
    return requests, reduced


def _accuracy(correct: list[bool]) -> dict:
    acc = sum(correct) / len(correct)
    return {"acc": acc, "n": len(correct)}


def score_subjects(model, tokenizer, mmlu_dir: str | Path, subjects: list[str], num_fewshot: int = 5,
                   limit_per_subject: int | None = None, batch_size: int = 8, device=None,
                   add_bos: bool = False) -> dict:
    """Raw outcomes for `subjects`: {"subject_of": [...], "correct": [...], "prompts_with_fewer_shots",
    "n_total" (test questions before the limit), "tokens"}, one entry per question in file order."""
    mmlu_dir = Path(mmlu_dir)
    max_length = context_length(model)
    requests, owner, golds, reduced, n_total = [], [], [], 0, 0
    for subject in subjects:
        shots = load_rows(mmlu_dir / "dev" / f"{subject}_dev.csv")
        if len(shots) < num_fewshot:
            raise PrunepilotError(f"MMLU {subject}: {num_fewshot} shots asked, dev split has {len(shots)}")
        questions = load_rows(mmlu_dir / "test" / f"{subject}_test.csv")
        n_total += len(questions)
        questions = questions[:limit_per_subject]
        reqs, n_reduced = subject_requests(tokenizer, subject, shots, questions, num_fewshot, max_length, add_bos)
        requests += reqs
        owner += [subject] * len(questions)
        golds += [LETTERS.index(q[2]) for q in questions]
        reduced += n_reduced
    stats: dict = {}
    scores = score_requests(model, requests, batch_size=batch_size, device=device, desc="mmlu", stats=stats)
    if len(scores) == 4 * len(golds):  # letters scored as continuations, four requests per question
        letter_lp = [[s.logprob for s in scores[i:i + 4]] for i in range(0, len(scores), 4)]
    else:
        letter_lp = [s.candidates for s in scores]
    correct = [max(range(4), key=lambda j: lp[j]) == g for lp, g in zip(letter_lp, golds)]
    return {"subject_of": owner, "correct": correct, "prompts_with_fewer_shots": reduced, "n_total": n_total,
            "tokens": stats}


def evaluate_mmlu(model, tokenizer, mmlu_dir: str | Path, num_fewshot: int = 5, limit_per_subject: int | None = None,
                  batch_size: int = 8, device=None, add_bos: bool = False, subjects: list[str] | None = None) -> dict:
    subjects = subjects or list_subjects(Path(mmlu_dir))
    warn_if_letters_split(tokenizer)
    raw = score_subjects(model, tokenizer, mmlu_dir, subjects, num_fewshot, limit_per_subject, batch_size, device,
                         add_bos)
    return combine([raw], context_length(model)) | {"tokens": raw["tokens"]}


def combine(outcomes: list[dict], max_length: int) -> dict:
    """Metrics of several score_subjects outcomes (e.g. one per subject), as if scored in one call."""
    reduced = sum(o["prompts_with_fewer_shots"] for o in outcomes)
    warn_if_fewer_shots(reduced, max_length)
    return mmlu_metrics([s for o in outcomes for s in o["subject_of"]], [c for o in outcomes for c in o["correct"]]) | {
        "prompts_with_fewer_shots": reduced, "n_total": sum(o["n_total"] for o in outcomes)}


def warn_if_letters_split(tokenizer) -> None:
    if letter_tokens(tokenizer) is None:
        log.warning("MMLU: ' A'..' D' are not one distinct token each; scoring them as continuations")


def warn_if_fewer_shots(reduced: int, max_length: int) -> None:
    if reduced:
        log.warning("MMLU: %d prompts exceeded %d tokens and were given fewer shots", reduced, max_length)


def mmlu_metrics(subject_of: list[str], correct: list[bool]) -> dict:
    """Micro accuracy, mean of subject accuracies, per-category and per-subject accuracy."""
    if not correct:
        raise PrunepilotError("no MMLU questions to evaluate")
    by_subject: dict[str, list[bool]] = {}
    by_category: dict[str, list[bool]] = {}
    for s, c in zip(subject_of, correct):
        by_subject.setdefault(s, []).append(c)
        by_category.setdefault(CATEGORIES.get(s, "other"), []).append(c)
    subjects = {s: _accuracy(v) for s, v in by_subject.items()}
    acc = sum(correct) / len(correct)
    return {
        "acc": acc,
        "acc_stderr": stderr(acc, len(correct)),
        "acc_subject_avg": sum(v["acc"] for v in subjects.values()) / len(subjects),
        "n": len(correct),
        "categories": {c: _accuracy(by_category[c]) for c in ["STEM", "humanities", "social sciences", "other"]
                       if c in by_category},
        "subjects": subjects,
    }


def per_subject_limit(limit: int | None, n_subjects: int) -> int | None:
    """`limit` items for MMLU means about `limit` questions spread over all subjects."""
    return None if limit is None else max(1, math.ceil(limit / n_subjects))
