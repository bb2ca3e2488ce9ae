"""HFController: a local Hugging Face chat model as the controller, with JSON-schema-constrained decoding.

apply_chat_template + greedy generate. With ``json_schema`` (the default) and lm-format-enforcer installed, every
generated token is restricted (transformers' prefix_allowed_tokens_fn) to those that keep the text a prefix of
a JSON document valid under validate.decision_schema: the three keys in order, layer names from the enum,
extra_sparsity from the enum of steps, reasoning and the layer list bounded by reasoning_chars /
max_layers_per_reply when set. So even a 135M chat model answers with a parsable decision; the validator still
checks it (distinct layers, a cut-off reply). lm-format-enforcer's own transformers integration does not
import under transformers 5, so the tokenizer table it needs is built here from the tokenizer.
"""
from __future__ import annotations

import logging

from .config import ControllerConfig
from .decision import Observation
from .transport import ControllerUnavailable
from .prompts import build_messages
from .validate import decision_schema

log = logging.getLogger(__name__)


def enforcer_tokenizer_data(tokenizer):
    """lm-format-enforcer's TokenEnforcerTokenizerData for a Hugging Face tokenizer (one batch decode)."""
    from lmformatenforcer import TokenEnforcerTokenizerData

    vocab = len(tokenizer)
    zero = tokenizer.encode("0", add_special_tokens=False)[-1]
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(vocab) if i not in special]
    # decoding after a "0" keeps a word-start token's leading space, which decoding it alone may drop
    after = tokenizer.batch_decode([[zero, i] for i in ids])
    alone = tokenizer.batch_decode([[i] for i in ids])
    regular = [(i, a[1:], len(a) - 1 > len(b)) for i, a, b in zip(ids, after, alone)]
    eos = tokenizer.eos_token_id

    def decode(tokens: list[int]) -> str:
        return tokenizer.decode(tokens).rstrip("\ufffd")

    return TokenEnforcerTokenizerData(regular, decode, eos, False, vocab)


def schema_constraint(tokenizer_data, schema: dict):
    """A prefix_allowed_tokens_fn that keeps generation inside `schema` (keys in the schema's order)."""
    from lmformatenforcer import CharacterLevelParserConfig, JsonSchemaParser, TokenEnforcer

    parser = JsonSchemaParser(schema)
    enforcer = TokenEnforcer(tokenizer_data, parser)
    # TokenEnforcer replaces the parser's config with one that only sets the alphabet: set ours after it. At most
    # two whitespace characters in a row (a small model otherwise pads with newlines until max_tokens).
    parser.config = CharacterLevelParserConfig(alphabet=tokenizer_data.tokenizer_alphabet,
                                               max_consecutive_whitespaces=2, force_json_field_order=True)

    def allowed(batch_id: int, sent) -> list[int]:
        return enforcer.get_allowed_tokens(sent.tolist()).allowed_tokens

    return allowed


class HFController:
    """A local chat model; returns the generated text. `last_usage`: prompt chars and tokens, completion tokens."""
    name = "hf"

    def __init__(self, cfg: ControllerConfig, device: str = "cpu", model=None, tokenizer=None):
        from ..errors import PrunepilotError

        if model is None and not cfg.model_name:
            raise PrunepilotError("controller hf needs a model (--model-name PATH_OR_HUB_NAME)")
        self.cfg, self.device = cfg, device
        self.model, self.tokenizer = model, tokenizer
        self.constrained = cfg.json_schema
        self._tokenizer_data = None
        self.last_usage: dict = {}

    def _load(self):
        if self.model is not None:
            return
        from ..modeling import load_model_and_tokenizer

        try:
            self.model, self.tokenizer = load_model_and_tokenizer(self.cfg.model_name, device=self.device)
        except Exception as e:  # missing folder, no network for a hub name ...
            raise ControllerUnavailable(f"cannot load chat model {self.cfg.model_name}: {str(e).splitlines()[0]}") from None

    def _constraint(self, obs: Observation):
        """The schema constraint for this observation, or None (switched off, or lm-format-enforcer missing)."""
        if not self.constrained:
            return None
        if self._tokenizer_data is None:
            try:
                self._tokenizer_data = enforcer_tokenizer_data(self.tokenizer)
            except ImportError:
                return self._unconstrained("lm-format-enforcer is not installed (pip install lm-format-enforcer)")
            except Exception as e:  # a tokenizer it cannot tabulate
                return self._unconstrained(f"cannot tabulate the tokenizer ({type(e).__name__}: {e})")
        c = self.cfg
        return schema_constraint(self._tokenizer_data,
                                 decision_schema(obs.layer_names, c.max_layers_per_reply, c.reasoning_chars))

    def _unconstrained(self, why: str) -> None:
        log.warning("hf controller: %s; generating without the JSON schema constraint", why)
        self.constrained = False
        return None

    def propose(self, obs: Observation, errors: list[str] | None = None) -> str:
        import torch

        self._load()
        tok, c = self.tokenizer, self.cfg
        if not getattr(tok, "chat_template", None):
            raise ControllerUnavailable(f"tokenizer of {c.model_name} has no chat template")
        messages = build_messages(obs, errors, c.table_rows, c.history_chars, c.max_layers_per_reply)
        enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        kwargs = {"max_new_tokens": c.max_tokens, "do_sample": c.temperature > 0}
        if c.temperature > 0:
            kwargs["temperature"] = c.temperature
        constraint = self._constraint(obs)
        if constraint is not None:
            kwargs["prefix_allowed_tokens_fn"] = constraint
        with torch.no_grad():
            out = self.model.generate(**enc, **kwargs, pad_token_id=getattr(tok, "pad_token_id", None))
        n_prompt = enc["input_ids"].shape[1]
        self.last_usage = {"prompt_chars": sum(len(m["content"]) for m in messages), "prompt_tokens": int(n_prompt),
                           "completion_tokens": int(out.shape[1] - n_prompt)}
        return tok.decode(out[0, n_prompt:], skip_special_tokens=True)
