"""The KV cache passes under the name the model's forward takes, and cached greedy generation equals recomputing
the whole sequence at every step (no FutureWarning about the old name on transformers 5.x)."""
import inspect
import warnings
from types import SimpleNamespace

import torch

from prunepilot.eval.factual_qa import greedy_generate
from prunepilot.eval.kv_cache import cache_name, returned_cache
from prunepilot.testing.tiny_models import CharTokenizer, tiny_model


class OldStyle(torch.nn.Module):
    def forward(self, input_ids, past_key_values=None, use_cache=False):
        return SimpleNamespace(logits=None, past_key_values=past_key_values)


def test_old_forward_gets_past_key_values():
    assert cache_name(OldStyle()) == "past_key_values"
    assert returned_cache(OldStyle()(None, past_key_values="kv")) == "kv"


def test_new_forward_gets_the_name_it_declares():
    model = tiny_model("qwen2")
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    assert cache_name(model) == name


def test_cached_greedy_generation_equals_full_recompute():
    model, tok = tiny_model("llama"), CharTokenizer()
    prompts = ["abc", "hello world"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the deprecated name would warn here
        got = greedy_generate(model, tok, prompts, max_new_tokens=6, batch_size=2, stops=())
    for prompt, text in zip(prompts, got):
        ids = tok.encode(prompt, add_special_tokens=False)
        new = []
        with torch.no_grad():
            for _ in range(6):
                nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                new.append(nxt)
        assert new and text == tok.decode(new).strip()
