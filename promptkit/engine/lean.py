"""A lean forward for llama-architecture models: the same arithmetic as transformers, fewer operations.

A decode step is small matrix work wrapped in thousands of tiny operations and
Python calls, so on a CPU its time goes to overhead. This forward binds each
layer's weights once, fused where that changes no number (q, k and v in one
matrix, gate and up in another), uses the fused RMSNorm, applies RoPE to
queries and keys together, and calls the engine's attention directly: about
fifteen operations a layer instead of a few hundred, with results equal to
transformers' ``LlamaForCausalLM`` bit for bit in float32. RoPE's cosines and
sines come from a table of the model's own values, and a small forward (a
decode step) calls each projection's kernel directly.

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
from .weights import DENSE_ROWS, fuse_linears, row_kernel

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
    small: tuple  # qkv, o, gate_up and down as direct kernel calls, for fewer than DENSE_ROWS rows


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
        rope_type = getattr(base.rotary_emb, "rope_type", "default")
        # A RoPE whose frequencies depend on the sequence length is computed per forward, not tabled.
        self.rope_table = "dynamic" not in rope_type and rope_type != "longrope"
        self._cos = self._sin = None  # [positions, D]; sin negated on its first half (see _rope)

    @staticmethod
    def _bind(layer: Any) -> _Layer:
        qkv, gate_up = (fuse_linears(group) for group in _groups(layer))
        o, down = layer.self_attn.o_proj, layer.mlp.down_proj
        return _Layer(layer.self_attn, layer.input_layernorm.weight, qkv, o, layer.post_attention_layernorm.weight,
                      gate_up, down, layer.input_layernorm.variance_epsilon,
                      tuple(row_kernel(m) for m in (qkv, o, gate_up, down)))

    def _rope(self, h: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin [T, 1, D] for ``position_ids`` [1, T]: ``x * cos + swap(x) * sin``, with
        ``swap`` exchanging the halves of x, is transformers' ``x * cos + rotate_half(x) * sin``
        (negating x or the sine gives the same float)."""
        if not self.rope_table:
            cos, sin = self.base.rotary_emb(h[None], position_ids)
            return cos[0, :, None], _signed(sin[0])[:, None]
        needed = int(position_ids.max()) + 1
        if self._cos is None or self._cos.shape[0] < needed or self._cos.dtype != h.dtype:
            n = max(needed, 2 * (0 if self._cos is None else self._cos.shape[0]), 4096)
            cos, sin = self.base.rotary_emb(h[None], torch.arange(n, device=h.device)[None])
            self._cos, self._sin = cos[0], _signed(sin[0])
        pos = position_ids[0]
        return self._cos[pos, None], self._sin[pos, None]

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        h = self.base.embed_tokens(input_ids)[0]  # [T, hidden]
        cos, sin = self._rope(h, position_ids)  # [T, 1, D]: broadcast over heads
        hq, hkv = self.heads, self.kv_heads
        t, dim = h.shape
        small = t < DENSE_ROWS
        for lay in self.layers:
            qkv_mm, o_mm, gate_up_mm, down_mm = lay.small if small else (lay.qkv, lay.o, lay.gate_up, lay.down)
            x = F.rms_norm(h, (dim,), lay.ln1, lay.eps)
            qkv = qkv_mm(x).view(t, hq + 2 * hkv, 2, -1)  # [T, heads, 2 halves, D / 2]
            qk, v = qkv[:, : hq + hkv], qkv[:, hq + hkv :].flatten(2)
            qk = qk.flatten(2) * cos + qk.flip(2).flatten(2) * sin
            out, _ = engine_attention(lay.attn, qk[:, :hq].transpose(0, 1)[None], qk[:, hq:].transpose(0, 1)[None],
                                      v.transpose(0, 1)[None], None, scaling=lay.attn.scaling,
                                      sliding_window=self.window)
            h = h + o_mm(out[0].reshape(t, -1))
            x = F.rms_norm(h, (dim,), lay.ln2, lay.eps)
            gate, up = gate_up_mm(x).chunk(2, dim=-1)
            h = h + down_mm(F.silu(gate) * up)
        h = self.base.norm(h[keep])
        return self.model.lm_head(h)[None]
