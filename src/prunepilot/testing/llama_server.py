"""A real OpenAI-compatible server for the tests and bench/: llama-cpp-python's `python -m llama_cpp.server` on
127.0.0.1.

LlamaServer(model).start() picks a free port, starts the server in its own process group, and waits (bounded) until
GET /v1/models answers; stop() terminates the group, then kills it. The server cannot outlive the process that
started it (a pytest session, a bench script): a test fixture stops it in a finally block, an atexit hook stops it if
the process ends otherwise, and on Linux the kernel sends it SIGTERM when that process dies (PR_SET_PDEATHSIG), even
on a SIGKILL.
"""
from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

THREADS = int(os.environ.get("PRUNEPILOT_LLAMA_THREADS", "1"))  # 1: robust on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The child asks the kernel for SIGTERM when its parent (pytest) dies, checks the parent is still there, then execs
# the server (done in the child's own interpreter, not in a preexec_fn, which is unsafe in a threaded parent).
LAUNCH = ("import ctypes, os, signal, sys\n"
          "if sys.platform == 'linux':\n"
          "    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
          "    if os.getppid() != int(sys.argv[1]): sys.exit(1)\n"
          "os.execv(sys.executable, [sys.executable, '-m', 'llama_cpp.server', *sys.argv[2:]])")


class LlamaServer:
    def __init__(self, model: str | Path, n_ctx: int = 4096, threads: int = THREADS, startup_timeout: float = 90.0):
        self.model, self.n_ctx, self.threads, self.startup_timeout = str(model), n_ctx, threads, startup_timeout
        self.proc: subprocess.Popen | None = None
        self.port = 0
        fd, log = tempfile.mkstemp(prefix="llama_server_", suffix=".log")
        os.close(fd)
        self.log = Path(log)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        return [sys.executable, "-c", LAUNCH, str(os.getpid()), "--model", self.model, "--host", "127.0.0.1",
                "--port", str(self.port), "--n_ctx", str(self.n_ctx), "--n_threads", str(self.threads),
                "--n_threads_batch", str(self.threads), "--verbose", "False"]

    def start(self) -> "LlamaServer":
        self.port = free_port()
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        atexit.register(self.stop)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {self.proc.returncode}: {self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/models", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"llama_cpp.server not ready within {self.startup_timeout:g}s: {self.tail()}")

    def tail(self, n: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Terminate the server's process group, kill it when it does not go within 10 s; idempotent."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            self.log.unlink(missing_ok=True)
            return
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        self.log.unlink(missing_ok=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
