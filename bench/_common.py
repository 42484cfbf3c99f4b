"""Shared helpers for the benchmark scripts: timing, memory, progress on stderr, the JSON result line.

Every script reports progress on stderr (a line per stage with the seconds elapsed,
and a progress bar over long loops) and prints its result as one JSON object, the
last line of stdout, so ``python bench/x.py --quick | tail -1`` is machine-readable.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

sys.path.insert(0, os.path.dirname(__file__))

T = TypeVar("T")
_START = time.perf_counter()
_console = Console(stderr=True, highlight=False)


def log(msg: str) -> None:
    """One progress line on stderr, stamped with the seconds since the script started."""
    _console.print(f"[dim]{time.perf_counter() - _START:7.1f}s[/dim] {msg}", soft_wrap=True)


def track(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """Iterate with progress on stderr: a live bar on a terminal, a line every few seconds elsewhere."""
    items = list(items) if total is None and not hasattr(items, "__len__") else items
    total = total if total is not None else len(items)  # type: ignore[arg-type]
    if _console.is_terminal:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=_console, transient=True) as bar:
            task = bar.add_task(desc, total=total)
            for item in items:
                yield item
                bar.advance(task)
        log(f"{desc}: {total}/{total}")
        return
    last = time.perf_counter()
    for i, item in enumerate(items, 1):
        yield item
        if time.perf_counter() - last > 5 or i == total:
            log(f"{desc}: {i}/{total}")
            last = time.perf_counter()


@contextmanager
def stage(name: str, out: dict | None = None, key: str | None = None):
    """Log the start and end of a stage with its seconds; store them in ``out[key]`` if given."""
    log(f"{name} ...")
    t0 = time.perf_counter()
    yield
    secs = time.perf_counter() - t0
    if out is not None and key:
        out[key] = secs
    log(f"{name}: {secs:.1f}s")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(result: dict) -> None:
    """Print the result as the last line of stdout: one JSON object."""
    log(f"done in {time.perf_counter() - _START:.1f}s")
    print(json.dumps(result, sort_keys=False), flush=True)


def machine() -> dict:
    """The host a figure was measured on: device, CPU model and the features that set its speed."""
    import torch

    from promptkit.doctor import cpu_model
    from promptkit.engine.weights import cpu_features

    return {"device": "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "cpu": cpu_model(), "cpu_features": cpu_features().describe(),
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def hf_step(model, input_ids, cache=None, **kw):
    """One forward of a transformers causal LM on top of ``cache`` (None: a fresh one).

    Returns (output, the new cache). Recent transformers name the cache argument and output
    field ``cache``, older ones ``past_key_values``.
    """
    import inspect

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=input_ids, use_cache=True, **({name: cache} if cache is not None else {}), **kw)
    return out, getattr(out, name)


class RssPeak:
    """Peak resident memory above the level at entry, sampled every few milliseconds."""

    def __enter__(self):
        import threading

        import psutil

        self.proc = psutil.Process()
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.mb = (self.peak - self.base) / 2**20


def real_token_runs(lm, n: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    """``n`` runs of consecutive tokens of real Wikipedia text, lengths uniform in ``lo..hi``."""
    import random

    from evaldata import load_wikipedia_articles

    text = "\n\n".join(a["text"] for a in load_wikipedia_articles())
    ids = lm.backend.encode_continuation(text[: max(200_000, 8 * n * hi)])  # ~4 characters a token: room to spare
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(lo, hi)
        start = rng.randrange(0, len(ids) - length)
        out.append(ids[start : start + length])
    return out
