"""`promptkit serve` as a real process: listening on every interface without an API key is warned about."""

from __future__ import annotations

import os
import queue
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serve:
    """``promptkit serve`` in a subprocess, its stderr read line by line; terminated on exit."""

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "COLUMNS": "400", "NO_COLOR": "1"}  # one warning per line, unwrapped
        self.proc = subprocess.Popen([sys.executable, "-m", "promptkit.cli", "serve", *args], env=env,
                                     stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(ln) for ln in self.proc.stderr], daemon=True).start()
        self.seen: list[str] = []

    def wait_for(self, words: str, seconds: float = 180) -> str:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                assert self.proc.poll() is None, f"serve exited: {''.join(self.seen)}"
                continue
            self.seen.append(line)
            if words in line:
                return line
        raise AssertionError(f"no {words!r} in {''.join(self.seen)!r}")

    def __enter__(self) -> Serve:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def healthy(port: int, seconds: float = 60) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()
        except httpx.ConnectError:  # "serving" is printed just before uvicorn binds the port
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_serving_on_all_interfaces_without_a_key_warns():
    port = free_port()
    with Serve("--host", "0.0.0.0", "--port", str(port)) as serve:
        serve.wait_for("serving")
        warnings = [line for line in serve.seen if "warning" in line]
        assert len(warnings) == 1 and "0.0.0.0" in warnings[0] and "--api-key" in warnings[0], serve.seen
        assert healthy(port) == {"status": "ok"}


@pytest.mark.parametrize("args", [["--host", "0.0.0.0", "--api-key", "k"], ["--host", "127.0.0.1"]])
def test_no_warning_with_a_key_or_on_loopback(args):
    with Serve(*args, "--port", str(free_port())) as serve:
        serve.wait_for("serving")
        assert not any("warning" in line for line in serve.seen), serve.seen
