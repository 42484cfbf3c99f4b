"""Tiny random-weight models for fast engine tests: a llama, and one of every supported family."""

import torch

from promptkit.engine.families import TINY as FAMILIES  # noqa: F401  (family name -> config)
from promptkit.engine.families import tiny_model as make_tiny  # noqa: F401


def make_tiny_llama(seed: int = 0, layers: int = 2, vocab: int = 512):
    """A small random-weight llama (seeded, so two calls give the same weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      rope_theta=10000.0, tie_word_embeddings=True, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()
