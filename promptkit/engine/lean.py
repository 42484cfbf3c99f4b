"""A lean forward for llama-architecture models: the same arithmetic as transformers, fewer operations.

A decode step is small matrix work wrapped in thousands of tiny operations and
Python calls, so on a CPU its time goes to overhead. This forward binds each
layer's weights once, fused where that changes no number (q, k and v in one
matrix, gate and up in another), uses the fused RMSNorm, applies RoPE to
queries and keys together, and calls the engine's attention directly: about
fifteen operations a layer instead of a few hundred, with results equal to
transformers' ``LlamaForCausalLM`` bit for bit in float32.

Used for ``llama`` and ``mistral`` models whose projections are plain linear
layers; any other model runs through its own transformers modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .attention import engine_attention

LEAN_FAMILIES = {"llama", "mistral"}


@dataclass
class _Layer:
    attn: Any  # the transformers attention module (its layer_idx and scaling)
    ln1: torch.Tensor
    qkv: torch.Tensor  # [(H + 2 Hkv) * D, hidden]
    qkv_bias: torch.Tensor | None
    o: Any  # o_proj module
    ln2: torch.Tensor
    gate_up: torch.Tensor  # [2 * I, hidden]
    down: Any  # down_proj module
    eps: float


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
    linear = [m for layer in layers for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                                              layer.mlp.gate_proj, layer.mlp.up_proj)]
    return all(type(m) is torch.nn.Linear for m in linear)


class LeanForward:
    """Callable like the model for the engine: ``(input_ids [1, T], position_ids [1, T], keep [R])``
    -> logits ``[1, R, V]`` of the rows in ``keep``."""

    def __init__(self, model: Any) -> None:
        base = model.model
        self.model, self.base = model, base
        self.heads = model.config.num_attention_heads
        self.kv_heads = getattr(model.config, "num_key_value_heads", None) or self.heads
        self.window = getattr(model.config, "sliding_window", None) if model.config.model_type == "mistral" else None
        self.layers = [self._bind(layer) for layer in base.layers]

    @staticmethod
    def _bind(layer: Any) -> _Layer:
        a, m = layer.self_attn, layer.mlp
        qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
        bias = None
        if a.q_proj.bias is not None:
            bias = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
        return _Layer(a, layer.input_layernorm.weight, qkv, bias, a.o_proj, layer.post_attention_layernorm.weight,
                      torch.cat([m.gate_proj.weight, m.up_proj.weight]), m.down_proj,
                      layer.input_layernorm.variance_epsilon)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        h = self.base.embed_tokens(input_ids)[0]  # [T, hidden]
        cos, sin = self.base.rotary_emb(h[None], position_ids)
        cos, sin = cos[0, :, None], sin[0, :, None]  # [T, 1, D]: broadcast over heads
        hq, hkv = self.heads, self.kv_heads
        dim = h.shape[-1]
        for lay in self.layers:
            x = F.rms_norm(h, (dim,), lay.ln1, lay.eps)
            qkv = F.linear(x, lay.qkv, lay.qkv_bias).view(h.shape[0], hq + 2 * hkv, -1)  # [T, heads, D]
            qk, v = qkv[:, : hq + hkv], qkv[:, hq + hkv :]
            half = qk.shape[-1] // 2
            qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin
            out, _ = engine_attention(lay.attn, qk[:, :hq].transpose(0, 1)[None], qk[:, hq:].transpose(0, 1)[None],
                                      v.transpose(0, 1)[None], None, scaling=lay.attn.scaling,
                                      sliding_window=self.window)
            h = h + lay.o(out[0].reshape(h.shape[0], -1))
            x = F.rms_norm(h, (dim,), lay.ln2, lay.eps)
            gate, up = F.linear(x, lay.gate_up).chunk(2, dim=-1)
            h = h + lay.down(F.silu(gate) * up)
        h = self.base.norm(h[keep])
        return self.model.lm_head(h)[None]
