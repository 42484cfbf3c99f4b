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


def prompts(n: int, lo: int = 5, hi: int = 60, seed: int = 1, shared: int = 0, vocab: int = 512) -> list[list[int]]:
    """``n`` random token prompts of ``lo``..``hi`` tokens, the first ``shared`` of them common to all."""
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(1, vocab, (shared,), generator=g).tolist()
    return [head + torch.randint(1, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@torch.inference_mode()
def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """transformers' greedy continuation of ``ids``: the reference the engine must equal."""
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                         attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()
