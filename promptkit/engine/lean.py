"""A lean forward for llama-architecture models: the same arithmetic as transformers, fewer operations.

A decode step is small matrix work wrapped in thousands of tiny operations and
Python calls, so on a CPU its time goes to overhead. This forward binds each
layer's weights once, fused where that changes no number (q, k and v in one
matrix, gate and up in another), uses the fused RMSNorm, applies RoPE to
queries and keys together, and calls the engine's attention directly: about
fifteen operations a layer instead of a few hundred, with results equal to
transformers' ``LlamaForCausalLM`` bit for bit in float32.

Used for ``llama`` and ``mistral`` models in any weight format (the fused
projections keep the format of the ones they join); any other model runs
through its own transformers modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .attention import engine_attention
from .weights import fuse_linears

LEAN_FAMILIES = {"llama", "mistral"}


@dataclass
class _Layer:
    attn: Any  # the transformers attention module (its layer_idx and scaling)
    ln1: torch.Tensor
    qkv: Any  # q, k and v projections as one module: [(H + 2 Hkv) * D] outputs
    o: Any  # o_proj
    ln2: torch.Tensor
    gate_up: Any  # gate and up projections as one module: [2 * I] outputs
    down: Any  # down_proj
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
    return all(fuse_linears(group) is not None for layer in layers[:1] for group in _groups(layer))


def _groups(layer: Any) -> tuple[list, list]:
    a, m = layer.self_attn, layer.mlp
    return [a.q_proj, a.k_proj, a.v_proj], [m.gate_proj, m.up_proj]


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
        qkv, gate_up = (fuse_linears(group) for group in _groups(layer))
        return _Layer(layer.self_attn, layer.input_layernorm.weight, qkv, layer.self_attn.o_proj,
                      layer.post_attention_layernorm.weight, gate_up, layer.mlp.down_proj,
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
            qkv = lay.qkv(x).view(h.shape[0], hq + 2 * hkv, -1)  # [T, heads, D]
            qk, v = qkv[:, : hq + hkv], qkv[:, hq + hkv :]
            half = qk.shape[-1] // 2
            qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin
            out, _ = engine_attention(lay.attn, qk[:, :hq].transpose(0, 1)[None], qk[:, hq:].transpose(0, 1)[None],
                                      v.transpose(0, 1)[None], None, scaling=lay.attn.scaling,
                                      sliding_window=self.window)
            h = h + lay.o(out[0].reshape(h.shape[0], -1))
            x = F.rms_norm(h, (dim,), lay.ln2, lay.eps)
            gate, up = lay.gate_up(x).chunk(2, dim=-1)
            h = h + lay.down(F.silu(gate) * up)
        h = self.base.norm(h[keep])
        return self.model.lm_head(h)[None]
