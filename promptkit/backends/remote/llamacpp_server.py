"""llama-cpp-python's OpenAI server (``python -m llama_cpp.server``) in a subprocess on loopback,
for tests and benchmarks that check this backend against a server that is not promptkit's.

On a CPU that lists AMX, llama.cpp's repacked (AMX) weight buffers can crash a decode (a
segfault, or SIGILL where the kernel does not grant AMX tiles), and the server has no flag to
turn them off; the launcher then loads the model with ``use_extra_bufts=False`` (the AVX512
kernels), as ``bench/vs_llamacpp.py`` does for the library.
"""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

# Runs the server module as `python -m` would, optionally with llama.cpp's extra buffers off.
_LAUNCH = """
import runpy, sys
if sys.argv[1] == "no-extra-buffers":
    import llama_cpp.llama_cpp as lc
    default = lc.llama_model_default_params
    def params():
        p = default()
        p.use_extra_bufts = False
        return p
    lc.llama_model_default_params = params
del sys.argv[1]
runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
"""


def unavailable_reason() -> str | None:
    """Why llama-cpp-python's server cannot run here, or None when it can."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (pip install 'llama-cpp-python[server]')"
    for module in ("llama_cpp.server", "sse_starlette", "starlette_context"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not importable: install the server extra, pip install 'llama-cpp-python[server]'"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _amx_listed() -> bool:
    from ...engine.weights import cpu_features

    return bool(cpu_features().amx_listed)


class LlamaCppServer:
    """``with LlamaCppServer(gguf) as srv: LM(srv.alias, backend="openai", base_url=srv.url + "/v1")``.

    ``logits_all`` keeps every position's logits, which echoed prompt log-probabilities (scoring) need.
    ``extra_buffers``: llama.cpp's repacked weight buffers (None: off where the CPU lists AMX).
    """

    def __init__(self, model_path: str | Path, alias: str = "smollm2", n_ctx: int = 2048, threads: int = 2,
                 logits_all: bool = True, extra_buffers: bool | None = None, startup_timeout: float = 180.0,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.model_path, self.alias, self.n_ctx, self.threads = str(model_path), alias, n_ctx, threads
        self.logits_all, self.startup_timeout, self.extra_args = logits_all, startup_timeout, extra_args
        self.extra_buffers = (not _amx_listed()) if extra_buffers is None else extra_buffers
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log_path = Path(tempfile.mkstemp(prefix="llama-cpp-server-", suffix=".log")[1])

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:54321`` (append ``/v1`` for OpenAI clients)."""
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-c", _LAUNCH, "extra-buffers" if self.extra_buffers else "no-extra-buffers",
                "--model", self.model_path, "--model_alias", self.alias, "--host", "127.0.0.1",
                "--port", str(self.port), "--n_threads", str(self.threads), "--n_threads_batch", str(self.threads),
                "--n_ctx", str(self.n_ctx), "--logits_all", str(self.logits_all).lower(), "--verbose", "false",
                *self.extra_args]

    def __enter__(self) -> LlamaCppServer:
        why = unavailable_reason()
        if why:
            raise RuntimeError(why)
        self.port = _free_port()
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                tail = self.log_tail()
                self.log_path.unlink(missing_ok=True)
                raise RuntimeError(f"llama-cpp-python's server exited with {self.proc.returncode}: {tail}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        tail = self.log_tail()
        self.__exit__()
        raise RuntimeError(f"llama-cpp-python's server did not start in {self.startup_timeout:.0f}s: {tail}")

    def log_tail(self, chars: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.log_path.unlink(missing_ok=True)
