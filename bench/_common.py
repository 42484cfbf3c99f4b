"""Shared helpers for the benchmark scripts (timing, memory, output)."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from contextlib import contextmanager

sys.path.insert(0, os.path.dirname(__file__))


@contextmanager
def timer(out: dict, key: str):
    t0 = time.perf_counter()
    yield
    out[key] = time.perf_counter() - t0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(result: dict) -> None:
    """Print the result as the last line: one JSON object."""
    print(json.dumps(result, sort_keys=False), flush=True)


def machine() -> dict:
    import torch

    return {"device": "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "threads": torch.get_num_threads(), "torch": torch.__version__}
