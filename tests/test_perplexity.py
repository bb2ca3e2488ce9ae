"""Perplexity protocol: exact values on a model whose predictions are known."""
import math

import pytest
import torch

from prunepilot.errors import PrunepilotError
from prunepilot.eval.perplexity import perplexity, perplexity_of_tokens


class UniformLM(torch.nn.Module):
    """Predicts a uniform distribution over `vocab` tokens: perplexity is exactly `vocab`."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids, **_):
        return type("Out", (), {"logits": torch.zeros(*ids.shape, self.vocab) + self.p})()


class CopyLM(UniformLM):
    """Puts log-odds 5 on token t+1 given token t (ids are 0..vocab-1)."""

    def forward(self, ids, **_):
        logits = torch.zeros(*ids.shape, self.vocab)
        logits.scatter_(2, ((ids + 1) % self.vocab).unsqueeze(-1), 5.0)
        return type("Out", (), {"logits": logits})()


def test_uniform_model_has_perplexity_vocab():
    r = perplexity_of_tokens(UniformLM(50), torch.arange(100) % 50, seqlen=16, batch_size=3)
    assert r["ppl"] == pytest.approx(50.0)
    assert (r["windows"], r["tokens"], r["seqlen"]) == (6, 6 * 15, 16)  # 100 // 16 windows, tail dropped


def test_known_nll_and_max_windows():
    vocab = 10
    r = perplexity_of_tokens(CopyLM(vocab), torch.arange(40) % vocab, seqlen=8, max_windows=2)
    p_correct = math.exp(5) / (math.exp(5) + vocab - 1)
    assert r["ppl"] == pytest.approx(1 / p_correct, rel=1e-5)
    assert r["windows"] == 2 and r["tokens"] == 14


def test_errors():
    with pytest.raises(PrunepilotError, match="fewer than one window"):
        perplexity_of_tokens(UniformLM(5), torch.arange(5), seqlen=16)
    with pytest.raises(PrunepilotError, match="seqlen"):
        perplexity_of_tokens(UniformLM(5), torch.arange(5), seqlen=1)


def test_rows_joined_with_blank_lines(tmp_path):
    from prunepilot.testing.tiny_models import CharTokenizer

    (tmp_path / "t.jsonl").write_text('{"text": "ab"}\n{"text": "cd"}\n')
    seen = {}

    class Rec(UniformLM):
        def forward(self, ids, **kw):
            seen["ids"] = ids
            return super().forward(ids)

    tok = CharTokenizer()
    r = perplexity(Rec(128), tok, str(tmp_path / "t.jsonl"), seqlen=7)
    assert seen["ids"][0].tolist() == tok.encode("ab\n\ncd")  # BOS + the joined text, one window
    assert r["dataset"] == "t" and r["tokens"] == 6


def test_a_ruined_model_has_infinite_perplexity_not_an_overflow():
    class Confident(UniformLM):  # puts all its mass on token 0, which never comes
        def forward(self, ids, **_):
            logits = torch.zeros(*ids.shape, self.vocab)
            logits[..., 0] = 1e4
            return type("Out", (), {"logits": logits})()

    r = perplexity_of_tokens(Confident(5), torch.arange(32) % 4 + 1, seqlen=16)
    assert r["ppl"] == math.inf and r["nll"] == pytest.approx(1e4)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2", "opt"])
def test_sequential_perplexity_equals_the_full_forward(arch):
    from prunepilot.eval.perplexity import perplexity_sequential
    from prunepilot.testing.tiny_models import tiny_model

    model = tiny_model(arch)
    tokens = torch.randint(3, 128, (100,), generator=torch.Generator().manual_seed(0))
    full = perplexity_of_tokens(model, tokens, seqlen=24, batch_size=2)
    seq = perplexity_sequential(model, tokens, seqlen=24, device="cpu", batch_size=2)
    assert (seq["windows"], seq["tokens"], seq["seqlen"]) == (full["windows"], full["tokens"], 24) == (4, 92, 24)
    assert seq["nll"] == pytest.approx(full["nll"], rel=1e-5)
    assert all("forward" not in vars(b) for b in model.modules())  # the block stubs are gone
