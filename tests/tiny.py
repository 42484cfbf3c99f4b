"""Tiny random-weight models for fast engine tests: a llama, and one of every supported family."""

from typing import Any

import torch



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


# A small random model of each family, with the features that set it apart turned on at a scale
# short prompts reach (sliding windows of 8-16 keys, softcapping, q/k norms, mixed layer types):
# what the tests and `bench/gpu_check.py` compare with transformers.
_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 16}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 12,
                                                  "max_window_layers": 1}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "sliding_window": 12,
                                                     "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0,
                                                     "query_pre_attn_scalar": 16}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16, "sliding_window": 8,
                                                              "layer_types": ["sliding_attention", "full_attention"],
                                                              "query_pre_attn_scalar": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"sliding_window": 16, "pad_token_id": 0}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 512}),
}


def make_tiny(family: str, vocab: int = 512, seed: int = 0) -> Any:
    """A small random-weight model of ``family`` (a key of :data:`FAMILIES`), the same for the same seed."""
    import transformers

    config_name, model_name, extra = FAMILIES[family]
    kw = {**({} if family == "gpt2" else _SMALL), **extra}
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(vocab_size=vocab, **kw)).eval()
    with torch.no_grad():  # norms away from their initial constants, so that every part matters
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.normal_(0.0 if family.startswith("gemma") else 1.0, 0.2)  # gemma norms scale by 1 + w
    model.generation_config.pad_token_id = 0
    return model
