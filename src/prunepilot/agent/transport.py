"""The network layer of an OpenAI-compatible controller: one endpoint, one deadline per decision, bounded bytes.

One wall-clock deadline per decision (``timeout_s``): the first answer of a decision starts it; transport
retries, the backoff sleeps, the re-ask without an unsupported response_format and the guard's re-asks after an
invalid answer all share it. It is enforced inside the client's network stream (``_deadline_backend``): every
connect, write and socket read gets at most the time left, so a server that trickles its headers or body one
byte a second cannot hold the run past the deadline (a per-read timeout would restart on every byte). The same
stream stops reading after MAX_RESPONSE_BYTES, and the client asks for, and only accepts, uncompressed bodies,
so the cap is on the decoded reply too. Retries are counted here, not by the client (max_retries=0), so that
no Retry-After header can make it sleep past the deadline.

Secrets: the key is read from the env var named in the config (never the key itself), sent only as the bearer
header, and removed (``Redactor``) from every text that comes back from the server (error bodies, the reply
itself) before it reaches a log, an exception message, the journal or the next prompt. Credentials in the base
URL's userinfo are sent as HTTP basic auth and never saved (config.ControllerConfig strips them).
"""
from __future__ import annotations

import base64
import json
import logging
import math
import os
import time

from .config import ControllerConfig
from .validate import DecisionError

log = logging.getLogger(__name__)

MAX_RESPONSE_BYTES = 8 << 20  # a chat completion larger than this is not a decision
REDACTED = "[REDACTED]"


class ControllerUnavailable(RuntimeError):
    """The controller cannot be reached or loaded at all (as opposed to answering badly)."""


class BadRequest(DecisionError):
    """The endpoint refused this request (HTTP 400/413/422: unsupported option, prompt too long ...):
    a failed answer for this iteration, not a reason to stop asking."""


class DeadlineExceeded(DecisionError):
    """No time left for another answer within this decision's deadline (a re-ask): fall back this iteration."""


class Redactor:
    """Replaces secrets (and their JSON-escaped forms) in text that came from a server."""

    def __init__(self, *secrets: str | None):
        forms = set()
        for s in secrets:
            if s and len(s) >= 4:
                forms.update({s, json.dumps(s)[1:-1]})
        self.forms = sorted(forms, key=len, reverse=True)

    def __call__(self, text) -> str:
        text = text if isinstance(text, str) else str(text)
        for s in self.forms:
            text = text.replace(s, REDACTED)
        return text


# ------------------------------------------------------------------------------------ the network budget

class _Budget:
    """Deadline and byte allowance of the request in flight, shared by every network stream of the client."""

    def __init__(self):
        self.deadline, self.bytes_left, self.overflow = math.inf, MAX_RESPONSE_BYTES, False

    def start(self, deadline: float) -> None:
        self.deadline, self.bytes_left, self.overflow = deadline, MAX_RESPONSE_BYTES, False

    def left(self, timeout: float | None, exc) -> float:
        """The timeout for one network operation: at most what is left of the deadline (exc when nothing)."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise exc("deadline of this decision reached")
        return remaining if timeout is None else min(timeout, remaining)

    def take(self, data: bytes, exc) -> bytes:
        self.bytes_left -= len(data)
        if self.bytes_left < 0:
            self.overflow = True
            raise exc(f"response larger than {MAX_RESPONSE_BYTES} bytes")
        return data


def _deadline_backend(inner, budget: _Budget):
    """An httpcore2 network backend whose streams honour `budget` (see the module docstring)."""
    import httpcore2

    class Stream(httpcore2.NetworkStream):
        def __init__(self, stream):
            self.stream = stream

        def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
            data = self.stream.read(max_bytes, budget.left(timeout, httpcore2.ReadTimeout))
            return budget.take(data, httpcore2.ReadError)

        def write(self, buffer: bytes, timeout: float | None = None) -> None:
            self.stream.write(buffer, budget.left(timeout, httpcore2.WriteTimeout))

        def close(self) -> None:
            self.stream.close()

        def start_tls(self, ssl_context, server_hostname=None, timeout=None):
            return Stream(self.stream.start_tls(ssl_context, server_hostname,
                                                budget.left(timeout, httpcore2.ConnectTimeout)))

        def get_extra_info(self, info: str):
            return self.stream.get_extra_info(info)

    class Backend(httpcore2.NetworkBackend):
        def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
            return Stream(inner.connect_tcp(host, port, budget.left(timeout, httpcore2.ConnectTimeout),
                                            local_address, socket_options))

        def connect_unix_socket(self, path, timeout=None, socket_options=None):
            return Stream(inner.connect_unix_socket(path, budget.left(timeout, httpcore2.ConnectTimeout),
                                                    socket_options))

        def sleep(self, seconds: float) -> None:
            inner.sleep(seconds)

    return Backend()


def _identity_only(response) -> None:
    """httpx response hook: we asked for an uncompressed body, so the byte cap is a cap on the decoded body."""
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise ValueError(f"server sent a {encoding!r}-encoded body although asked for identity")


def make_http_client(budget: _Budget, timeout_s: float, basic_auth: tuple[str, str] | None = None):
    """An httpx2 client whose connections obey `budget`; no environment proxies, no redirects."""
    import httpx2

    transport = httpx2.HTTPTransport(trust_env=False)
    pool = getattr(transport, "_pool", None)
    if not hasattr(pool, "_network_backend"):  # pragma: no cover - a different httpx2 layout
        raise ControllerUnavailable("cannot install the deadline-aware network backend in this httpx2 version")
    pool._network_backend = _deadline_backend(pool._network_backend, budget)
    auth = httpx2.BasicAuth(*basic_auth) if basic_auth else None
    return httpx2.Client(transport=transport, timeout=timeout_s, trust_env=False, follow_redirects=False,
                         auth=auth, event_hooks={"response": [_identity_only]})


def _quiet_client_logs() -> None:
    """The client's debug logs print request and response headers and bodies: keep them at WARNING unless the
    user configured them (their records would bypass the redaction)."""
    for name in ("openai", "httpx2", "httpcore2"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)


class ChatEndpoint:
    """One /chat/completions endpoint: the key and basic auth, the deadline of the decision in flight, transport
    retries, and HTTP failures mapped to the controller's errors.

    Connection failures, timeouts, 408/409/429/5xx are retried (cfg.retries times, backoff bounded by the
    deadline), then ControllerUnavailable; 401/403/404 mean the endpoint is unusable (ControllerUnavailable);
    400/413/422 fail this answer (BadRequest). A first answer that does not arrive within the deadline is
    ControllerUnavailable; a re-ask that runs out of time, DeadlineExceeded.
    """

    def __init__(self, cfg: ControllerConfig):
        self.cfg, self.url = cfg, cfg.base_url.rstrip("/") + "/chat/completions"  # for messages: no userinfo
        self.api_key = None
        if cfg.api_key_env:
            self.api_key = os.environ.get(cfg.api_key_env) or None
            if not self.api_key:
                log.info("env var %s is not set: calling %s without an API key", cfg.api_key_env, self.url)
        auth = cfg.base_url_auth
        basic = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode() if auth else None
        self.redact = Redactor(self.api_key, auth[1] if auth else None, basic)
        self.budget, self.deadline, self.reask = _Budget(), 0.0, False
        self._client = None
        self._auth = auth

    def start(self, reask: bool) -> None:
        """A new decision starts its deadline now; a re-ask (after an invalid answer) runs within it."""
        self.reask = reask
        if not reask:
            self.deadline = time.monotonic() + self.cfg.timeout_s

    @property
    def client(self):
        if self._client is None:
            import openai

            _quiet_client_logs()
            self._client = openai.OpenAI(
                base_url=self.cfg.base_url, api_key=self.api_key or "", admin_api_key="", max_retries=0,
                timeout=self.cfg.timeout_s, default_headers={"Accept-Encoding": "identity"},
                http_client=make_http_client(self.budget, self.cfg.timeout_s, self._auth))
        return self._client

    def _left(self, reason: str) -> float:
        remaining = self.deadline - time.monotonic()
        if remaining > 0:
            return remaining
        what = f"no complete answer within the {self.cfg.timeout_s:g}s deadline of one decision"
        if self.reask:
            raise DeadlineExceeded(f"{what} (re-ask)")
        raise ControllerUnavailable(f"{self.url}: {what}" + (f" (last error: {reason})" if reason else ""))

    def post(self, request: dict):
        """One answer with transport retries; every attempt and every sleep within the deadline."""
        import openai

        attempts, reason = self.cfg.retries + 1, ""
        extra = {} if self.api_key else {"extra_headers": {"Authorization": openai.omit}}
        for attempt in range(attempts):
            if attempt:
                time.sleep(min(self.cfg.retry_backoff_s * 2 ** (attempt - 1), self._left(reason)))
            self.budget.start(self.deadline)
            try:
                return self.client.chat.completions.create(**request, timeout=self._left(reason), **extra)
            except openai.APIStatusError as e:
                reason = self._status_error(e, "response_format" in request)
            except openai.APIConnectionError as e:  # refused, reset, timeouts (the deadline included), cut
                reason = self._connection_error(e)
            except ValueError as e:  # a 200 whose body is not JSON, or a compressed body
                raise DecisionError(self.redact(f"malformed chat completion response: {e}")[:300]) from None
            log.debug("controller request %d/%d to %s failed: %s", attempt + 1, attempts, self.url, reason)
        self._left(reason)
        raise ControllerUnavailable(f"{self.url} unreachable after {attempts} attempt(s): {reason}")

    def _status_error(self, e, with_format: bool) -> str:
        """The redacted reason of an HTTP error, or an exception when retrying cannot help. A server error that
        names response_format is a refusal of the format (llama-cpp-python answers 500 to type json_schema)."""
        text = self.redact(getattr(e, "message", "") or str(e))
        reason = f"HTTP {e.status_code} {text[:300]}".strip()
        if e.status_code in (400, 413, 422) or (with_format and "response_format" in text):
            raise BadRequest(f"{self.url}: {reason}") from None
        if e.status_code not in (408, 409, 429) and e.status_code < 500:  # auth, not found: retrying won't help
            raise ControllerUnavailable(f"{self.url}: {reason}") from None
        return reason

    def _connection_error(self, e) -> str:
        if self.budget.overflow:
            raise DecisionError(f"response larger than {MAX_RESPONSE_BYTES} bytes") from None
        cause = e.__cause__ or e.__context__
        if isinstance(cause, ValueError):  # raised by _identity_only inside the client
            raise DecisionError(self.redact(f"malformed chat completion response: {cause}")[:300]) from None
        text = str(cause) if cause is not None and str(cause) else str(e)
        return self.redact(f"{type(e).__name__}: {text}")[:300]
