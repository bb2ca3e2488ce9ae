"""AgentConfig: everything an agent run needs, as a strict pydantic model (unknown keys rejected).

YAML in (``--config agent.yaml``), YAML out (``out_dir/agent.yaml``). Fields that change what a replay
of the journal computes (calibration data, held-out slice, include/ignore) are fingerprinted in the
journal header so that ``--resume`` refuses a journal written under different settings.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlparse, urlunparse

import yaml
from pydantic import Field, PrivateAttr, field_validator, model_validator

from ..schema import Strict, load_yaml_mapping, validate

log = logging.getLogger(__name__)

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# prefixes of common API keys and tokens (OpenAI, Anthropic, Hugging Face, GitHub, Slack, Groq, AWS, JWT ...)
_TOKEN_PREFIX = re.compile(r"(sk|pk|rk)[-_]|sk-ant|hf_[A-Za-z0-9]{8}|gh[pousr]_|github_pat_|xox[abprs]-|gsk_|"
                           r"AKIA[0-9A-Z]{8}|eyJ|ya29\.|AIza")


def looks_like_secret(value: str) -> bool:
    """True when an --api-key-env value looks like a key rather than the NAME of an environment variable:
    a known key prefix, characters no variable name has, or a long mixed-case-and-digits token."""
    if _TOKEN_PREFIX.match(value) or not _ENV_NAME.fullmatch(value):
        return True
    mixed = any(c.islower() for c in value) and any(c.isupper() for c in value) and any(c.isdigit() for c in value)
    return (len(value) >= 20 and mixed) or (len(value) >= 32 and "_" not in value)


def split_userinfo(url: str) -> tuple[str, tuple[str, str] | None]:
    """(url without user:password@, (user, password) or None)."""
    parts = urlparse(url)
    if parts.username is None and parts.password is None:
        return url, None
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunparse(parts._replace(netloc=netloc)), (unquote(parts.username or ""), unquote(parts.password or ""))


class ControllerConfig(Strict):
    """Who decides how much more to prune each layer: the built-in policy, an OpenAI-compatible
    endpoint, a local Hugging Face chat model, or a fixed plan (uniform, OWL, evo search) run through the same loop."""
    kind: Literal["builtin", "openai", "hf", "plan"] = "builtin"
    # kind plan: the fixed allocation followed (plan_controller.py); evo: the evolutionary search (search.py) with
    # its default options, KL fitness on the held-out tokens, its log in out_dir/evo_search.jsonl (resumable)
    plan: Literal["uniform", "owl", "evo"] = "uniform"
    base_url: str | None = None          # openai: e.g. http://127.0.0.1:8000/v1 (…/chat/completions is appended)
    model_name: str | None = None        # openai: served model name; hf: local folder or hub name
    api_key_env: str | None = "OPENAI_API_KEY"  # name of the env var holding the key (never the key itself)
    timeout_s: float = Field(60.0, gt=0)        # openai: wall-clock limit of one decision, every attempt included
    retries: int = Field(2, ge=0, le=10)        # extra attempts on transport errors (refused, timeout, 5xx, 429)
    retry_backoff_s: float = Field(1.0, ge=0)   # sleep backoff * 2**attempt between transport retries
    invalid_retries: int = Field(2, ge=0, le=10)  # re-asks after an invalid decision, then built-in fallback
    strict: bool = False                 # unreachable endpoint / invalid output: error instead of fallback
    json_schema: bool = True             # openai: send response_format = json_schema (structured output)
    temperature: float = Field(0.0, ge=0, le=2)
    max_tokens: int = Field(4096, ge=16)
    table_rows: int | None = Field(None, ge=1)  # show only the first N rows of the profile (small contexts)
    history_chars: int = Field(3000, ge=200)    # budget of the decision history in the prompt (newest in full)
    max_layers_per_reply: int | None = Field(None, ge=1)  # schema maxItems + prompt hint (small models)
    reasoning_chars: int | None = Field(None, ge=20)      # schema maxLength of reasoning (constrained decoders)
    # what one row / one name is for an LLM controller: a linear, or a decoder block whose linears all get the
    # block's extra sparsity (granularity.py; for controllers that can name only a few rows per reply)
    granularity: Literal["linear", "block"] = "linear"
    _base_url_auth: tuple[str, str] | None = PrivateAttr(None)  # userinfo of base_url: used, never saved

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                url = urlparse(v)
                ok = url.scheme in ("http", "https") and bool(url.hostname)
                url.port  # noqa: B018 - raises on a bad port
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"base_url must be http(s)://HOST[:PORT][/PATH], got {split_userinfo(v)[0]!r}"
                                 if "@" not in v else "base_url must be http(s)://HOST[:PORT][/PATH]")
        return v

    @field_validator("api_key_env")
    @classmethod
    def _key_name(cls, v: str | None) -> str | None:
        if v and looks_like_secret(v):  # never echo the value: it may be the key
            raise ValueError("api_key_env must be the NAME of an environment variable holding the key (e.g. "
                             "OPENAI_API_KEY), not the key itself; export the key and pass its variable name")
        return v or None

    @model_validator(mode="after")
    def _strip_userinfo(self):
        """user:password@ in base_url is kept in memory for this run only (HTTP basic auth), never in a dump."""
        if self.base_url:
            self.base_url, auth = split_userinfo(self.base_url)
            if auth:
                self._base_url_auth = auth
                log.info("credentials in base_url are used as HTTP basic auth for this run and not saved")
        return self

    @property
    def base_url_auth(self) -> tuple[str, str] | None:
        return self._base_url_auth


class PolicyConfig(Strict):
    """Knobs of the built-in deterministic policy (see controllers.BuiltinPolicy)."""
    step: float = Field(0.10, gt=0, le=0.5)          # global sparsity gain aimed at per iteration
    min_step: float = Field(0.005, gt=0, le=0.5)
    backoff: float = Field(0.5, gt=0, lt=1)          # step *= backoff after a rollback
    grow: float = Field(1.5, ge=1)                   # step *= grow after an "excellent" step (≤ grow * step)
    safety: float = Field(0.7, gt=0, le=1)           # aim the predicted ppl rise at safety * threshold
    tilt: float = Field(0.5, ge=0, lt=1)             # extra_i ∝ 1 - tilt * tanh(sensitivity_i)
    weight_s: float = 1.0                            # sensitivity = weight_s * z_s + weight_g * z_g
    weight_g: float = 1.0
    # "global": the profile's z_s, z_g; "global_log": z of log s, log g across all layers; "type": z of
    # log s, log g within each layer type (q_proj vs the other q_proj ...)
    normalize: Literal["global", "global_log", "type"] = "global_log"


class CalibrationSettings(Strict):
    sources: list[str] = Field(default_factory=lambda: ["web"], min_length=1)  # data.TextSource specs
    n_samples: int = Field(32, ge=1)
    seqlen: int = Field(512, ge=2)
    batch_size: int = Field(1, ge=1)


class AgentConfig(Strict):
    target_sparsity: float = Field(0.5, gt=0.0, lt=1.0)
    max_iterations: int = Field(30, ge=1)
    rollback_threshold: float = Field(0.15, gt=0)    # relative held-out ppl rise over the last accepted step
    max_total_ppl_rise: float | None = Field(None, gt=0)  # also roll back above (1 + this) x the baseline ppl
    target_tolerance: float = Field(0.001, ge=0, lt=0.1)  # "reached" when global sparsity ≥ target - tol
    max_layer_sparsity: float = Field(0.9, gt=0, lt=1)    # never prune one linear beyond this
    # pacing (pacing.py): the loop scales a controller's step up to the gain that reaches the target in the
    # iterations left, keeping `pace_reserve` of them for retries after rollbacks; False: steps as asked
    pace: bool = True
    pace_reserve: float = Field(0.2, ge=0, lt=1)
    max_step_extra: float = Field(0.5, gt=0, le=1)  # no linear loses more of its remaining weights in one step
    allow_short: bool = False  # a run that ends below target - tolerance is an error (exit 3) unless this is set
    controller: ControllerConfig = Field(default_factory=ControllerConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    calibration: CalibrationSettings = Field(default_factory=CalibrationSettings)
    eval_tokens: int = Field(8192, ge=2)             # held-out budget (tail of the calibration sources)
    eval_seqlen: int = Field(512, ge=2)
    profile_percentile: float = Field(0.10, ge=0, le=1)  # Wanda score percentile s per layer
    grad_refresh_every: int = Field(3, ge=0)         # recompute gradients after k accepted steps (0: once)
    grad_samples: int = Field(8, ge=0)               # calibration samples for gradients (0: no gradient signal)
    grad_mode: Literal["full", "blockwise"] = "full"  # blockwise: one block on the device (models that do not fit)
    seed: int = 0
    device: str = "auto"
    include: list[str] = Field(default_factory=list)
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])
    save_model: bool = True

    @model_validator(mode="after")
    def _reachable(self):
        """No linear is pruned beyond max_layer_sparsity, so a global target above it can never be reached."""
        if self.target_sparsity > self.max_layer_sparsity:
            raise ValueError(f"target_sparsity {self.target_sparsity:g} is unreachable: no layer is pruned beyond "
                             f"max_layer_sparsity {self.max_layer_sparsity:g} (raise it, or lower the target)")
        return self

    def replay_key(self) -> dict:
        """Settings a journal replay depends on (must match on --resume)."""
        return {"calibration": self.calibration.model_dump(mode="json"), "seed": self.seed,
                "eval_tokens": self.eval_tokens, "eval_seqlen": self.eval_seqlen,
                "include": self.include, "ignore": self.ignore}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict | None) -> "AgentConfig":
        return validate(cls, data, "agent config")

    @classmethod
    def from_yaml(cls, path: str | Path) -> "AgentConfig":
        return cls.from_dict(load_yaml_mapping(path, "agent config"))
