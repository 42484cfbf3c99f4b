"""Which thread runs torch's CPU work, and why it matters for decode speed.

PyTorch runs a CPU op in parallel on an OpenMP team owned by the thread that
calls it, and every thread that has run a parallel op keeps a team of its own
until it exits. Once a process holds more OpenMP threads than it has CPUs,
libgomp stops letting idle team members spin: they sleep between parallel
regions, and each region waits for them to wake. A decode step is hundreds of
short regions, so on a 2-core machine a second team (say, the one the model
was loaded on) halves single-stream decode speed (``bench/decode_threads.py``
measures it).

The engine's forwards run on its loop thread. Heavy torch work that would
otherwise run on the caller's thread (loading and converting a model, side
passes of the engine, embedding texts) goes through :func:`on_fresh_thread`,
whose team ends with the thread, so the loop thread's team stays the only one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def on_fresh_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` run on a new thread that ends when it returns; its result, or its exception."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # re-raised in the caller
            box["error"] = e

    worker = threading.Thread(target=run, name="promptkit-torch", daemon=True)
    worker.start()
    worker.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
