"""The model families the engine runs exactly, and the refusal of everything else.

The engine replaces a model's attention with its own (packed, cached, paged
over the KV pool), so it is exact only for architectures whose attention it
reproduces: causal self-attention through transformers' attention interface,
with RoPE or learned positions that depend on the position alone, optionally
a sliding window and softcapped scores. Anything else is refused at load with
the reason, never run with a silently different result; ``backend="hf"``
runs any model transformers can.
"""

from __future__ import annotations

from typing import Any

# model_type -> what the engine reproduces for it (tested token for token against transformers)
SUPPORTED: dict[str, str] = {
    "llama": "RoPE (incl. llama3 scaling), GQA",
    "mistral": "RoPE, GQA, sliding window",
    "qwen2": "RoPE, GQA, attention bias, sliding window on some layers",
    "qwen3": "RoPE, GQA, q/k norms, sliding window on some layers",
    "gemma2": "RoPE, GQA, sliding and global layers, attention and final-logit softcapping",
    "gemma3_text": "RoPE (local and global bases), GQA, q/k norms, sliding and global layers",
    "phi3": "RoPE, fused qkv, sliding window",
    "gpt2": "learned absolute positions, multi-head attention",
}

# RoPE variants whose frequencies depend on the longest sequence in the batch, not on the
# position alone: a packed batch would change every request's result.
_BATCH_DEPENDENT_ROPE = {"dynamic", "longrope"}


class UnsupportedModelError(ValueError):
    """A model the engine cannot run exactly."""


def text_config(config: Any) -> Any:
    """The decoder's config (a multimodal model's text part; else the config itself)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def check_supported(config: Any) -> None:
    """Raise :class:`UnsupportedModelError` naming the model type and the feature the engine
    does not reproduce; return quietly for a supported model."""
    cfg = text_config(config)
    kind = getattr(cfg, "model_type", "?")

    def refuse(feature: str) -> None:
        raise UnsupportedModelError(
            f"the promptkit engine cannot run model type {kind!r} exactly: {feature}. "
            "backend='hf' (plain transformers) runs it")

    if kind not in SUPPORTED:
        refuse(f"its architecture is not among those the engine reproduces ({', '.join(sorted(SUPPORTED))})")
    rope = getattr(cfg, "rope_scaling", None) or getattr(cfg, "rope_parameters", None) or {}
    for params in (rope.values() if rope and all(isinstance(v, dict) for v in rope.values()) else [rope]):
        kind_of_rope = (params or {}).get("rope_type") or (params or {}).get("type")
        if kind_of_rope in _BATCH_DEPENDENT_ROPE:
            refuse(f"{kind_of_rope!r} RoPE scaling depends on the sequence length of the whole batch")
    if getattr(cfg, "attention_chunk_size", None):
        refuse("chunked local attention (attention_chunk_size)")
    if getattr(cfg, "use_bidirectional_attention", False):
        refuse("bidirectional attention")
    if getattr(cfg, "add_cross_attention", False):
        refuse("cross-attention")
