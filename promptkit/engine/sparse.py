"""Sparse prefill: per-head block-sparse attention for long prompts.

Most of a long prompt's attention mass sits in few key blocks. Following
FlexPrefill (Lai et al., 2025) and MInference (Jiang et al., 2024), each head's
pattern is estimated from the last block of queries:

* the block-pooled estimate (mean-pooled queries and keys) is compared with the
  true attention of that query block (square-root Jensen-Shannon divergence);
  when they agree (< ``tau``) every query block keeps the fewest key blocks
  whose pooled-score softmax mass reaches ``gamma`` (query-aware);
* otherwise the head gets a vertical-slash pattern: the key columns and the
  diagonals that carry ``gamma`` of the last queries' attention.

Sink, local-window and diagonal blocks are always kept. The selection runs
through ``flex_attention`` with a ``BlockMask`` (compiled: inductor on CPU,
Triton on CUDA) or through a plain-torch block gather
(both in :mod:`promptkit.engine.attention.block_sparse`); the selection itself
is :mod:`promptkit.engine.sparse_select`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .sparse_select import causal_blocks, select_blocks

Pattern = Literal["query_aware", "vertical_slash", "a_shape", "dense"]


class SparseConfig(BaseModel):
    """Settings of sparse prefill (per model)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    pattern: Literal["flex", "a_shape"] = "flex"  # flex: query-aware FlexPrefill; a_shape: sink + window
    gamma: float = Field(0.8, gt=0.0, le=1.0, description="attention mass each query block keeps (FlexPrefill "
                         "uses 0.9; with SmolLM2-135M, 0.8 kept needle accuracy at the dense level)")
    tau: float = Field(0.1, ge=0.0, description="sqrt-JS threshold: below it, query-aware selection")
    block_size: int = Field(64, ge=16, description="tokens per block (a multiple of 16)")
    min_length: int = Field(4096, ge=0, description="key length below which attention stays dense (on CPU "
                            "sparse prefill measured slower than dense at 2k tokens)")
    sink_blocks: int = Field(1, ge=0)
    local_blocks: int = Field(2, ge=0, description="blocks kept before the diagonal (sliding window)")
    min_budget: int = Field(256, ge=0, description="tokens: least keys (or lines) a query block keeps")
    dense_last_tokens: int = Field(64, ge=0, description="the last query tokens (the question, the next token) "
                                   "attend to every key (whole blocks: at least this many)")
    max_budget: int | None = Field(None, ge=1, description="tokens: most keys (or lines) a query block keeps")
    max_density: float | None = Field(None, gt=0.0, le=1.0, description="a call whose selection keeps more than "
                                      "this share of the causal blocks runs dense instead; None: 0.5 on CPU "
                                      "(a block costs the compiled kernel about 1.4x what it costs dense "
                                      "SDPA), 0.8 elsewhere")
    backend: Literal["auto", "flex", "gather"] = "auto"
    bucket: int = Field(512, ge=16, description="pad lengths to a multiple of this (fewer recompiles)")

    @model_validator(mode="after")
    def _check(self) -> SparseConfig:
        if self.block_size % 16:
            raise ValueError(f"block_size must be a multiple of 16, got {self.block_size}")
        if self.bucket % self.block_size:
            raise ValueError(f"bucket ({self.bucket}) must be a multiple of block_size ({self.block_size})")
        if self.max_budget is not None and self.max_budget < self.min_budget:
            raise ValueError(f"max_budget ({self.max_budget}) is below min_budget ({self.min_budget})")
        return self


@dataclass
class SparseInfo:
    """What one sparse attention call did: per-head density and pattern."""

    density: torch.Tensor  # [H] fraction of causal key blocks computed
    patterns: list[Pattern]
    block_mask: torch.Tensor | None = None  # [H, nq, nk] bool, in padded-block coordinates
    backend: str = "dense"

    @property
    def sparsity(self) -> float:
        """Fraction of causal attention blocks skipped, averaged over heads."""
        return float(1.0 - self.density.float().mean())


class SparseStats:
    """Per-layer sparsity of the long prefills seen so far (read by the engine and the benchmarks):
    running sums, so a server that prefills for days holds a few numbers per layer."""

    def __init__(self) -> None:
        self.calls = 0
        self._sums: dict[int, list[float]] = {}  # layer -> [sum of sparsities, calls]
        self.patterns: dict[str, int] = {}

    def record(self, layer: int, info: SparseInfo) -> None:
        self.calls += 1
        acc = self._sums.setdefault(layer, [0.0, 0])
        acc[0] += info.sparsity
        acc[1] += 1
        for p in info.patterns:
            self.patterns[p] = self.patterns.get(p, 0) + 1

    def layer_sparsity(self) -> dict[int, float]:
        """Mean sparsity per layer."""
        return {k: total / n for k, (total, n) in sorted(self._sums.items())}

    def mean_sparsity(self) -> float:
        total, n = sum(v[0] for v in self._sums.values()), sum(v[1] for v in self._sums.values())
        return total / n if n else 0.0

    def reset(self) -> None:
        self.calls = 0
        self._sums.clear()
        self.patterns.clear()


# ---------------------------------------------------------------------------------------------
# Dense reference


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Causal SDPA where the ``Lq`` queries are the last ``Lq`` of the ``Lk`` key positions."""
    lq, lk = q.shape[-2], k.shape[-2]
    gqa = q.shape[1] != k.shape[1]
    if lq == lk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    pos = torch.arange(lk - lq, lk, device=q.device)
    mask = torch.arange(lk, device=q.device)[None, :] <= pos[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


_flex_broken: str | None = None  # why compiled flex_attention failed here, once it has


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [1, heads, length, dim]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[0] != 1 or k.shape[0] != 1:
        raise ValueError(f"sparse attention runs one sequence at a time; got batch {q.shape[0]}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of KV heads ({k.shape[1]})")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"head dims differ: q {q.shape[-1]}, k {k.shape[-1]}")
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"more queries ({q.shape[2]}) than keys ({k.shape[2]}): the queries must be "
                         "the last positions of the keys")


def _dense_info(h: int, device: torch.device) -> SparseInfo:
    return SparseInfo(density=torch.ones(h, device=device), patterns=["dense"] * h)


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: SparseConfig,
                     scale: float | None = None) -> tuple[torch.Tensor, SparseInfo]:
    """Causal block-sparse attention for a long prefill.

    ``q`` [1, H, Lq, D]; ``k``, ``v`` [1, Hkv, Lk, D] with ``Lk >= Lq`` (GQA: H a multiple of
    Hkv). The queries are the last ``Lq`` of the ``Lk`` key positions (the first ``Lk - Lq``
    keys are a cached prefix), so this also serves chunked prefill. Below
    ``config.min_length`` keys it is plain causal SDPA. Returns out [1, H, Lq, D] and a
    :class:`SparseInfo` (per-head density and pattern).
    """
    global _flex_broken
    _check(q, k, v)
    h, lq, d = q.shape[1], q.shape[2], q.shape[3]
    lk = k.shape[2]
    scale = scale if scale is not None else d**-0.5
    if not config.enabled or lk < config.min_length:
        return dense_attention(q, k, v, scale), _dense_info(h, q.device)

    from .attention.block_sparse import flex_block_sparse, gather_block_sparse

    bs = config.block_size
    # Pad keys (and queries, equally) at the end to a bucket multiple: fewer shapes to compile,
    # and causality hides the padding from every real query. Pad queries in front so that the
    # query blocks line up with the key blocks.
    lk_pad = -(-lk // config.bucket) * config.bucket
    off = lk - lq
    front = off % bs
    off_b = (off - front) // bs
    qp = F.pad(q, (0, 0, front, lk_pad - lk))
    kp, vp = F.pad(k, (0, 0, 0, lk_pad - lk)), F.pad(v, (0, 0, 0, lk_pad - lk))
    q_end = front + lq
    nq_real = -(-q_end // bs)
    keep, patterns = select_blocks(qp[0], kp[0], config, scale, off_b, q_end)
    causal = causal_blocks(nq_real, keep.shape[-1], off_b, q.device)
    if config.dense_last_tokens:  # the rows that ask the question and predict the next token see everything
        first = max(0, q_end - config.dense_last_tokens) // bs
        keep[:, first:nq_real] = causal[first:]
    keep[:, nq_real:] = False  # padding rows compute nothing

    density = keep[:, :nq_real].sum((1, 2)).float() / causal.sum().float()
    max_density = config.max_density or (0.5 if q.device.type == "cpu" else 0.8)
    if float(density.mean()) > max_density:  # too little to skip: the sparse kernel would not pay
        return dense_attention(q, k, v, scale), _dense_info(h, q.device)
    backend = config.backend
    if backend == "auto":
        backend = "gather" if _flex_broken else "flex"
    out = None
    if backend == "flex":
        try:
            out = flex_block_sparse(qp, kp, vp, keep, off_b, bs, scale)
        except Exception as e:  # compilation can be unavailable (no compiler, old torch): fall back
            if config.backend == "flex":
                raise
            _flex_broken = f"{type(e).__name__}: {e}"
            backend = "gather"
    if out is None:
        out = gather_block_sparse(qp, kp, vp, keep, off_b, bs, scale, n_blocks=nq_real)
    out = out[:, :, front:q_end]
    return out, SparseInfo(density=density, patterns=patterns, block_mask=keep, backend=backend)


# ---------------------------------------------------------------------------------------------
# transformers integration


def register_hf_attention(config: SparseConfig, name: str = "promptkit_sparse",
                          stats: SparseStats | None = None) -> SparseStats:
    """Register sparse prefill with transformers' ``AttentionInterface`` under ``name``.

    A model switched to it (``model.set_attn_implementation(name)``) runs sparse attention for
    long inputs and dense causal SDPA for short ones and for decode. One unpadded sequence per
    call (transformers builds no mask for custom implementations). Returns the
    :class:`SparseStats` that collects the per-layer sparsity.
    """
    from transformers import AttentionInterface

    stats = stats if stats is not None else SparseStats()

    def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                  **kwargs) -> tuple[torch.Tensor, None]:
        if query.shape[2] == 1 or key.shape[2] < config.min_length or not config.enabled:
            out = dense_attention(query, key, value, scaling)
        else:
            out, info = sparse_attention(query, key, value, config, scale=scaling)
            stats.record(getattr(module, "layer_idx", -1), info)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(name, attention)
    return stats
