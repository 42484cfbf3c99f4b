"""Shared fixtures: a tiny random-weight llama for fast engine tests, the real SmolLM2 for integration."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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


def make_tiny_llama(seed: int = 0, layers: int = 2, vocab: int = 512):
    """A small random-weight llama plus the real SmolLM2 tokenizer cut to nothing special."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      rope_theta=10000.0, tie_word_embeddings=True, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_model():
    return make_tiny_llama()
