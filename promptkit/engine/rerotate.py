"""Moving stored keys to other positions: RoPE re-rotation by a position delta.

The pool holds keys after RoPE: key ``k`` of position ``p`` is stored as
``R(p) k``, where ``R`` turns each pair of dimensions (``i``, ``i + rot/2``)
by ``p * inv_freq[i]``. Rotations compose, ``R(d) R(p) = R(p + d)``, and a
chunk's hidden states do not depend on where it starts (attention sees only
relative positions), so the keys of a chunk encoded at ``p`` and turned by
``d`` are the keys it has at ``p + d``. Values carry no position.

That holds only where RoPE is a pure rotation by position: the engine reads
each layer's frequencies from the model's own rotary module (gemma3's local
and global layers have their own), checks that the module's cos/sin are that
rotation (any attention scaling aside), and refuses models without RoPE or
with a variant that is not.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from .families import text_config


class ReuseUnsupportedError(ValueError):
    """A model whose stored KV cannot be moved to another position exactly."""


# Families whose attention applies RoPE as ``k * cos + rotate_half(k) * sin`` on the first
# ``rot`` dimensions (tested: a chunk moved by re-rotation equals the chunk encoded there).
ROTATE_HALF_FAMILIES = {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"}
_CHECK_POSITIONS = [0, 1, 5, 100, 511]


class Rerotator:
    """Per-layer RoPE frequencies of a model, and the rotation of stored keys by a delta."""

    def __init__(self, inv_freq: list[torch.Tensor]) -> None:
        # layers sharing frequencies are turned together
        groups: dict[tuple, tuple[list[int], torch.Tensor]] = {}
        for layer, f in enumerate(inv_freq):
            groups.setdefault(tuple(f.tolist()), ([], f))[0].append(layer)
        self.groups = [(torch.tensor(layers), f.double()) for layers, f in groups.values()]

    def rotate(self, keys: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``keys`` [layers, kv_heads, n, head_dim] turned by ``delta`` [n] positions (a new tensor)."""
        out = keys.clone()
        for layers, inv_freq in self.groups:
            half = inv_freq.numel()
            angle = delta.to(inv_freq.device, torch.float64)[:, None] * inv_freq[None, :]  # [n, half]
            cos, sin = (angle.cos().to(torch.float32), angle.sin().to(torch.float32))
            layers = layers.to(keys.device)
            k = keys[layers].float()  # [g, kv_heads, n, head_dim]
            x1, x2 = k[..., :half], k[..., half : 2 * half]
            c, s = cos.to(keys.device), sin.to(keys.device)
            out[layers, ..., :half] = (x1 * c - x2 * s).to(keys.dtype)
            out[layers, ..., half : 2 * half] = (x2 * c + x1 * s).to(keys.dtype)
        return out


def rerotator_for(model: Any) -> Rerotator:
    """The model's :class:`Rerotator`, or :class:`ReuseUnsupportedError` saying why there is none."""
    cfg = text_config(model.config)
    kind = getattr(cfg, "model_type", "?")

    def refuse(why: str) -> ReuseUnsupportedError:
        return ReuseUnsupportedError(
            f"KV reuse (modes blend, sink and none) cannot move stored keys for model type {kind!r}: {why}; "
            "kv_reuse='full' (plain prefill) works for every model")

    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    rotary = getattr(decoder, "rotary_emb", None)
    if rotary is None:
        raise refuse("it has no rotary position embedding (positions are learned or absolute)")
    if kind not in ROTATE_HALF_FAMILIES:
        raise refuse(f"re-rotation is verified only for {', '.join(sorted(ROTATE_HALF_FAMILIES))}")
    if any(n.startswith("rotary_emb") and n != "rotary_emb" for n, _ in decoder.named_children()):
        raise refuse("it has more than one rotary module")
    per_type = "layer_type" in inspect.signature(rotary.forward).parameters
    layer_types = getattr(cfg, "layer_types", None) or []
    freqs = []
    for layer in range(cfg.num_hidden_layers):
        kind_of_layer = layer_types[layer] if per_type and layer < len(layer_types) else None
        name = f"{kind_of_layer}_inv_freq" if per_type else "inv_freq"
        inv_freq = getattr(rotary, name, None)
        if inv_freq is None:
            raise refuse(f"its rotary module has no {name}")
        _check_pure_rotation(rotary, inv_freq, kind_of_layer, refuse)
        freqs.append(inv_freq.detach().float().cpu())
    return Rerotator(freqs)


def _check_pure_rotation(rotary: Any, inv_freq: torch.Tensor, layer_type: str | None, refuse: Any) -> None:
    """The rotary module's cos/sin must be ``scale * cos/sin(p * inv_freq)``, laid out as two
    equal halves (rotate_half); otherwise a delta rotation would not be exact."""
    pos = torch.tensor([_CHECK_POSITIONS], device=inv_freq.device)
    x = torch.zeros(1, dtype=torch.float32, device=inv_freq.device)
    with torch.no_grad():
        cos, sin = rotary(x, pos, layer_type) if layer_type is not None else rotary(x, pos)
    cos, sin = cos[0].float().cpu(), sin[0].float().cpu()
    half = inv_freq.numel()
    if cos.shape[-1] != 2 * half:
        raise refuse(f"its rotary tables have {cos.shape[-1]} dimensions for {half} frequencies")
    scale = cos[0, 0]
    angle = torch.tensor(_CHECK_POSITIONS, dtype=torch.float64)[:, None] * inv_freq.double().cpu()[None, :]
    want_cos = torch.cat([angle.cos(), angle.cos()], -1).float() * scale
    want_sin = torch.cat([angle.sin(), angle.sin()], -1).float() * scale
    tol = 1e-4 * max(1.0, float(scale.abs()))
    if not (torch.allclose(cos, want_cos, atol=tol) and torch.allclose(sin, want_sin, atol=tol)):
        raise refuse("its RoPE variant is not a pure rotation by position, so a delta rotation is not exact")
