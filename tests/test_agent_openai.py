"""OpenAI-compatible controllers over real HTTP: round trips, fallbacks, deadlines against trickling servers,
size caps, and secrets that never leak."""
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from prunepilot.agent import run_agent
from prunepilot.agent.controllers import BuiltinPolicy, GuardedController
from prunepilot.agent.config import ControllerConfig
from prunepilot.agent.journal import Journal
from prunepilot.engine import ModelAdapter
from prunepilot.errors import PrunepilotError
from prunepilot.testing.tiny_models import tiny_model

from agent_helpers import GOOD, NAMES, obs_for, send_json, tiny_cfg, tiny_data
from conftest import shared_path


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


# ------------------------------------------------------------------------ OpenAI-compatible server

class _Server:
    """A local OpenAI-compatible endpoint in a thread, answering at most `limit` requests."""

    def __init__(self, reply, limit=20):
        self.requests, self.reply, self.limit = [], reply, limit
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                if len(outer.requests) > outer.limit:
                    self.send_error(503)
                    return
                content = outer.reply(body)
                if isinstance(content, int):  # an HTTP error status
                    self.send_error(content)
                    return
                data = content if isinstance(content, bytes) else json.dumps(
                    {"id": "x", "object": "chat.completion", "model": body.get("model"),
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                  "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}}).encode()
                send_json(self, 200, data)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _canned_decision(body):
    """Pick the first two layers of the schema's enum, as a well-behaved LLM would."""
    names = body["response_format"]["json_schema"]["schema"]["properties"]["layer_decisions"]["items"][
        "properties"]["layer"]["enum"]
    return json.dumps({"reasoning": "prune the first two", "stop_pruning": False,
                       "layer_decisions": [{"layer": n, "extra_sparsity": 0.1} for n in names[:2]]})


def _openai_cfg(url, **kw):
    # pace=False: these tests count the controller's requests over two iterations (pacing would finish in one)
    return tiny_cfg(max_iterations=2, pace=False, controller={"kind": "openai", "base_url": url, "model_name": "canned",
                                                  "api_key_env": "PP_TEST_KEY", "retries": 1,
                                                  "retry_backoff_s": 0.0, "timeout_s": 10, **kw})


def test_openai_round_trip_over_http(tmp_path, monkeypatch):
    monkeypatch.setenv("PP_TEST_KEY", "sk-test")
    calib, held = tiny_data()
    with _Server(_canned_decision, limit=5) as srv:
        res = run_agent(tiny_model("llama"), None, _openai_cfg(srv.url), tmp_path, calibration=calib, held_out=held)
    assert len(srv.requests) == 2 and res.iterations == 2
    req = srv.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    assert req["body"]["model"] == "canned" and req["body"]["response_format"]["type"] == "json_schema"
    assert "Layer profile" in req["body"]["messages"][1]["content"]
    assert "prune the first two" in srv.requests[1]["body"]["messages"][1]["content"]  # own reasoning fed back
    _, recs = Journal(tmp_path / "journal.jsonl").read()
    assert [r.source for r in recs] == ["openai", "openai"] and len(recs[0].applied) == 2
    # per iteration: prompt size (characters always, tokens when the server reports usage) and controller time
    assert all(r.replies == 1 and r.prompt_tokens == 11 and r.completion_tokens == 5 and r.controller_s > 0
               and r.prompt_chars == sum(len(m["content"]) for m in q["body"]["messages"])
               for r, q in zip(recs, srv.requests))
    stats = res.report["controller_stats"]
    assert (stats["replies"], stats["valid_replies"], stats["fallbacks"], stats["prompt_tokens"]) == (2, 2, 0, 22)
    assert res.report["trajectory"][1]["prompt_tokens"] == 11 and res.report["trajectory"][1]["controller_s"] > 0


def test_openai_garbage_falls_back_to_builtin(tmp_path, caplog):
    calib, held = tiny_data()
    replies = iter([b"<html>not json</html>", "Sure, prune everything!", '{"reasoning": 1}'] * 4)
    with _Server(lambda body: next(replies), limit=12) as srv, caplog.at_level(logging.WARNING):
        res = run_agent(tiny_model("llama"), None, _openai_cfg(srv.url, invalid_retries=2), tmp_path,
                        calibration=calib, held_out=held)
    assert len(srv.requests) == 6  # 3 attempts per iteration, 2 iterations
    assert res.report["fallbacks"] == 2 and res.global_sparsity > 0.1
    assert "gave no valid decision in 3 attempt(s)" in caplog.text


def test_endpoint_without_json_schema_support_is_asked_again_without_it(tmp_path):
    calib, held = tiny_data()
    names = list(ModelAdapter(tiny_model("llama")).all_linears())
    answer = json.dumps({"reasoning": "r", "stop_pruning": False,
                         "layer_decisions": [{"layer": names[0], "extra_sparsity": 0.1}]})
    with _Server(lambda body: 400 if "response_format" in body else answer) as srv:
        res = run_agent(tiny_model("llama"), None, _openai_cfg(srv.url), tmp_path, calibration=calib, held_out=held)
    # json_schema refused -> json_object (+ schema, for llama.cpp-style servers) refused -> plain text, and the
    # refused formats are not sent again
    kinds = [r["body"].get("response_format", {}).get("type") for r in srv.requests]
    assert kinds == ["json_schema", "json_object", None, None]
    assert srv.requests[1]["body"]["response_format"]["schema"]["required"] == ["reasoning", "stop_pruning",
                                                                                "layer_decisions"]
    assert res.report["fallbacks"] == 0 and res.iterations == 2


def test_auth_failure_disables_the_endpoint_bad_request_fails_one_answer(tmp_path):
    calib, held = tiny_data()
    with _Server(lambda body: 401) as srv:
        res = run_agent(tiny_model("llama"), None, _openai_cfg(srv.url), tmp_path / "a", calibration=calib,
                        held_out=held)
    assert len(srv.requests) == 1 and res.report["fallbacks"] == 2  # not asked again after a 401
    with _Server(lambda body: 422) as srv:
        res = run_agent(tiny_model("llama"), None, _openai_cfg(srv.url, invalid_retries=1, json_schema=False),
                        tmp_path / "b", calibration=calib, held_out=held)
    assert len(srv.requests) == 4 and res.report["fallbacks"] == 2  # re-asked every iteration, never retried blind


def test_unreachable_endpoint_warns_once_and_falls_back_or_fails_strict(tmp_path, caplog):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    calib, held = tiny_data()
    with caplog.at_level(logging.WARNING):
        res = run_agent(tiny_model("llama"), None, _openai_cfg(url), tmp_path / "a", calibration=calib, held_out=held)
    warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "unreachable after 2 attempt(s)" in warnings[0].getMessage()
    assert res.report["fallbacks"] == 2
    with pytest.raises(PrunepilotError, match="unreachable"):
        run_agent(tiny_model("llama"), None, _openai_cfg(url, strict=True), tmp_path / "b", calibration=calib,
                  held_out=held)


class _RawServer:
    """A TCP server that reads one request per connection and answers with `respond(sock, request_bytes)`, then closes
    it: a complete reply must say "Connection: close", or the client reuses the pooled connection for its next request
    and, racing the close, gets a reset instead of an answer."""

    def __init__(self, respond):
        import socket

        self.respond, self.requests = respond, []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self):
        import socket

        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn):
        with conn:
            conn.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(next((h.split(b":")[1] for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")),
                              b"0"))
            while len(body) < length:
                body += conn.recv(65536)
            self.requests.append(head + b"\r\n\r\n" + body)
            try:
                self.respond(conn, self.stop)
            except OSError:  # the client went away
                pass

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(2)
        self.sock.close()


def _trickle(first: bytes, then: bytes):
    """Send `first`, then `then` one byte every 0.1 s (until the client hangs up or the test ends)."""
    import time

    def respond(conn, stop):
        conn.sendall(first)
        for b in then:
            if stop.is_set():
                return
            conn.sendall(bytes([b]))
            time.sleep(0.1)
    return respond


TRICKLES = {
    "headers": _trickle(b"HTTP/1.1 200 OK\r\n", b"X-Slow: " + b"x" * 10_000 + b"\r\n"),
    "body": _trickle(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n",
                     b'{"choices": [' + b" " * 99_000),
}


@pytest.mark.parametrize("where", sorted(TRICKLES))
def test_trickling_server_cannot_hold_a_decision_past_the_deadline(where, tmp_path, caplog):
    """--timeout is one wall-clock deadline per decision: a server sending a byte every 0.1 s (each socket read
    returns in time, so per-read timeouts never fire) is cut off at the deadline, retries included."""
    import time

    calib, held = tiny_data()
    cfg = _openai_cfg("http://x/v1", timeout_s=1.5, retries=2, retry_backoff_s=0.2)
    with _RawServer(TRICKLES[where]) as srv, caplog.at_level(logging.WARNING):
        cfg.controller.base_url = srv.url
        t0 = time.monotonic()
        res = run_agent(tiny_model("llama"), None, cfg, tmp_path, calibration=calib, held_out=held)
        elapsed = time.monotonic() - t0
    _, recs = Journal(tmp_path / "journal.jsonl").read()
    assert recs[0].controller_s < 1.5 + 0.5 and elapsed < 10  # not 1000 s of trickle
    assert "deadline of one decision" in recs[0].warnings[0]
    assert res.report["fallbacks"] == 2 and len(srv.requests) >= 1
    # the endpoint is then considered unavailable: not asked again, the run is not held any longer
    assert recs[1].replies == 0 and recs[1].controller_s < 0.5


def test_a_reask_that_runs_out_of_time_falls_back_for_this_iteration_only(tmp_path):
    """An invalid first answer, then a re-ask that trickles: the deadline ends the decision (fallback now) without
    declaring the endpoint unavailable; the next iteration asks again with a fresh deadline."""
    replies = iter([json.dumps({"reasoning": 1})] + [None] * 10)

    def respond(conn, stop):
        reply = next(replies)
        if reply is None:
            return TRICKLES["body"](conn, stop)
        body = json.dumps({"choices": [{"message": {"content": reply}}]}).encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body)

    calib, held = tiny_data()
    cfg = _openai_cfg("http://x/v1", timeout_s=1.5, retries=0, invalid_retries=2)
    with _RawServer(respond) as srv:
        cfg.controller.base_url = srv.url
        run_agent(tiny_model("llama"), None, cfg, tmp_path, calibration=calib, held_out=held)
    _, recs = Journal(tmp_path / "journal.jsonl").read()
    assert recs[0].source == "builtin-fallback" and "re-ask" in recs[0].warnings[0] and recs[0].replies == 2
    assert recs[0].controller_s < 2.0
    assert recs[1].replies >= 1  # asked again next iteration


def test_oversized_or_compressed_replies_are_refused(tmp_path):
    import gzip

    def big(conn, stop):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (9 << 20))
        chunk = b" " * (1 << 20)
        for _ in range(9):
            conn.sendall(chunk)

    def zipped(conn, stop):
        body = gzip.compress(json.dumps({"choices": [{"message": {"content": json.dumps(GOOD)}}]}).encode())
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(body) + body)

    for respond, what in ((big, "larger than"), (zipped, "gzip")):
        ctl = _openai_controller("http://x/v1", invalid_retries=0)
        with _RawServer(respond) as srv:
            ctl.cfg.base_url = srv.url
            d = GuardedController(ctl, BuiltinPolicy(), invalid_retries=0).decide(obs_for(NAMES))
        assert d.source == "builtin-fallback" and what in d.warnings[0], d.warnings


def _openai_controller(url, **kw):
    from prunepilot.agent.controllers import OpenAIController

    return OpenAIController(ControllerConfig(kind="openai", base_url=url, model_name="m", api_key_env="PP_TEST_KEY",
                                             retries=0, timeout_s=10, **kw))


SECRET = "sk-test-9f8e7d6c5b4a39281706f5e4d3c2b1a0"


def test_an_echoed_key_never_reaches_stderr_logs_journal_or_outputs(tmp_path, monkeypatch, capsys, caplog):
    from prunepilot.cli import main

    monkeypatch.setenv("PP_TEST_KEY", SECRET)
    seen = []

    class Echo(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            auth = self.headers.get("Authorization", "")
            seen.append(auth)
            n = len(seen)
            if n in (1, 3):  # a retried 500 and a 422, their bodies echoing the key
                status, data = (500 if n == 1 else 422), json.dumps({"error": {"message": f"bad token {auth}"}})
            elif n == 2:  # a valid decision whose reasoning quotes the key
                names = body["response_format"]["json_schema"]["schema"]["properties"]["layer_decisions"][
                    "items"]["properties"]["layer"]["enum"]
                content = json.dumps({"reasoning": f"authorized with {auth}", "stop_pruning": False,
                                      "layer_decisions": [{"layer": names[0], "extra_sparsity": 0.1}]})
                status, data = 200, json.dumps({"choices": [{"message": {"content": content}}]})
            else:  # then the key is refused, echoed once more
                status, data = 401, json.dumps({"error": {"message": f"invalid key {auth[7:]}"}})
            send_json(self, status, data.encode())

        def log_message(self, *a):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    out = tmp_path / "run"
    try:
        with caplog.at_level(logging.DEBUG):
            code = main(["agent", str(shared_path("models", "stories260K")), "--target", "0.3", "--max-iterations",
                         "3", "--controller", "openai", "--base-url",
                         f"http://127.0.0.1:{httpd.server_address[1]}/v1",
                         "--model-name", "m", "--api-key-env", "PP_TEST_KEY", "--retries", "1", "--timeout", "30",
                         "--calib", "tinystories", "--n-samples", "2", "--seqlen", "64", "--eval-tokens", "256",
                         "--eval-seqlen", "128", "--grad-samples", "0", "--device", "cpu", "--out", str(out),
                         "--no-pace", "--allow-short"])  # the key is what this test is about
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert code == 0 and seen[0] == f"Bearer {SECRET}" and len(seen) == 4
    err = capsys.readouterr()
    texts = {"stderr": err.err, "stdout": err.out, "logs": caplog.text}
    for f in out.rglob("*"):
        if f.is_file():
            texts[str(f.relative_to(out))] = f.read_bytes().decode("utf-8", errors="replace")
    assert {"journal.jsonl", "agent.yaml", "report.json"} <= set(texts)
    for where, text in texts.items():
        assert SECRET not in text, f"the key is in {where}"
    journal = texts["journal.jsonl"]
    assert "authorized with Bearer [REDACTED]" in journal  # the reply was used, the key cut out of it
    assert "invalid key [REDACTED]" in journal  # the 401 body, in the fallback warning
    assert "PP_TEST_KEY" in texts["agent.yaml"]  # the variable's name is saved, never its value


def test_credentials_in_the_base_url_are_used_but_never_saved(tmp_path):
    import base64

    calib, held = tiny_data()
    with _Server(_canned_decision, limit=5) as srv:
        url = srv.url.replace("http://", "http://alice:s3cr%40t@")
        cfg = _openai_cfg(url)
        assert cfg.controller.base_url == srv.url and "s3cr" not in cfg.to_yaml()
        res = run_agent(tiny_model("llama"), None, cfg, tmp_path, calibration=calib, held_out=held)
    assert srv.requests[0]["auth"] == "Basic " + base64.b64encode(b"alice:s3cr@t").decode()
    assert res.report["controller_stats"]["valid_replies"] == 2
    for name in ("agent.yaml", "report.json", "journal.jsonl"):
        text = (tmp_path / name).read_text()
        assert "s3cr" not in text and "alice" not in text, name
    from prunepilot.agent.transport import Redactor

    redact = Redactor("s3cr@t", "alice")
    assert redact('{"user": "alice", "pw": "s3cr@t"}') == '{"user": "[REDACTED]", "pw": "[REDACTED]"}'
    ctl = _openai_controller(url)  # the password and the basic-auth header are redacted from server text
    assert ctl.endpoint.redact(f"echo: {srv.requests[0]['auth']} s3cr@t") == "echo: Basic [REDACTED] [REDACTED]"


def test_a_key_given_as_api_key_env_is_refused_without_echoing_it(tmp_path, capsys):
    from prunepilot.cli import main

    for value in (SECRET, "hf_" + "a1B2c3D4e5" * 3, "Zx9Qw8Er7Ty6Ui5Op4As3Df2"):
        code = main(["agent", "some/model", "--controller", "openai", "--base-url", "http://127.0.0.1:1/v1",
                     "--model-name", "m", "--api-key-env", value, "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2 and "NAME of an environment variable" in err and value not in err
    assert not (tmp_path / "o").exists()
