"""Zero-shot log-likelihood multiple choice (ARC, BoolQ, OpenBookQA, PIQA, HellaSwag, WinoGrande).

Prompts follow lm-eval-harness on the local data copies (see ../shared/README.md):

- ARC, PIQA: ``query`` (which starts "Question: ...") + "\\nAnswer:"; choice " {choice}".
- BoolQ: ``query`` without its "Passage: " prefix + "\\nAnswer:"; choices " no" / " yes".
- OpenBookQA: the question stem as is; choice " {choice}".
- HellaSwag: the preprocessed context; choice " {ending}".
- WinoGrande (partial scoring): the shared continuation " {rest of sentence}" given each of the 2 contexts.

acc = argmax_i sum log p(choice_i | context); acc_norm = argmax_i (sum log p) / len(choice_i in characters),
the length of the choice string without the leading space, exactly as lm-eval's acc_norm. Ties go to the
first choice (numpy argmax).
"""
from __future__ import annotations

import bz2
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import PrunepilotError
from .loglik import Request, encode_pair, score_requests


@dataclass
class MCItem:
    contexts: list[str]        # one per choice (identical unless partial scoring)
    continuations: list[str]   # one per choice, with the leading space
    gold: int
    norm_lens: list[int]       # characters per choice, for acc_norm


# ----------------------------------------------------------------------------- loaders

def _read_jsonl(path: Path, limit: int | None) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in itertools.islice((ln for ln in f if ln.strip()), limit):
            rows.append(json.loads(line))
    return rows


def _choice_item(context: str, choices: list[str], gold: int) -> MCItem:
    return MCItem([context] * len(choices), [" " + c for c in choices], int(gold), [len(c) for c in choices])


def load_query_choices(path: Path, limit: int | None = None, answer_prompt: bool = True) -> list[MCItem]:
    """{"query", "choices", "gold"} jsonl. answer_prompt appends "\\nAnswer:" to the query (ARC, BoolQ, PIQA)."""
    items = []
    for row in _read_jsonl(path, limit):
        query = row["query"].rstrip("\n") + "\nAnswer:" if answer_prompt else row["query"]
        items.append(_choice_item(query, row["choices"], row["gold"]))
    return items


def load_boolq(path: Path, limit: int | None = None) -> list[MCItem]:
    """BoolQ: lm-eval's prompt is "{passage}\nQuestion: {question}?\nAnswer:"; the local copy's query starts
    with "Passage: ", which is dropped."""
    items = load_query_choices(path, limit)
    for item in items:
        item.contexts = [c.removeprefix("Passage: ") for c in item.contexts]
    return items


def load_obqa(path: Path, limit: int | None = None) -> list[MCItem]:
    return load_query_choices(path, limit, answer_prompt=False)


def load_hellaswag(path: Path, limit: int | None = None) -> list[MCItem]:
    """6 lines per task: context, gold index, 4 endings, preprocessed by the file's maker: brackets and
    "[title]" markers mostly removed as lm-eval does, but the second context fragment is not capitalised
    (lm-eval joins ctx_a + " " + ctx_b.capitalize()). Read as it is; see README "Evaluation"."""
    items = []
    with bz2.open(path, "rt", encoding="utf-8") as f:
        lines = (ln.rstrip("\n") for ln in f)
        while limit is None or len(items) < limit:
            block = list(itertools.islice(lines, 6))
            if len(block) < 6:
                break
            items.append(_choice_item(block[0], block[2:6], int(block[1])))
    return items


def load_winogrande(path: Path, limit: int | None = None) -> list[MCItem]:
    """{"context_options": [2], "continuation", "gold"}: the continuation is scored after each context."""
    items = []
    for row in _read_jsonl(path, limit):
        cont = " " + row["continuation"].strip()
        n = len(row["context_options"])
        items.append(MCItem(list(row["context_options"]), [cont] * n, int(row["gold"]), [len(cont) - 1] * n))
    return items


# ----------------------------------------------------------------------------- scoring

def stderr(acc: float, n: int) -> float:
    """Sample standard error of a mean of 0/1 outcomes (lm-eval's acc_stderr)."""
    return math.sqrt(acc * (1 - acc) / (n - 1)) if n > 1 else float("nan")


def choice_loglikelihoods(model, tokenizer, items: list[MCItem], batch_size: int = 8, device=None,
                          add_bos: bool = False, desc: str = "mc", stats: dict | None = None) -> list[list[float]]:
    """Sum log p(continuation | context) of every choice of every item."""
    requests, owner = [], []
    for i, item in enumerate(items):
        for ctx, cont in zip(item.contexts, item.continuations):
            c, t = encode_pair(tokenizer, ctx, cont, add_bos)
            requests.append(Request(c, t))
            owner.append(i)
    scores = score_requests(model, requests, batch_size=batch_size, device=device, desc=desc, stats=stats)
    lls: list[list[float]] = [[] for _ in items]
    for i, s in zip(owner, scores):
        lls[i].append(s.logprob)
    return lls


def mc_metrics(items: list[MCItem], lls: list[list[float]], norm: bool = True) -> dict:
    """acc (and acc_norm) from per-choice log-likelihoods, with sample standard errors."""
    if not items:
        raise PrunepilotError("no items to evaluate")
    lp = [torch.tensor(x, dtype=torch.float64) for x in lls]
    gold = [it.gold for it in items]
    acc = sum(int(torch.argmax(x)) == g for x, g in zip(lp, gold)) / len(items)
    out = {"acc": acc, "acc_stderr": stderr(acc, len(items))}
    if norm:
        lens = [torch.tensor(it.norm_lens, dtype=torch.float64).clamp(min=1) for it in items]
        acc_norm = sum(int(torch.argmax(x / n)) == g for x, n, g in zip(lp, lens, gold)) / len(items)
        out.update(acc_norm=acc_norm, acc_norm_stderr=stderr(acc_norm, len(items)))
    out["n"] = len(items)
    return out


def score_items(model, tokenizer, items: list[MCItem], batch_size: int = 8, device=None, add_bos: bool = False,
                desc: str = "mc") -> dict:
    """Raw outcomes: {"lls": per-choice log-likelihoods of every item, "tokens": tokens run}."""
    stats: dict = {}
    lls = choice_loglikelihoods(model, tokenizer, items, batch_size, device, add_bos, desc, stats)
    return {"lls": lls, "tokens": stats}


def evaluate_mc(model, tokenizer, items: list[MCItem], norm: bool = True, batch_size: int = 8, device=None,
                add_bos: bool = False, desc: str = "mc") -> dict:
    raw = score_items(model, tokenizer, items, batch_size, device, add_bos, desc)
    return {**mc_metrics(items, raw["lls"], norm), "tokens": raw["tokens"]}
