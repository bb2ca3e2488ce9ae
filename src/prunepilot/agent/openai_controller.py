"""OpenAIController: any OpenAI-compatible /chat/completions endpoint, through the official `openai` client.

The controller builds the prompt and the request, picks the response_format, and reads the reply text; the
network (one deadline per decision, retries, byte caps, redaction of secrets) is transport.ChatEndpoint.

Structured output: response_format json_schema built from validate.decision_model (the validator); a server
that refuses it (HTTP 400/413/422, or an error naming response_format) is asked with json_object (+ "schema",
which llama.cpp-style servers honour), then with plain text, and not sent the refused format again. Whatever
comes back is validated anyway.
"""
from __future__ import annotations

import importlib.util
import logging

from .config import ControllerConfig
from .decision import Observation
from .prompts import build_messages
from .transport import BadRequest, ChatEndpoint, ControllerUnavailable
from .validate import DecisionError, decision_schema

log = logging.getLogger(__name__)

FORMATS = ("json_schema", "json_object", "text")


class OpenAIController:
    """Ask an OpenAI-compatible server for a decision; returns the reply text (untrusted, secrets redacted).

    Errors come from transport.ChatEndpoint; a BadRequest is first retried with the next response_format.
    After each answer `last_usage` holds prompt_chars and, when the server reports them, prompt_tokens and
    completion_tokens.
    """
    name = "openai"

    def __init__(self, cfg: ControllerConfig):
        from ..errors import PrunepilotError

        if not cfg.base_url:
            raise PrunepilotError("controller openai needs a base URL (--base-url http://HOST:PORT/v1)")
        if not cfg.model_name:
            raise PrunepilotError("controller openai needs a model name (--model-name)")
        if importlib.util.find_spec("openai") is None:
            raise PrunepilotError("controller openai needs the openai package: pip install 'prunepilot[agent]'")
        self.cfg, self.endpoint = cfg, ChatEndpoint(cfg)
        import openai  # noqa: F401  imported now (it takes seconds), not on the clock of the first decision
        self.formats = list(FORMATS if cfg.json_schema else FORMATS[2:])
        self.last_usage: dict = {}

    def propose(self, obs: Observation, errors: list[str] | None = None) -> str:
        """One answer. `errors` empty: a new decision (its deadline starts now); else a re-ask within it."""
        self.endpoint.start(reask=bool(errors))
        c = self.cfg
        messages = build_messages(obs, errors, c.table_rows, c.history_chars, c.max_layers_per_reply)
        self.last_usage = {"prompt_chars": sum(len(m["content"]) for m in messages)}
        body = {"model": c.model_name, "messages": messages, "temperature": c.temperature, "max_tokens": c.max_tokens}
        try:
            completion = self._ask(body, obs)
        except (ControllerUnavailable, DecisionError):
            raise
        except Exception as e:  # anything else the client raises: one redacted line
            raise DecisionError(self.endpoint.redact(f"request failed: {type(e).__name__}: {e}")[:300]) from None
        return self.endpoint.redact(self._content(completion))

    def _response_format(self, kind: str, obs: Observation) -> dict | None:
        c = self.cfg
        schema = decision_schema(obs.layer_names, c.max_layers_per_reply, c.reasoning_chars)
        if kind == "json_schema":
            return {"type": "json_schema", "json_schema": {"name": "pruning_decision", "strict": True, "schema": schema}}
        if kind == "json_object":
            return {"type": "json_object", "schema": schema}
        return None

    def _ask(self, body: dict, obs: Observation):
        """POST with the best response_format the server accepts (a refused one is not sent again)."""
        while True:
            fmt = self._response_format(self.formats[0], obs)
            request = dict(body, **({"response_format": fmt} if fmt else {}))
            try:
                return self.endpoint.post(request)
            except BadRequest as e:
                if fmt is None:
                    raise
                log.info("%s refused response_format %s (%s); asking with %s from now on", self.endpoint.url,
                         self.formats[0], e, self.formats[1])
                self.formats.pop(0)

    def _content(self, completion) -> str:
        """The reply text of a completion (the client does not validate responses); usage when reported."""
        try:
            content = completion.choices[0].message.content
        except (AttributeError, IndexError, KeyError, TypeError):
            raise DecisionError("malformed chat completion response (no choices[0].message)") from None
        if not isinstance(content, str):
            raise DecisionError("chat completion content is not a string")
        usage = getattr(completion, "usage", None)
        for key in ("prompt_tokens", "completion_tokens"):
            value = getattr(usage, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                self.last_usage[key] = value
        return content
