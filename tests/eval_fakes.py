"""Shared fakes of the evaluation tests: an ASCII tokenizer, a bigram "model" whose log-probs are set by hand, a tiny
random llama, and tiny task data on disk (the `data_dir` fixture)."""
from __future__ import annotations

import bz2
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers as tf

V = 128  # ASCII


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

