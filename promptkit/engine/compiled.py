"""Single-stream decode as one ahead-of-time compiled graph: a step's small operations fused between the matmuls.

A decode step of one request does little arithmetic per operation. On a CPU,
dispatching the norms, rotations, residual adds and attention bookkeeping of
every layer (about 1,600 operations for a 30-layer model) costs as much as
the matmuls themselves. Here the whole step (``decode_graph.py``), from the
token's embedding through every layer to the output projection, is compiled
ahead of time by AOTInductor into a shared library: the small operations fused
into a few C++ loops around PyTorch's own matmul and attention kernels, and no
Python between kernels.

Where the library lives, and when it is built:

- The promptkit cache keeps one library per graph key (the step's spec:
  shapes, dtypes and kinds of product; PyTorch's version; this code; the CPU),
  ``graphs/<key>.so``. The weights are arguments of the graph, so every model
  of one shape and format shares a library. Loading it takes milliseconds, so
  an engine whose graph is cached decodes compiled from its first step.
- Building takes a minute or two on a small machine. It never runs in the
  process that serves requests: a child process builds it at the lowest CPU
  priority while decode runs eagerly, and the library is loaded between two
  steps once the child is done. ``promptkit models prepare`` (run by set-up)
  builds the default model's graph once.
- ``compile_decode`` picks the policy: ``auto`` (load the cached graph, or build
  it in the background), ``cached`` (load it if cached, never build: one-shot
  commands, which would not live to use it), ``build`` (build now and wait) and
  ``off``. ``$PROMPTKIT_COMPILE_DECODE`` sets the default.

A child still building when the process exits is stopped with it, so nothing
compiles, and no thread runs compiler code, while the interpreter shuts down.
A machine without a C++ compiler, or a model the graph cannot describe, keeps
the eager forward (a warning says why). Only bfloat16 activations (the
bfloat16, int8 and int4 weight formats) take this path: float32 keeps the
eager forward that equals transformers bit for bit. A compiled bfloat16 step
rounds differently from an eager one (the fused loops keep float32 between
operations).
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import Any, Literal

import torch

from .decode_graph import RUNS, DecodeStep, Spec, describe, empty_weights
from .kv_pool import KVPool, Run

log = logging.getLogger("promptkit.engine")

CompileMode = Literal["auto", "cached", "build", "off"]
MODES = ("auto", "cached", "build", "off")
BUILD_TIMEOUT_S = 1800
GRAPH_SOURCES = ("compiled.py", "decode_graph.py", "llama.py", "attention/merge.py")  # what the graph is made of
BUILD_COMMAND = [sys.executable, "-m", "promptkit.engine.compiled"]  # + spec file, library path
_children: set[subprocess.Popen] = set()


def usable(lean: Any, pool: KVPool) -> bool:
    """Whether a decode graph applies: the lean forward, on CPU, with bfloat16 activations and KV."""
    return (lean is not None and pool.kv.device.type == "cpu"
            and pool.kv.dtype == torch.bfloat16 and pool.capacity >= 8)


def default_mode() -> CompileMode:
    mode = os.environ.get("PROMPTKIT_COMPILE_DECODE", "auto").strip().lower()
    if mode not in MODES:
        raise ValueError(f"PROMPTKIT_COMPILE_DECODE={mode!r}: choose one of {', '.join(MODES)}")
    return mode  # type: ignore[return-value]


def graph_key(spec: Spec) -> str:
    """What a compiled library depends on: the spec, PyTorch, this code, the CPU."""
    here = Path(__file__).parent
    code = hashlib.sha256(b"".join((here / f).read_bytes() for f in GRAPH_SOURCES))
    from .weights.cpu import cpu_features

    facts = {"spec": spec, "torch": torch.__version__, "code": code.hexdigest(), "machine": platform.machine(),
             "cpu": cpu_features().describe(), "python": sys.version_info[:2]}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:24]


def graph_path(spec: Spec) -> Path:
    """The spec's library in the promptkit cache."""
    from ..models import cache_dir

    return cache_dir() / "graphs" / f"{graph_key(spec)}.so"


class CompiledDecode:
    """The decode step of one request through the compiled library of its lean forward's spec.

    :meth:`step` returns None (the caller runs the eager forward) until the library is loaded,
    or when the request's keys do not fit its shape.
    """

    def __init__(self, lean: Any, pool: KVPool, mode: CompileMode = "auto") -> None:
        self.pool = pool
        self.error: str | None = None
        self.steps = 0  # decode steps run by the graph
        self._runner: Any = None
        self._child: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._hidden = torch.empty(1, lean.model.config.hidden_size, dtype=pool.kv.dtype)
        self._rope = lean.rope
        described = describe(lean)
        if described is None:
            self.spec, self._weights, self.path = None, [], None
            self.error = "the model has a module the graph has no form for"
            return
        spec, self._weights = described
        self.spec = {**spec, "head_dim": pool.kv.shape[-1], "dtype": str(pool.kv.dtype).removeprefix("torch.")}
        self.path = graph_path(self.spec)
        if mode == "off":
            return
        if self.path.exists():
            self._load()
        elif mode == "build":
            self._child = _start_build(self.spec, self.path, background=False)
            self.wait()
        elif mode == "auto":
            self._child = _start_build(self.spec, self.path, background=True)
            log.info("decode runs eagerly while its graph compiles in the background (%s)", self.path.name)

    @property
    def ready(self) -> bool:
        return self._runner is not None

    @property
    def status(self) -> str:
        """``ready``, ``building``, ``not cached`` or ``failed: ...``."""
        if self.error is not None:
            return f"failed: {self.error}"
        if self._runner is not None:
            return "ready"
        return "building" if self._child is not None else "not cached"

    def wait(self, timeout: float | None = BUILD_TIMEOUT_S) -> bool:
        """Wait for a build under way to end and load its library; whether the graph is ready."""
        child = self._child
        if child is not None:
            try:
                child.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            self._collect()
        return self.ready

    def _collect(self) -> None:
        """Load the library once its build has ended (or record why it failed)."""
        with self._lock:
            child, self._child = self._child, None
            if child is None:
                return
            _children.discard(child)
            if child.returncode == 0 and self.path.exists():
                self._load()
            else:
                self._failed(f"the build exited with status {child.returncode}: {_tail(child)}")

    def _load(self) -> None:
        try:
            self._runner = torch._C._aoti.AOTIModelContainerRunnerCpu(str(self.path), 1)
        except Exception as e:  # a library from another build of PyTorch, or a damaged file
            self._failed(f"loading {self.path} failed ({type(e).__name__}: {e})")

    def _failed(self, why: str) -> None:
        self.error = why
        log.warning("single-stream decode stays eager: compiling its graph failed (%s)", why)

    @torch.inference_mode()
    def step(self, token: int, position: int, past: list[Run], slot: int) -> torch.Tensor | None:
        """Logits ``[1, V]`` (float32) after ``token`` at ``position``, whose keys are the pool runs
        ``past`` and its own slot ``slot`` (written here); None if the graph is not ready or ``past``
        is more than :data:`RUNS` runs (the caller runs the eager step)."""
        if self._runner is None:
            if self._child is None or self._child.poll() is None:
                return None
            self._collect()  # the background build has just ended
            if self._runner is None:
                return None
        if not past or len(past) > RUNS:
            return None
        runs = [(a, n, 1) for a, n in past] + [(past[0][0], 1, 0)] * (RUNS - len(past))
        cos, sin = self._rope(self._hidden, torch.tensor([[position]]))
        logits, new = self._runner.run([torch.tensor([token]), cos, sin, self.pool.kv, torch.tensor(runs),
                                        *self._weights])
        self.pool.kv[:, :, :, slot].copy_(new)
        self.steps += 1
        return logits.float()


# -- building -------------------------------------------------------------------------------------
def _start_build(spec: Spec, path: Path, background: bool) -> subprocess.Popen:
    """A child process compiling ``spec`` into ``path`` (at the lowest priority in the background)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, spec_file = tempfile.mkstemp(prefix="spec-", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(spec, f)
    errors = tempfile.TemporaryFile(mode="w+")
    # No preexec_fn: Popen can then spawn without copying this (large) process; the child lowers its own priority.
    child = subprocess.Popen([*BUILD_COMMAND, spec_file, str(path), *(["--background"] if background else [])],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors)
    child.errors = errors  # type: ignore[attr-defined]
    _children.add(child)
    return child


def _tail(child: subprocess.Popen) -> str:
    errors = getattr(child, "errors", None)
    if errors is None:
        return ""
    errors.seek(0)
    lines = [line.strip() for line in errors.read().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


@atexit.register
def _stop_builds() -> None:
    """A build the process did not wait for ends with it (its library would be for nobody here)."""
    for child in list(_children):
        if child.poll() is None:
            child.kill()
            child.wait()


def build(spec: Spec, path: Path) -> None:
    """Export :class:`DecodeStep` for ``spec`` and compile it with AOTInductor into the library ``path``.

    One build per path at a time (a lock file); a library already there is kept."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return
        dtype = getattr(torch, spec["dtype"])
        rot = torch.zeros(1, 1, spec["head_dim"], dtype=dtype)
        kv = torch.zeros(spec["layers"], 2, spec["kv_heads"], 8, spec["head_dim"], dtype=dtype)
        weights = empty_weights(spec)
        runs = torch.tensor([[0, 2, 1], [2, 2, 1], [4, 2, 1], [6, 2, 1]][:RUNS])
        args = (torch.zeros(1, dtype=torch.long), rot, rot.clone(), kv, runs, weights)
        slots = torch.export.Dim("slots", min=4, max=1 << 30)
        with torch.inference_mode():
            program = torch.export.export(DecodeStep(spec), args, strict=False,
                                          dynamic_shapes=(None, None, None, {3: slots}, None, [None] * len(weights)))
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            package = torch._inductor.aoti_compile_and_package(
                program, package_path=os.path.join(tmp, "step.pt2"),
                inductor_configs={"cpp.threads": 1})  # fused loops over a few hundred values: one thread each
            with zipfile.ZipFile(package) as z:
                [lib] = [n for n in z.namelist() if n.endswith(".so")]
                with z.open(lib) as src, open(os.path.join(tmp, "step.so"), "wb") as dst:
                    shutil.copyfileobj(src, dst)
            os.replace(os.path.join(tmp, "step.so"), path)


def _main(spec_file: str, out: str, *flags: str) -> int:
    if "--background" in flags:
        os.nice(19)  # the lowest CPU priority: the serving process keeps the cores it needs
    try:
        spec = json.loads(Path(spec_file).read_text())
    finally:
        Path(spec_file).unlink(missing_ok=True)
    build(spec, Path(out))
    return 0


if __name__ == "__main__":
    sys.exit(_main(*sys.argv[1:]))
