"""Factual open QA (TriviaQA subset, FreebaseQA): greedy generation, exact match against any alias.

Prompt: "Question: {question}\\nAnswer:" (the TriviaQA copy already holds it in "context"). Generation is
greedy, at most `max_new_tokens` (16) new tokens, stopping at EOS or at the first of lm-eval's triviaqa stop
strings "\\n", ".", "," once past leading whitespace; the answer is the text before that stop. (lm-eval
stops at the very first "\\n", which gives chat-tuned models that open with "\\n" an empty answer, so leading
whitespace is skipped first.) Exact match compares SQuAD-normalised strings (lowercase, punctuation and the
articles a/an/the removed, whitespace collapsed) with every alias.
"""
from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import PrunepilotError
from ..engine.model_config import context_length
from .kv_cache import cache_name, returned_cache
from .loglik import encode
from .zeroshot import read_records, stderr


STOPS = ("\n", ".", ",")  # lm-eval triviaqa `until`


def cut_at_stop(text: str, stops=STOPS) -> tuple[str, bool]:
    """(text before the first stop string after leading whitespace, whether a stop was found)."""
    text = text.lstrip()
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


@dataclass
class QAItem:
    prompt: str
    aliases: list[str]


# ----------------------------------------------------------------------------- loaders

def load_triviaqa(path: Path, limit: int | None = None) -> list[QAItem]:
    """{"context": "Question: ...\\nAnswer:", "answer", "aliases"} jsonl."""
    items = []
    for where, r in read_records(path, limit, ("context", "answer")):
        aliases = r.get("aliases") or []
        if not isinstance(r["context"], str) or not isinstance(aliases, list):
            raise PrunepilotError(f"{where}: expected a string context and a list of aliases")
        items.append(QAItem(r["context"], [str(a) for a in dict.fromkeys([r["answer"], *aliases])]))
    return items


def load_freebaseqa(path: Path, limit: int | None = None) -> list[QAItem]:
    """FreebaseQA JSON: {"Questions": [{"RawQuestion", "ProcessedQuestion", "Parses": [{"Answers":
    [{"AnswersName": [...]}]}]}]}; the aliases are every AnswersName of every parse."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        questions = data["Questions"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise PrunepilotError(f"{path} is not a FreebaseQA JSON file ({{'Questions': [...]}}): {e}") from e
    items = []
    for q in questions[:limit]:
        question = (q.get("RawQuestion") or q.get("ProcessedQuestion") or "").strip()
        aliases = [name for parse in q.get("Parses", []) for ans in parse.get("Answers", [])
                   for name in ans.get("AnswersName", [])]
        if question and aliases:
            items.append(QAItem(f"Question: {question}\nAnswer:", list(dict.fromkeys(aliases))))
    return items


# ----------------------------------------------------------------------------- metric

_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, aliases: list[str]) -> bool:
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(a) for a in aliases)


# ----------------------------------------------------------------------------- generation

@torch.inference_mode()
def greedy_generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 16, batch_size: int = 8,
                    device=None, add_bos: bool = False, stops=STOPS) -> list[str]:
    """Greedy continuation of each prompt, cut at the first of `stops` after leading whitespace;
    left-padded batches with a KV cache."""
    device = device or next(model.parameters()).device
    eos = getattr(tokenizer, "eos_token_id", None)
    max_prompt = context_length(model) - max_new_tokens
    encoded = [encode(tokenizer, p, add_bos)[-max_prompt:] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    outputs: list[str] = [""] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc="generate", leave=False):
        rows = order[start:start + batch_size]
        for i, text in zip(rows, _generate_batch(model, tokenizer, [encoded[i] for i in rows], max_new_tokens,
                                                 device, eos, stops)):
            outputs[i] = text
    return outputs


def _generate_batch(model, tokenizer, seqs: list[list[int]], max_new_tokens: int, device, eos, stops) -> list[str]:
    b, L = len(seqs), max(len(s) for s in seqs)
    ids = torch.zeros((b, L), dtype=torch.long)
    mask = torch.zeros((b, L), dtype=torch.long)
    for r, s in enumerate(seqs):  # left padding: the next token of every row is at the last position
        ids[r, L - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[r, L - len(s):] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(1) - 1).clamp(min=0)  # (b, L) positions that ignore the padding
    generated = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool)
    past, kv = None, cache_name(model)
    for _ in range(max_new_tokens):
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{kv: past})
        past = returned_cache(out)
        nxt = out.logits[:, -1].argmax(-1)  # (b,)
        for r in range(b):
            if not done[r]:
                generated[r].append(int(nxt[r]))
                done[r] = int(nxt[r]) == eos or cut_at_stop(tokenizer.decode(generated[r]), stops)[1]
        if bool(done.all()):
            break
        ids = nxt[:, None]  # (b, 1)
        pos = pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=device)], dim=1)
    texts = []
    for gen in generated:
        if gen and gen[-1] == eos:
            gen = gen[:-1]
        texts.append(cut_at_stop(tokenizer.decode(gen), stops)[0].strip())
    return texts


def shot_prefix(shots: list[QAItem]) -> str:
    """k-shot examples, each "{prompt} {first alias}\\n\\n" (the first alias is the reference answer)."""
    return "".join(f"{s.prompt} {s.aliases[0]}\n\n" for s in shots)


def answer_items(model, tokenizer, items: list[QAItem], max_new_tokens: int = 16, batch_size: int = 8, device=None,
                 add_bos: bool = False, shots: list[QAItem] | None = None) -> dict:
    """Raw outcomes: {"predictions", "correct", "tokens"}, one entry per item; `shots` (k answered examples)
    precede every prompt."""
    prefix = shot_prefix(shots or [])
    preds = greedy_generate(model, tokenizer, [prefix + it.prompt for it in items], max_new_tokens, batch_size,
                            device, add_bos)
    hits = [exact_match(p, it.aliases) for p, it in zip(preds, items)]
    tokens = {"prompt_tokens": sum(len(encode(tokenizer, prefix + it.prompt, add_bos)) for it in items)}
    return {"predictions": preds, "correct": hits, "tokens": tokens}


def qa_metrics(items: list[QAItem], preds: list[str], hits: list[bool]) -> dict:
    if not items:
        raise PrunepilotError("no QA items to evaluate")
    em = sum(hits) / len(hits)
    examples = [{"prompt": it.prompt, "prediction": p, "correct": h} for it, p, h in list(zip(items, preds, hits))[:5]]
    return {"acc": em, "exact_match": em, "acc_stderr": stderr(em, len(hits)), "n": len(hits), "examples": examples}
