"""GSM8K (grade-school math): greedy generation after k worked examples, exact match of the final number.

Prompt (lm-eval's gsm8k layout): k shots "Question: {q}\\nAnswer: {worked answer} The answer is {n}.\\n\\n",
the first k of train.jsonl, with the train answers' <<calculator>> annotations removed and their final
"#### n" written as "The answer is n." (gsm8k-cot's phrasing, which the answer extraction looks for); then
"Question: {q}\\nAnswer:". Generation is greedy, at most max_new_tokens (256, lm-eval's max_gen_toks), stopping at
EOS or "Question:" (lm-eval's `until`; it covers "\\n\\nQuestion:").
Gold: the number after "####" of the test answer. Prediction: the number after "The answer is", else after
"####", else the last number of the generation. Numbers compare by value (commas, "$" and a final "." ignored).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

from ..errors import PrunepilotError
from .factual_qa import greedy_generate
from .loglik import encode
from .zeroshot import read_records

STOPS = ("Question:",)
MAX_NEW_TOKENS = 256
_NUMBER = r"-?(?:\$\s*)?[\d,]*\.?\d+"
_CALCULATOR = re.compile(r"<<[^>]*>>")


@dataclass
class GSMItem:
    question: str
    solution: str        # the worked answer without its final "#### n" line
    answer: str          # the gold number as written after "####"

    @property
    def prompt(self) -> str:
        return f"Question: {self.question}\nAnswer:"

    def shot(self) -> str:
        return f"{self.prompt} {self.solution} The answer is {self.answer}.\n\n"


def load_gsm8k(path: Path, limit: int | None = None) -> list[GSMItem]:
    """{"question", "answer": "... #### n"} jsonl."""
    items = []
    for where, r in read_records(path, limit, ("question", "answer")):
        solution, sep, gold = str(r["answer"]).rpartition("####")
        if not sep or as_number(gold) is None:
            raise PrunepilotError(f"{where}: the answer has no final '#### NUMBER'")
        items.append(GSMItem(str(r["question"]), _CALCULATOR.sub("", solution).strip(), gold.strip()))
    return items


def as_number(text: str | None) -> Decimal | None:
    """'1,234.50' / '$12' / '7.' -> Decimal; None when it is not a number."""
    if text is None:
        return None
    cleaned = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        return Decimal(cleaned)
    except InvalidOperation:
        return None


def extract_answer(generation: str) -> str | None:
    """The number after "The answer is", else after "####", else the generation's last number; None if none."""
    for marker in (r"The answer is", r"####"):
        found = re.search(marker + r"\s*:?\s*(" + _NUMBER + ")", generation, re.IGNORECASE)
        if found:
            return found.group(1)
    numbers = re.findall(_NUMBER, generation)
    return numbers[-1] if numbers else None


def is_correct(generation: str, gold: str) -> bool:
    pred = as_number(extract_answer(generation))
    return pred is not None and pred == as_number(gold)


def answer_items(model, tokenizer, items: list[GSMItem], shots: list[GSMItem], max_new_tokens: int = MAX_NEW_TOKENS,
                 batch_size: int = 8, device=None, add_bos: bool = False) -> dict:
    """Raw outcomes: {"predictions" (the generations), "correct", "tokens"}, one entry per item."""
    prefix = "".join(s.shot() for s in shots)
    prompts = [prefix + it.prompt for it in items]
    gens = greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size, device, add_bos, STOPS)
    tokens = {"prompt_tokens": sum(len(encode(tokenizer, p, add_bos)) for p in prompts)}
    return {"predictions": gens, "correct": [is_correct(g, it.answer) for g, it in zip(gens, items)],
            "tokens": tokens}
