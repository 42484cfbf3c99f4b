"""Sparse prefill: block selection, kernels against dense attention, planted patterns, errors."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from promptkit.engine.sparse import SparseConfig, dense_attention, sparse_attention

BS = 64


def cfg(**kw) -> SparseConfig:
    base = dict(block_size=BS, bucket=256, min_length=256, min_budget=0, backend="gather", dense_last_tokens=0,
                max_density=1.0)
    return SparseConfig(**(base | kw))


def qkv(h=4, hkv=2, lq=512, lk=512, d=16, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, h, lq, d, generator=g) * scale
    k = torch.randn(1, hkv, lk, d, generator=g) * scale
    v = torch.randn(1, hkv, lk, d, generator=g)
    return q, k, v


def masked_reference(q, k, v, keep: torch.Tensor, lk: int) -> torch.Tensor:
    """Dense attention restricted to the selected blocks (token mask from the block mask)."""
    lq = q.shape[2]
    off = lk - lq
    front = off % BS
    tok = keep.repeat_interleave(BS, 1).repeat_interleave(BS, 2)  # [H, Lq_pad, Lk_pad]
    qrows = torch.arange(front, front + lq)
    rows = tok[:, qrows, :lk]
    causal = torch.arange(lk)[None, :] <= torch.arange(off, lk)[:, None]
    g = q.shape[1] // k.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=(rows & causal)[None])
    return out


@pytest.mark.parametrize("lq", [512, 200, 1])
def test_gamma_one_equals_dense_gather(lq):
    q, k, v = qkv(lq=lq)
    out, info = sparse_attention(q, k, v, cfg(gamma=1.0))
    assert info.backend == "gather"
    assert torch.allclose(out, dense_attention(q, k, v), atol=1e-5)


def test_flex_kernel_matches_dense_and_selection():
    """One compiled shape (queries are padded to the key length) serves full and chunked prefill."""
    q, k, v = qkv(lq=512)
    out, info = sparse_attention(q, k, v, cfg(gamma=1.0, backend="flex"))
    assert info.backend == "flex" and info.sparsity == pytest.approx(0.0)
    assert torch.allclose(out, dense_attention(q, k, v), atol=1e-4)
    for lq, gamma in ((200, 1.0), (512, 0.5), (130, 0.5)):
        qc = q[:, :, -lq:]
        out, info = sparse_attention(qc, k, v, cfg(gamma=gamma, backend="flex"))
        ref = masked_reference(qc, k, v, info.block_mask, 512)
        assert torch.allclose(out, ref, atol=1e-4), (lq, gamma)
        if gamma == 1.0:
            assert torch.allclose(out, dense_attention(qc, k, v), atol=1e-4)


@pytest.mark.parametrize("lq", [512, 250])
def test_gather_matches_masked_reference_when_sparse(lq):
    q, k, v = qkv(lq=lq, lk=512, seed=3)
    out, info = sparse_attention(q, k, v, cfg(gamma=0.5))
    assert info.sparsity > 0
    assert torch.allclose(out, masked_reference(q, k, v, info.block_mask, 512), atol=1e-5)


@pytest.mark.parametrize("lq", [1024, 300])
def test_always_keeps_sink_window_and_diagonal(lq):
    q, k, v = qkv(lq=lq, lk=1024, seed=1)
    c = cfg(gamma=0.05, sink_blocks=1, local_blocks=2)
    _, info = sparse_attention(q, k, v, c)
    keep = info.block_mask
    off = 1024 - lq
    nq = -(-(off % BS + lq) // BS)
    for i in range(nq):
        diag = off // BS + i
        assert keep[:, i, 0].all()
        assert keep[:, i, max(0, diag - 2) : diag + 1].all()
        assert not keep[:, i, diag + 1 :].any()  # causal
    assert info.sparsity > 0.3


def test_planted_block_cluster_is_recovered_query_aware():
    """Queries of blocks 10-15 all look for key block 3: query-aware selection finds it."""
    h, lk, d = 2, 1024, 16
    q, k, v = qkv(h=h, hkv=h, lq=lk, lk=lk, d=d, seed=2, scale=0.1)
    u = torch.zeros(d)
    u[0] = 6.0
    k[0, :, 3 * BS : 4 * BS] += u
    q[0, :, 10 * BS : 16 * BS] += u
    q[0, :, -BS:] += u  # the last block (the estimator) looks there too
    out, info = sparse_attention(q, k, v, cfg(gamma=0.9, local_blocks=1))
    assert info.patterns == ["query_aware"] * h
    keep = info.block_mask
    assert keep[:, 10:16, 3].all()
    # the planted rows keep only the cluster plus sink, window and diagonal
    assert (keep[:, 10:16].sum(-1) <= 4).all()
    assert torch.allclose(out, masked_reference(q, k, v, keep, lk), atol=1e-5)


def test_planted_vertical_column_is_recovered():
    """One key every query attends to (an attention sink in mid-text): a vertical line."""
    h, lk, d = 2, 1024, 16
    q, k, v = qkv(h=h, hkv=h, lq=lk, lk=lk, d=d, seed=4, scale=0.1)
    u = torch.zeros(d)
    u[0] = 16.0
    col = 5 * BS + 7
    k[0, :, col] += u
    q[0, :] += u / 4
    out, info = sparse_attention(q, k, v, cfg(gamma=0.9, sink_blocks=0, local_blocks=0))
    assert info.patterns == ["vertical_slash"] * h
    keep = info.block_mask
    assert keep[:, 5:, 5].all()  # every query block at or after the column keeps its block
    assert info.sparsity > 0.5
    dense = dense_attention(q, k, v)  # queries after the column attend almost only to it
    assert (out - dense)[:, :, 6 * BS :].abs().max() < 0.05


def test_a_shape_is_sink_plus_window():
    q, k, v = qkv(lq=1024, lk=1024, seed=5)
    out, info = sparse_attention(q, k, v, cfg(pattern="a_shape", sink_blocks=1, local_blocks=3))
    keep = info.block_mask[0]
    i = torch.arange(16)[:, None]
    j = torch.arange(16)[None, :]
    expect = ((j == 0) | ((j <= i) & (j >= i - 3))) & (j <= i)
    assert torch.equal(keep, expect) and all(p == "a_shape" for p in info.patterns)
    assert torch.allclose(out, masked_reference(q, k, v, info.block_mask, 1024), atol=1e-5)


def test_last_query_tokens_attend_densely():
    q, k, v = qkv(lq=1024, lk=1024, seed=5)
    out, info = sparse_attention(q, k, v, cfg(pattern="a_shape", sink_blocks=1, local_blocks=1, dense_last_tokens=2 * BS))
    keep = info.block_mask[0]
    i, j = torch.arange(16)[:, None], torch.arange(16)[None, :]
    a_shape = ((j == 0) | ((j <= i) & (j >= i - 1))) & (j <= i)
    assert torch.equal(keep[:14], a_shape[:14]) and torch.equal(keep[14:], (j <= i)[14:])  # rows 14, 15: all
    dense = dense_attention(q, k, v)
    assert torch.allclose(out[:, :, 14 * BS :], dense[:, :, 14 * BS :], atol=1e-5)
    assert not torch.allclose(out[:, :, : 14 * BS], dense[:, :, : 14 * BS], atol=1e-3)


def test_dense_tail_covers_a_partial_last_block():
    # 1000 queries: the last block holds 40 of them, so 64 dense tokens need the last two blocks.
    q, k, v = qkv(lq=1000, lk=1000, seed=9)
    out, info = sparse_attention(q, k, v, cfg(pattern="a_shape", sink_blocks=1, local_blocks=1, dense_last_tokens=BS))
    keep = info.block_mask[0]
    j = torch.arange(16)
    assert keep[14, :15].all() and keep[15, :16].all() and not keep[13, 5]  # rows 14, 15 dense; 13 not
    dense = dense_attention(q, k, v)
    assert torch.allclose(out[:, :, -BS:], dense[:, :, -BS:], atol=1e-5)
    assert (j[None, :] <= j[:, None])[14:].sum() == keep[14:].sum()


def test_budget_bounds_the_selection():
    q, k, v = qkv(lq=1024, lk=1024, seed=6)
    _, small = sparse_attention(q, k, v, cfg(gamma=0.05, sink_blocks=0, local_blocks=0, min_budget=4 * BS))
    per_block = small.block_mask.sum(-1)
    causal = torch.arange(16) + 1
    assert (per_block >= torch.clamp(causal, max=4)).all()
    _, big = sparse_attention(q, k, v, cfg(gamma=0.99, sink_blocks=0, local_blocks=0, max_budget=2 * BS))
    assert big.density.max() < 0.5


def test_dense_below_min_length_and_disabled():
    q, k, v = qkv(lq=100, lk=200)
    out, info = sparse_attention(q, k, v, cfg(min_length=256))
    assert info.patterns == ["dense"] * 4 and info.sparsity == 0.0
    assert torch.equal(out, dense_attention(q, k, v))
    q, k, v = qkv(lq=512, lk=512)
    out, info = sparse_attention(q, k, v, cfg(enabled=False))
    assert info.patterns == ["dense"] * 4
    # the offset semantics of the dense path: query i sees keys <= Lk - Lq + i
    ref = masked_reference(q[:, :, -100:], k, v, torch.ones(4, 2, 8, dtype=torch.bool), 512)
    assert torch.allclose(dense_attention(q[:, :, -100:], k, v), ref, atol=1e-5)


def test_a_selection_too_dense_to_pay_runs_dense():
    q, k, v = qkv(lq=1024, lk=1024, seed=3)
    _, sparse = sparse_attention(q, k, v, cfg(gamma=0.9))
    assert 0.5 < float(sparse.density.mean()) < 1.0
    out, info = sparse_attention(q, k, v, cfg(gamma=0.9, max_density=0.5))
    assert info.patterns == ["dense"] * 4 and info.block_mask is None and info.sparsity == 0.0
    assert torch.equal(out, dense_attention(q, k, v))
    assert SparseConfig().max_density is None  # per device: 0.5 on CPU


def test_gqa_matches_expanded_heads():
    q, k, v = qkv(h=6, hkv=2, lq=512, lk=512, seed=7)
    out, info = sparse_attention(q, k, v, cfg(gamma=0.7))
    kx, vx = k.repeat_interleave(3, 1), v.repeat_interleave(3, 1)
    out_x, info_x = sparse_attention(q, kx, vx, cfg(gamma=0.7))
    assert torch.equal(info.block_mask, info_x.block_mask)
    assert torch.allclose(out, out_x, atol=1e-5)


def test_bad_input_is_named():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="multiple of KV heads"):
        sparse_attention(q[:, :3], k, v, cfg())
    with pytest.raises(ValueError, match="more queries"):
        sparse_attention(q, k[:, :, :100], v[:, :, :100], cfg())
    with pytest.raises(ValueError, match=r"\[1, heads, length, dim\]"):
        sparse_attention(q[0], k, v, cfg())
    with pytest.raises(ValueError, match="batch"):
        sparse_attention(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), cfg())
    with pytest.raises(ValidationError, match="multiple of 16"):
        SparseConfig(block_size=40)
    with pytest.raises(ValidationError, match="below min_budget"):
        SparseConfig(min_budget=1024, max_budget=512)
    with pytest.raises(ValidationError):
        SparseConfig(gamma=1.5)
