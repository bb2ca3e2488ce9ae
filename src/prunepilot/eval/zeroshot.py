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

def read_records(path: Path, limit: int | None, fields: tuple[str, ...]) -> list[tuple[str, dict]]:
    """[(where, row)] of a jsonl file's first `limit` non-blank lines; where = "path:line" for error messages.
    A line that is not a JSON object or lacks one of `fields` is a clear error, never a KeyError later."""
    out = []
    with open(path, encoding="utf-8") as f:
        numbered = ((i, ln) for i, ln in enumerate(f, 1) if ln.strip())
        for i, line in itertools.islice(numbered, limit):
            where = f"{path}:{i}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PrunepilotError(f"{where}: not valid JSON ({e})") from None
            missing = [k for k in fields if not isinstance(row, dict) or k not in row]
            if missing:
                raise PrunepilotError(f"{where}: expected a JSON object with {', '.join(map(repr, fields))}; "
                                      f"missing {', '.join(map(repr, missing))}")
            out.append((where, row))
    return out


def _gold(where: str, gold, n_choices: int) -> int:
    if isinstance(gold, bool) or not isinstance(gold, int) and not (isinstance(gold, str) and gold.isdigit()):
        raise PrunepilotError(f"{where}: gold must be a choice index, got {gold!r}")
    if not 0 <= int(gold) < n_choices:
        raise PrunepilotError(f"{where}: gold {gold} is not one of the {n_choices} choices (0..{n_choices - 1})")
    return int(gold)


def _options(where: str, value, what: str) -> list[str]:
    """`value` checked to be what a multiple-choice item needs: a list of at least 2 strings."""
    if not isinstance(value, list) or len(value) < 2 or not all(isinstance(c, str) for c in value):
        raise PrunepilotError(f"{where}: {what} must be a list of at least 2 strings, got {value!r:.80}")
    return value


def _choice_item(where: str, context: str, choices, gold) -> MCItem:
    _options(where, choices, "choices")
    if not isinstance(context, str):
        raise PrunepilotError(f"{where}: the context must be a string, got {type(context).__name__}")
    return MCItem([context] * len(choices), [" " + c for c in choices], _gold(where, gold, len(choices)),
                  [len(c) for c in choices])


def load_query_choices(path: Path, limit: int | None = None, answer_prompt: bool = True) -> list[MCItem]:
    """{"query", "choices", "gold"} jsonl. answer_prompt appends "\\nAnswer:" to the query (ARC, BoolQ, PIQA)."""
    items = []
    for where, row in read_records(path, limit, ("query", "choices", "gold")):
        query = str(row["query"])
        items.append(_choice_item(where, query.rstrip("\n") + "\nAnswer:" if answer_prompt else query,
                                  row["choices"], row["gold"]))
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
            if not block:
                break
            where = f"{path}:{6 * len(items) + 1}"
            if len(block) < 6:
                raise PrunepilotError(f"{where}: the file ends inside a task (6 lines each: context, gold, "
                                      f"4 endings; got {len(block)})")
            items.append(_choice_item(where, block[0], block[2:6], block[1].strip()))
    return items


def load_winogrande(path: Path, limit: int | None = None) -> list[MCItem]:
    """{"context_options": [2], "continuation", "gold"}: the continuation is scored after each context."""
    items = []
    for where, row in read_records(path, limit, ("context_options", "continuation", "gold")):
        options = _options(where, row["context_options"], "context_options")
        cont = " " + str(row["continuation"]).strip()
        n = len(options)
        items.append(MCItem(list(options), [cont] * n, _gold(where, row["gold"], n), [len(cont) - 1] * n))
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
