"""bench/gpu_check.py: its CPU self-test passes here, it exits cleanly without CUDA, and the CUDA-only
checks run where a GPU is (skipped otherwise)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.py"


def run(*args):
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_self_test_on_the_cpu_passes_every_check():
    res = run("--self-test")
    assert res["ok"] and set(res["families_float32"]) >= {"llama", "mistral", "qwen2", "qwen3", "gemma2",
                                                         "gemma3_text", "phi3"}
    assert all(v == 1.0 for v in res["families_float32"].values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the script runs its checks")
def test_without_cuda_it_says_so_and_exits_zero():
    res = run()
    assert res["cuda"] is False and "families" in res["would_check"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_kernels_families_and_sampling():
    res = run("--quick")
    assert res["cuda"] and res["ok"], res
