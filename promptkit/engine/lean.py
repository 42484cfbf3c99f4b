"""A lean forward for llama-architecture models: the same arithmetic as transformers, fewer operations.

A decode step is small matrix work wrapped in thousands of tiny operations and
Python calls, so on a CPU its time goes to overhead. This forward binds each
layer's weights once (:mod:`.llama`), fused where that changes no number (q, k
and v in one matrix, gate and up in another), uses the fused RMSNorm, applies
RoPE to queries and keys together, and calls the engine's attention backend
directly: about fifteen operations a layer instead of a few hundred, with
results equal to transformers' ``LlamaForCausalLM`` bit for bit in float32.
RoPE's cosines and sines come from a table of the model's own values, and a
small forward (a decode step) calls each projection's kernel directly.

Used for ``llama`` and ``mistral`` models in any weight format (the fused
projections keep the format of the ones they join); any other model runs
through its own transformers modules.
"""

from __future__ import annotations

from typing import Any

import torch

from .llama import LayerWeights, layer, projection
from .weights import DENSE_ROWS, fuse_linears

LEAN_FAMILIES = {"llama", "mistral"}


def _signed(sin: torch.Tensor) -> torch.Tensor:
    """``sin`` [..., D] with its first half negated."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def supports(model: Any) -> bool:
    """Whether :class:`LeanForward` reproduces ``model`` (a llama-style stack of plain linear layers)."""
    cfg = model.config
    if getattr(cfg, "model_type", None) not in LEAN_FAMILIES or getattr(cfg, "hidden_act", "silu") != "silu":
        return False
    if getattr(cfg, "mlp_bias", False) or getattr(cfg, "pretraining_tp", 1) != 1:
        return False
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not layers:
        return False
    return all(fuse_linears(group) is not None for lay in layers[:1] for group in _groups(lay))


def _groups(lay: Any) -> tuple[list, list]:
    a, m = lay.self_attn, lay.mlp
    return [a.q_proj, a.k_proj, a.v_proj], [m.gate_proj, m.up_proj]


def _bind(lay: Any) -> LayerWeights:
    qkv, gate_up = (fuse_linears(group) for group in _groups(lay))
    return LayerWeights(lay.input_layernorm.weight, projection(qkv), projection(lay.self_attn.o_proj),
                        lay.post_attention_layernorm.weight, projection(gate_up), projection(lay.mlp.down_proj),
                        lay.input_layernorm.variance_epsilon, lay.self_attn.scaling)


class LeanForward:
    """Callable like the model for the engine: ``(input_ids [1, T], position_ids [1, T], keep [R],
    backend)`` -> logits ``[1, R, V]`` of the rows in ``keep``."""

    def __init__(self, model: Any) -> None:
        base = model.model
        self.model, self.base = model, base
        self.heads = model.config.num_attention_heads
        self.kv_heads = getattr(model.config, "num_key_value_heads", None) or self.heads
        self.window = getattr(model.config, "sliding_window", None) if model.config.model_type == "mistral" else None
        self.layers = [_bind(lay) for lay in base.layers]
        # A table serves: RoPE whose frequencies depend on the sequence length is refused (families.py).
        self._cos = self._sin = None  # [positions, D]; sin negated on its first half (see rope)

    def rope(self, h: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin [T, 1, D] for ``position_ids`` [1, T]: ``x * cos + swap(x) * sin``, with
        ``swap`` exchanging the halves of x, is transformers' ``x * cos + rotate_half(x) * sin``
        (negating x or the sine gives the same float)."""
        needed = int(position_ids.max()) + 1
        if self._cos is None or self._cos.shape[0] < needed or self._cos.dtype != h.dtype:
            n = max(needed, 2 * (0 if self._cos is None else self._cos.shape[0]), 4096)
            cos, sin = self.base.rotary_emb(h[None], torch.arange(n, device=h.device)[None])
            self._cos, self._sin = cos[0], _signed(sin[0])
        pos = position_ids[0]
        return self._cos[pos, None], self._sin[pos, None]

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, keep: torch.Tensor, backend: Any,
                 layers: int | None = None) -> torch.Tensor | None:
        """Logits of the rows in ``keep``; with ``layers``, only the first that many layers run and
        nothing is returned (a probe's forward: the backend records what it needs)."""
        h = self.base.embed_tokens(input_ids)[0]  # [T, hidden]
        cos, sin = self.rope(h, position_ids)  # [T, 1, D]: broadcast over heads
        wide = h.shape[0] >= DENSE_ROWS
        for i, w in enumerate(self.layers[:layers]):
            def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: int = i, w: LayerWeights = w):
                return backend.forward(i, q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), w.scaling,
                                       self.window)

            h = layer(h, cos, sin, w, self.heads, self.kv_heads, attend, wide)
        if layers is not None:
            return None
        return self.model.lm_head(self.base.norm(h[keep]))[None]
