"""Shared fixtures: a tiny random-weight llama for fast engine tests, the real SmolLM2 for integration."""

from __future__ import annotations

import os

import pytest
from tiny import make_tiny_llama

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The exact mode: outputs equal transformers' and do not depend on batching or caching (bfloat16 rounding would).
os.environ.setdefault("PROMPTKIT_WEIGHTS", "float32")
# Engines decode eagerly unless a test asks for the compiled graph (whether one is cached would
# otherwise depend on which tests ran before).
os.environ.setdefault("PROMPTKIT_COMPILE_DECODE", "off")


@pytest.fixture(scope="session")
def real_lm():
    """The embedded SmolLM2-135M-Instruct on the default (local) backend, loaded once per session."""
    from promptkit import get_lm

    return get_lm()


@pytest.fixture(scope="session")
def hf_lm():
    """The embedded model on plain transformers (the reference)."""
    from promptkit import get_lm

    return get_lm(backend="hf")


@pytest.fixture(scope="session")
def tiny_model():
    return make_tiny_llama()
