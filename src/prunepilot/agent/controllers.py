"""Controllers: given an Observation, propose how much more to prune which layers.

Every controller implements ``propose(obs, errors) -> str | dict`` (raw, untrusted output; `errors`
lists why its previous answers this iteration were rejected). GuardedController validates it
(validate.parse_decision), re-asks, and falls back to the built-in policy with a logged warning:

- BuiltinPolicy    deterministic, no network (the default), a pure function of the observation.
- OpenAIController any OpenAI-compatible /chat/completions endpoint, standard library only (urllib),
                   structured output through response_format json_schema, timeouts and retries.
- HFController     a local Hugging Face chat model: apply_chat_template + greedy generate, parse JSON.

Unreachable endpoint (after its retries): one warning, then the built-in policy for the rest of the
run; with ``strict`` a PrunepilotError instead.
"""
from __future__ import annotations

import http.client
import json
import logging
import math
import os
import re
import socket
import time
import urllib.error
import urllib.request

from ..errors import PrunepilotError
from ..stats import zscore_list
from .config import AgentConfig, ControllerConfig, PolicyConfig
from .decision import MAX_EXTRA, MIN_EXTRA, Decision, Observation
from .prompts import build_messages, decision_schema
from .validate import DecisionError, parse_decision

log = logging.getLogger(__name__)


class ControllerUnavailable(RuntimeError):
    """The controller cannot be reached or loaded at all (as opposed to answering badly)."""


class BadRequest(DecisionError):
    """The endpoint refused this request (HTTP 400/413/422: unsupported option, prompt too long ...):
    a failed answer for this iteration, not a reason to stop asking."""


MAX_RESPONSE_BYTES = 8 << 20  # a chat completion larger than this is not a decision


# ------------------------------------------------------------------------------------------ builtin

def layer_type(name: str) -> str:
    """'model.layers.3.mlp.down_proj' -> 'model.layers.*.mlp.down_proj'."""
    return re.sub(r"\.\d+\.", ".*.", name, count=1)


class BuiltinPolicy:
    """Deterministic policy on the same profile an LLM sees (pure function of the observation).

    Step size: aim for a global sparsity gain of `step`, halved after every rollback, grown after
    "excellent" steps (up to grow x step), capped so that the perplexity rise predicted from the last
    accepted step (relative rise per unit of sparsity) stays below safety x threshold; the last step
    takes the whole remainder when what would be left is tiny; never past the target.

    Allocation: sensitivity_i = weight_s * z(log s_i) + weight_g * z(log g_i), z-scored across all
    layers (default "global_log"; "global" uses the profile's z of the raw values, which a handful of
    heavy-tailed layers dominate; "type" compares each layer only with the same projection in other
    blocks). Layer i gets extra_i = c * (1 - tilt * tanh(sensitivity_i)) clipped to [0.01, 0.15], c
    solved by bisection so the weighted gain equals the step: low z_s / low z_g layers are pruned
    harder, by at most (1 + tilt) / (1 - tilt) times the rate of the most sensitive ones, and the tilt
    is halved for each rollback in a row (a failed concentrated step is retried spread out). Because
    s is taken over the weights still alive, a layer's s rises as it is pruned, which balances the
    allocation over the iterations.

    On SmolLM2-135M (bench/agent_compare.py) "global_log" with tilt 0.5 beat uniform Wanda; tilt 0
    (iterative uniform Wanda) did not, so the gain comes from the allocation, not from iterating.
    """
    name = "builtin"

    def __init__(self, cfg: PolicyConfig | None = None, max_layer_sparsity: float = 0.9, tolerance: float = 0.001):
        self.cfg = cfg or PolicyConfig()
        self.max_layer = max_layer_sparsity
        self.tol = tolerance

    def step_size(self, obs: Observation) -> tuple[float, str]:
        c = self.cfg
        step, why = c.step, "base step"
        for fb in obs.history:
            if not fb.accepted and fb.label.startswith("poor"):
                step, why = step * c.backoff, "backed off after a rollback"
            elif fb.label == "excellent":
                step, why = min(c.step * c.grow, step * c.grow), "grown after an excellent step"
        step = max(step, c.min_step)
        last = next((h for h in reversed(obs.history) if h.accepted and h.gain > 1e-6), None)
        if last is not None and last.ppl_change > 0:
            rate = last.ppl_change / last.gain             # relative ppl rise per unit of sparsity
            cap = c.safety * obs.rollback_threshold / rate
            if cap < step:
                step, why = max(cap, c.min_step), f"capped by last rise rate {rate:.2f}/unit"
        return step, why

    def sensitivity(self, rows: list[dict]) -> list[float]:
        c = self.cfg
        if c.normalize == "global":  # the profile's own z-scores
            return [c.weight_s * r["z_s"] + c.weight_g * r["z_g"] for r in rows]
        # z-scores of log s and log g (heavy-tailed, so log), across all layers or within each layer type
        groups: dict[str, list[int]] = {}
        for k, r in enumerate(rows):
            groups.setdefault(layer_type(r["layer"]) if c.normalize == "type" else "", []).append(k)
        out = [0.0] * len(rows)
        for idx in groups.values():
            for key, w in (("s", c.weight_s), ("g", c.weight_g)):
                vals = [math.log(max(rows[k][key], 1e-30)) for k in idx]
                if w and len(idx) > 1:
                    for k, z in zip(idx, zscore_list(vals)):
                        out[k] += w * z
        return out

    def tilt(self, obs: Observation) -> float:
        """The configured tilt, halved (backoff) for every rollback in a row at the end of the history:
        a concentrated step that failed is retried spread more evenly."""
        t = self.cfg.tilt
        for fb in reversed(obs.history):
            if fb.accepted or not fb.label.startswith("poor"):
                break
            t *= self.cfg.backoff
        return t

    def propose(self, obs: Observation, errors: list[str] | None = None) -> dict:
        remaining = obs.target_sparsity - obs.current_sparsity
        rows = [r for r in obs.rows if r["sparsity"] < self.max_layer - 1e-9 and r["alive"] > 0]
        if remaining <= self.tol or not rows:
            why = "target reached" if remaining <= self.tol else "every layer is at the sparsity cap"
            return {"reasoning": why, "stop_pruning": True, "layer_decisions": []}
        step, why = self.step_size(obs)
        gain = min(step, remaining)
        if remaining - gain < self.cfg.min_step and remaining <= 1.5 * step:
            gain, why = remaining, why + "; finishing"  # no tiny last step
        tilt = self.tilt(obs)
        weights = [1.0 - tilt * math.tanh(s) for s in self.sensitivity(rows)]
        need = gain * sum(r["numel"] for r in obs.rows)       # weights to remove this step

        def removed(c: float) -> float:
            return sum(r["alive"] * min(MAX_EXTRA, max(MIN_EXTRA, c * w)) for r, w in zip(rows, weights))

        lo, hi = 0.0, MAX_EXTRA / min(weights)
        for _ in range(60):  # bisection: removed(c) is non-decreasing in c
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if removed(mid) < need else (lo, mid)
        extras = [round(min(MAX_EXTRA, max(MIN_EXTRA, hi * w)), 4) for w in weights]
        order = sorted(range(len(rows)), key=lambda k: -extras[k])
        most = ", ".join(f"{rows[k]['layer']} {extras[k]:.3f}" for k in order[:3])
        least = ", ".join(f"{rows[k]['layer']} {extras[k]:.3f}" for k in order[-3:])
        reasoning = (f"aim for +{gain:.4f} global sparsity ({why}); {len(rows)} layers, extra "
                     f"{min(extras):.3f}-{max(extras):.3f}; hardest: {most}; gentlest: {least}")
        return {"reasoning": reasoning, "stop_pruning": False,
                "layer_decisions": [{"layer": r["layer"], "extra_sparsity": e} for r, e in zip(rows, extras)]}


# ------------------------------------------------------------------------------------------- openai

class OpenAIController:
    """POST {base_url}/chat/completions with urllib; returns the message content (untrusted text).

    Transport errors (refused, timeouts, 408/409/429/5xx, cut responses) are retried with backoff; 401/403/
    404 mean the endpoint is unusable (ControllerUnavailable); 400/413/422 fail this answer only. An endpoint
    that rejects response_format json_schema is asked again without it, and not sent it again. timeout_s
    bounds each whole request (connect + reading the body), and bodies are capped at MAX_RESPONSE_BYTES.
    """
    name = "openai"

    def __init__(self, cfg: ControllerConfig):
        if not cfg.base_url:
            raise PrunepilotError("controller openai needs a base URL (--base-url http://HOST:PORT/v1)")
        if not cfg.model_name:
            raise PrunepilotError("controller openai needs a model name (--model-name)")
        self.cfg = cfg
        self.use_schema = cfg.json_schema
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self.api_key = None
        if cfg.api_key_env:
            self.api_key = os.environ.get(cfg.api_key_env)
            if not self.api_key:
                log.info("env var %s is not set: calling %s without an API key", cfg.api_key_env, self.url)

    def propose(self, obs: Observation, errors: list[str] | None = None) -> str:
        body = {"model": self.cfg.model_name, "messages": build_messages(obs, errors, self.cfg.table_rows),
                "temperature": self.cfg.temperature, "max_tokens": self.cfg.max_tokens}
        if self.use_schema:
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "pruning_decision", "strict": True, "schema": decision_schema(obs.layer_names)}}
        try:
            raw = self._post(body)
        except BadRequest as e:
            if "response_format" not in body:
                raise
            log.info("%s refused the request with response_format json_schema (%s); asking without it from now on",
                     self.url, e)
            self.use_schema = False
            del body["response_format"]
            raw = self._post(body)
        try:
            envelope = json.loads(raw)
            content = envelope["choices"][0]["message"]["content"]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError):
            raise DecisionError(f"malformed chat completion response: {raw[:200]!r}") from None
        if not isinstance(content, str):
            raise DecisionError("chat completion content is not a string")
        return content

    def _post(self, body: dict) -> str:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode()
        attempts, reason = self.cfg.retries + 1, ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.cfg.retry_backoff_s * 2 ** (attempt - 1))
            req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            deadline = time.monotonic() + self.cfg.timeout_s
            try:
                with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as resp:
                    return self._read(resp, deadline)
            except urllib.error.HTTPError as e:
                detail = e.read()[:200].decode("utf-8", errors="replace") if e.fp else ""
                reason = f"HTTP {e.code} {e.reason} {detail}".strip()
                if e.code in (400, 413, 422):
                    raise BadRequest(f"{self.url}: {reason}") from None
                if e.code not in (408, 409, 429) and e.code < 500:  # auth, not found ...: retrying won't help
                    raise ControllerUnavailable(f"{self.url}: {reason}") from None
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, OSError,
                    http.client.HTTPException) as e:
                reason = str(getattr(e, "reason", e)) or type(e).__name__
            log.debug("controller request %d/%d to %s failed: %s", attempt + 1, attempts, self.url, reason)
        raise ControllerUnavailable(f"{self.url} unreachable after {attempts} attempt(s): {reason}")

    def _read(self, resp, deadline: float) -> str:
        """The response body, read in chunks against the request's deadline and the size cap."""
        chunks, size = [], 0
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"response not complete within {self.cfg.timeout_s:g}s")
            chunk = resp.read(1 << 16)
            if not chunk:
                return b"".join(chunks).decode("utf-8", errors="replace")
            size += len(chunk)
            if size > MAX_RESPONSE_BYTES:
                raise DecisionError(f"response larger than {MAX_RESPONSE_BYTES} bytes")
            chunks.append(chunk)


# ----------------------------------------------------------------------------------------------- hf

class HFController:
    """A local chat model: apply_chat_template + greedy generate; returns the generated text."""
    name = "hf"

    def __init__(self, cfg: ControllerConfig, device: str = "cpu", model=None, tokenizer=None):
        if model is None and not cfg.model_name:
            raise PrunepilotError("controller hf needs a model (--model-name PATH_OR_HUB_NAME)")
        self.cfg, self.device = cfg, device
        self.model, self.tokenizer = model, tokenizer

    def _load(self):
        if self.model is not None:
            return
        from ..modeling import load_model_and_tokenizer

        try:
            self.model, self.tokenizer = load_model_and_tokenizer(self.cfg.model_name, device=self.device)
        except Exception as e:  # missing folder, no network for a hub name ...
            raise ControllerUnavailable(f"cannot load chat model {self.cfg.model_name}: {str(e).splitlines()[0]}") from None

    def propose(self, obs: Observation, errors: list[str] | None = None) -> str:
        import torch

        self._load()
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            raise ControllerUnavailable(f"tokenizer of {self.cfg.model_name} has no chat template")
        enc = tok.apply_chat_template(build_messages(obs, errors, self.cfg.table_rows), add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        kwargs = {"max_new_tokens": self.cfg.max_tokens, "do_sample": self.cfg.temperature > 0}
        if self.cfg.temperature > 0:
            kwargs["temperature"] = self.cfg.temperature
        with torch.no_grad():
            out = self.model.generate(**enc, **kwargs, pad_token_id=getattr(tok, "pad_token_id", None))
        return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


# ------------------------------------------------------------------------------------------- guard

class GuardedController:
    """Validate, re-ask on invalid output, fall back to the built-in policy; never raises unless strict."""

    def __init__(self, primary, fallback: BuiltinPolicy, invalid_retries: int = 2, strict: bool = False):
        self.primary, self.fallback = primary, fallback
        self.invalid_retries, self.strict = invalid_retries, strict
        self.disabled: str | None = None  # reason the primary is no longer asked
        self.name = getattr(primary, "name", type(primary).__name__)

    def _fallback(self, obs: Observation, warning: str) -> Decision:
        d = parse_decision(self.fallback.propose(obs), obs.layer_names, source="builtin-fallback")
        d.warnings.append(warning)
        return d

    def decide(self, obs: Observation) -> Decision:
        if isinstance(self.primary, BuiltinPolicy):
            return parse_decision(self.primary.propose(obs), obs.layer_names, source="builtin")
        if self.disabled:
            return self._fallback(obs, self.disabled)
        errors: list[str] = []
        for attempt in range(self.invalid_retries + 1):
            try:
                raw = self.primary.propose(obs, errors)
                return parse_decision(raw, obs.layer_names, source=self.name)
            except ControllerUnavailable as e:
                msg = f"agent controller '{self.name}' unavailable: {e}"
                if self.strict:
                    raise PrunepilotError(msg) from None
                log.warning("%s; using the built-in policy for the rest of this run "
                            "(--strict-controller makes this an error)", msg)
                self.disabled = msg
                return self._fallback(obs, msg)
            except DecisionError as e:
                errors.append(str(e))
            except Exception as e:  # a buggy controller must not take the run down
                errors.append(f"controller raised {type(e).__name__}: {e}")
            log.info("controller '%s' answer %d rejected: %s", self.name, attempt + 1, errors[-1])
        msg = (f"agent controller '{self.name}' gave no valid decision in {len(errors)} attempt(s) "
               f"(last: {errors[-1]})")
        if self.strict:
            raise PrunepilotError(msg)
        log.warning("%s; using the built-in policy for this iteration", msg)
        return self._fallback(obs, msg)


def make_controller(config: AgentConfig, device: str = "cpu", primary=None) -> GuardedController:
    """The configured controller wrapped in validation + fallback. `primary` overrides it (tests)."""
    fallback = BuiltinPolicy(config.policy, config.max_layer_sparsity, config.target_tolerance)
    c = config.controller
    if primary is None:
        primary = {"builtin": lambda: fallback,
                   "openai": lambda: OpenAIController(c),
                   "hf": lambda: HFController(c, device)}[c.kind]()
    return GuardedController(primary, fallback, c.invalid_retries, c.strict)
