"""Weight formats: each loads, generates and scores; float32 stays exact; int4 keeps a GGUF's own blocks."""

from __future__ import annotations

import re
import numpy as np
import pytest
import torch

from promptkit import LM
from promptkit.backends.hf import HFBackend
from promptkit.backends.local import LocalBackend
from promptkit.engine import weights as W
from promptkit.engine.llama import projection

from tiny import make_tiny_llama

VOCAB = 49152  # the real tokenizer's, so the tiny model runs behind the LM facade


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from promptkit.models import DEFAULT_LLM, resolve_llm

    return AutoTokenizer.from_pretrained(resolve_llm(DEFAULT_LLM))


def tiny_lm(tokenizer, fmt: str, backend=LocalBackend) -> LM:
    return LM(backend=backend("tiny", model_obj=make_tiny_llama(vocab=VOCAB), tokenizer=tokenizer, weights=fmt))


@torch.inference_mode()
def logits(model, ids) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0].float()


# -- the transform on a tiny random llama -----------------------------------------------------------
@pytest.mark.parametrize("fmt,tolerance", [("bfloat16", 0.02), ("int8", 0.03), ("int4", 0.25), ("int4+bf16", 0.25)])
def test_each_format_stays_close_to_float32_and_is_smaller(fmt, tolerance):
    ref = make_tiny_llama(vocab=VOCAB)
    model = make_tiny_llama(vocab=VOCAB)
    report = W.apply_format(model, fmt)
    ids = list(range(1, 40))
    want, got = logits(ref, ids), logits(model, ids)
    assert (got - want).norm() / want.norm() < tolerance  # a wrong layout or scale is off by ~100 %
    assert next(model.parameters()).dtype == W.activation_dtype(fmt)  # what the engine sizes its KV cache by
    assert report.bytes < W.model_bytes(ref) * {"bfloat16": 0.55, "int4+bf16": 0.85}.get(fmt, 0.35)
    if fmt != "bfloat16":
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        assert embed.qweight is head.qweight  # tied embeddings stay one table
        linears = {"int4+bf16": "int4", "int8": "int8 (groups of 32)"}.get(fmt, fmt)
        assert report.linears == {linears: 14, "output int8 (tied to the embedding)": 1}


@pytest.mark.parametrize("fmt", W.FORMATS)
@pytest.mark.parametrize("backend", [LocalBackend, HFBackend])
def test_each_format_generates_and_scores_behind_the_facade(tokenizer, fmt, backend):
    lm = tiny_lm(tokenizer, fmt, backend)
    gens = lm.generate(["Hello there", "The sky is"], max_tokens=6, chat=False)
    assert [len(g.token_ids) for g in gens] == [6, 6]
    scores = lm.score("The sky is", [" blue", " green today"])
    assert all(np.isfinite(scores)) and scores[1] < scores[0] < 0
    assert lm.stats()["weights"] == fmt


def test_float32_engine_equals_transformers_on_the_tiny_model(tokenizer):
    texts = ["Hello there", "One two three four", "A"]
    ours = tiny_lm(tokenizer, "float32").generate(texts, max_tokens=10, chat=False)
    ref = tiny_lm(tokenizer, "float32", HFBackend)
    assert [g.token_ids for g in ours] == [ref.generate(t, max_tokens=10, chat=False)[0].token_ids for t in texts]


def test_int8_per_row_kernel_and_dense_paths_agree():
    w = torch.randn(64, 96)
    lin = W.Int8RowLinear(*(t.to(torch.bfloat16) if t.is_floating_point() else t for t in W.quantize_int8_rows(w)))
    x = torch.randn(W.DENSE_ROWS, 96, dtype=torch.bfloat16)
    dense = lin(x).float()  # enough rows: de-quantized GEMM
    kernel = torch.cat([lin(x[i : i + 1]) for i in range(len(x))]).float()  # one row at a time: the kernel
    assert (dense - kernel).norm() / kernel.norm() < 1e-2
    assert (kernel - x.float() @ w.T).norm() / kernel.norm() < 3e-2


@pytest.mark.parametrize("rows", [64, 96])  # 96 rows: not a multiple of the packing's 64-row blocks
def test_grouped_int8_holds_its_codes_and_both_paths_agree(rows):
    w = torch.randn(rows, 128)
    codes, scales, minimums = W.quantize_int8(w)
    assert int(codes.max()) > 15  # the high nibble is used
    exact = W.Int8Linear.from_codes(codes, scales, minimums, dtype=torch.float32)
    assert torch.allclose(exact.dequantize(), W.dequantize_int4(codes, scales, minimums), atol=1e-6)
    assert (exact.dequantize() - w).norm() / w.norm() < 0.01  # groups of 32 with 255 steps: ~0.5 %
    x32 = torch.randn(5, 128)
    assert torch.allclose(exact(x32), x32 @ exact.dequantize().T, rtol=1e-4, atol=1e-4)  # both halves' kernels
    lin = W.Int8Linear.from_codes(codes, scales, minimums, dtype=torch.bfloat16)
    x = torch.randn(W.INT8_DENSE_ROWS, 128, dtype=torch.bfloat16)
    dense = lin(x).float()  # enough rows: de-quantized GEMM
    kernel = torch.cat([lin(x[i : i + 1]) for i in range(len(x))]).float()
    assert (dense - kernel).norm() / kernel.norm() < 1e-2
    assert torch.equal(projection(lin)(x[:3]), lin(x[:3]))  # the kernel a decode step calls directly


def test_grouped_int8_keeps_a_4_bit_grid_exactly():
    w = W.dequantize_int4(*W.quantize_int4(torch.randn(64, 96)))  # a GGUF Q4_1 block: codes 0 and 15 used
    codes, _, _ = W.quantize_int8(w)
    assert torch.equal(codes % 17, torch.zeros_like(codes))
    assert torch.allclose(W.Int8Linear.from_codes(*W.quantize_int8(w), dtype=torch.float32).dequantize(), w,
                          atol=1e-6)


def test_int4_kernel_and_dense_paths_agree():
    w = torch.randn(48, 96)
    exact = W.Int4Linear(*W.quantize_int4(w), dtype=torch.float32)
    assert torch.allclose(exact.dequantize(), W.dequantize_int4(*W.quantize_int4(w)), atol=1e-6)
    lin = W.Int4Linear(*W.quantize_int4(w), dtype=torch.bfloat16)
    x = torch.randn(W.DENSE_ROWS, 96, dtype=torch.bfloat16)
    dense = lin(x).float()
    kernel = torch.cat([lin(x[i : i + 1]) for i in range(len(x))]).float()
    assert (dense - kernel).norm() / kernel.norm() < 1e-2


def test_int4_with_bf16_weights_decodes_from_codes_and_prefills_from_bf16():
    w = torch.randn(48, 96)
    codes = W.quantize_int4(w)
    kept = W.Int4Linear(*codes, dtype=torch.bfloat16, dense=W.dequantize_int4(*codes).to(torch.bfloat16))
    plain = W.Int4Linear(*codes, dtype=torch.bfloat16)
    wide, narrow = torch.randn(W.DENSE_ROWS, 96, dtype=torch.bfloat16), torch.randn(3, 96, dtype=torch.bfloat16)
    assert torch.equal(kept(narrow), plain(narrow))  # decode: the int4 kernel, the same numbers
    assert torch.equal(kept(wide), torch.nn.functional.linear(wide, kept.dense))  # prefill: the kept weight
    assert (kept(wide) - plain(wide)).float().norm() / plain(wide).float().norm() < 1e-2
    other = W.Int4Linear(*codes, dtype=torch.bfloat16, dense=W.dequantize_int4(*codes).to(torch.bfloat16))
    want = torch.cat([kept(wide), other(wide)], -1)
    fused = W.fuse_linears([kept, other])
    assert fused.dense is not None and torch.equal(fused(wide), want)
    # The joined linears now read their rows of the fused weight: one copy in memory, the same numbers.
    assert other.dense.untyped_storage().data_ptr() == fused.dense.untyped_storage().data_ptr()
    assert torch.equal(torch.cat([kept(wide), other(wide)], -1), want)


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_fused_packed_codes_are_shared_where_the_packing_splits_at_the_linears(fmt):
    def make(rows):
        w = torch.randn(rows, 96)
        if fmt == "int4":
            return W.Int4Linear(*W.quantize_int4(w), dtype=torch.bfloat16)
        return W.Int8Linear.from_codes(*W.quantize_int8(w), dtype=torch.bfloat16)

    def packed(m):
        return [m.packed] if fmt == "int4" else [m.high.packed, m.low.packed]

    x = torch.randn(3, 96, dtype=torch.bfloat16)
    for rows, shared in (((64, 128), True), ((48, 96), False)):  # 64-row packing blocks, or not
        parts = [make(n) for n in rows]
        want = torch.cat([m(x) for m in parts], -1)
        fused = W.fuse_linears(parts)
        assert torch.equal(fused(x), want) and torch.equal(torch.cat([m(x) for m in parts], -1), want)
        same = [a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
                for m in parts for a, b in zip(packed(m), packed(fused))]
        assert all(same) if shared else not any(same)


def test_fused_grouped_int8_gives_the_projections_own_numbers():
    model = make_tiny_llama(vocab=VOCAB)
    W.apply_format(model, "int8")
    attn = model.model.layers[0].self_attn
    x = torch.randn(3, attn.q_proj.in_features, dtype=torch.bfloat16)
    fused = W.fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])
    assert isinstance(fused, W.Int8Linear)
    assert torch.equal(fused(x), torch.cat([m(x) for m in (attn.q_proj, attn.k_proj, attn.v_proj)], -1))


def _per_row_int8(lin: torch.nn.Linear) -> W.Int8RowLinear:
    q, s = W.quantize_int8_rows(lin.weight.detach())
    return W.Int8RowLinear(q, s.to(torch.bfloat16))


@pytest.mark.parametrize("fmt", ["float32", "int8 per row"])
def test_fused_projections_share_their_weights_with_the_originals(fmt):
    model = make_tiny_llama(vocab=VOCAB)
    attn = model.model.layers[0].self_attn
    if fmt != "float32":
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(attn, name, _per_row_int8(getattr(attn, name)))
    x = torch.randn(3, attn.q_proj.in_features, dtype=torch.float32 if fmt == "float32" else torch.bfloat16)
    want = [m(x) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    fused = W.fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])
    weight = "weight" if fmt == "float32" else "qweight"
    assert getattr(attn.v_proj, weight).untyped_storage().data_ptr() == \
        getattr(fused, weight).untyped_storage().data_ptr()
    assert torch.equal(fused(x), torch.cat(want, -1))
    assert all(torch.equal(m(x), w) for m, w in zip((attn.q_proj, attn.k_proj, attn.v_proj), want))


def test_compact_model_runs_under_transformers_generate():
    model = make_tiny_llama(vocab=VOCAB)
    W.apply_format(model, "int4")
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)


# -- choosing a format --------------------------------------------------------------------------------
def test_unknown_format_is_refused():
    with pytest.raises(W.WeightFormatError, match="choose one of float32, bfloat16, int8, int4"):
        W.resolve_format("int3")
    with pytest.raises(W.WeightFormatError, match="int4\\+bf16"):
        W.resolve_format("int2")


def test_int_formats_are_refused_off_cpu():
    with pytest.raises(W.WeightFormatError, match="CPU only"):
        W.resolve_format("int4", device="cuda")


@pytest.mark.parametrize("fmt", ["bfloat16", "int8", "int4", "int4+bf16"])
def test_a_format_the_cpu_lacks_falls_back_to_float32_and_says_so(fmt):
    old = W.CpuFeatures(capability="AVX2", avx512_bf16=False, amx_listed=False, amx_usable=False)
    with pytest.warns(UserWarning, match=f"{re.escape(fmt)} asked for.*no fast path.*running float32"):
        got, note = W.resolve_format(fmt, features=old)
    assert got == "float32" and "AVX2" in note
    assert W.resolve_format(None, features=old)[0] == "float32"


def test_default_follows_the_cpu_unless_the_environment_names_one(monkeypatch):
    monkeypatch.setenv("PROMPTKIT_WEIGHTS", "int4")
    assert W.resolve_format(None)[0] == "int4"
    monkeypatch.delenv("PROMPTKIT_WEIGHTS")
    amx_off = W.CpuFeatures(capability="AVX512", avx512_bf16=False, amx_listed=True, amx_usable=False)
    assert not amx_off.bf16 and "not enabled by the kernel" in amx_off.describe()
    full = W.CpuFeatures(capability="AVX512", avx512_bf16=True, amx_listed=False, amx_usable=False)
    assert W.default_format(features=full) == W.DEFAULT_ORDER[0]
    assert W.resolve_format(None, features=full)[1].startswith(f"{W.DEFAULT_ORDER[0]}: the default")
    # A model shipped as Q4_1 decodes from its own 4-bit weights where the CPU runs them and bfloat16.
    assert W.default_format(features=full, q4_gguf=True) == "int4+bf16"
    assert W.default_format(features=amx_off, q4_gguf=True) == "float32"


def test_a_q4_1_gguf_is_told_by_its_name():
    assert W.is_q4_gguf("SmolLM2-135M-Instruct.Q4_1.gguf") and W.is_q4_gguf("x-q4_1.gguf")
    assert not any(W.is_q4_gguf(n) for n in ("x-Q4_0.gguf", "x-Q4_K_M.gguf", "x-Q8_0.gguf", "x-q4_10.gguf", None))


def test_bfloat16_on_a_cpu_without_it_falls_back_in_the_backend(tokenizer, monkeypatch):
    old = W.CpuFeatures(capability="AVX512", avx512_bf16=False, amx_listed=False, amx_usable=False)
    monkeypatch.setattr(W.formats, "cpu_features", lambda: old)  # where resolve_format reads it
    with pytest.warns(UserWarning, match="bfloat16 asked for"):
        lm = tiny_lm(tokenizer, "bfloat16")
    assert lm.stats()["weights"] == "float32" and "running float32" in lm.stats()["weights_note"]
    assert lm.stats()["weights"] == "float32" and tiny_lm(tokenizer, "int8").stats()["weights"] == "int8"


# -- int4 from a GGUF's own blocks ------------------------------------------------------------------------
def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """The row order llama.cpp's converter gives q/k weights (transformers undoes it on load)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _undo_permute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(model, path) -> None:
    """A GGUF holding the tiny model's linears as Q4_1, then the model set to the GGUF's de-quantized weights."""
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    gguf_names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                  "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    for i, layer in enumerate(model.model.layers):
        for mod in (layer.self_attn, layer.mlp):
            for hf, short in gguf_names.items():
                lin = getattr(mod, hf, None)
                if lin is None:
                    continue
                w = lin.weight.detach().numpy()
                heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}.get(hf)
                stored = _llama_cpp_permute(w, heads) if heads else w
                blocks = gguf.quants.quantize(stored, gguf.GGMLQuantizationType.Q4_1)
                writer.add_tensor(f"blk.{i}.{short}.weight", blocks, raw_shape=blocks.shape,
                                  raw_dtype=gguf.GGMLQuantizationType.Q4_1)
                back = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_1)
                back = _undo_permute(back, heads) if heads else back
                with torch.no_grad():
                    lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(back)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def kernel_weight(mod: W.Int4Linear) -> torch.Tensor:
    """The weight as the int4 kernel sees it: identity rows fed one at a time (below the dense-path size)."""
    eye = torch.eye(mod.in_features)
    return torch.cat([mod(eye[i : i + 1]) for i in range(mod.in_features)]).T


def test_int4_keeps_the_gguf_blocks_exactly(tmp_path):
    model = make_tiny_llama(vocab=VOCAB)
    write_tiny_gguf(model, tmp_path / "tiny.gguf")
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    report = W.apply_format(model, "int4", gguf=tmp_path / "tiny.gguf", dtype=torch.float32,
                            gguf_cache=tmp_path / "blocks.safetensors")
    assert report.linears["int4 from GGUF blocks"] == 14 and not report.note
    assert (tmp_path / "blocks.safetensors").exists()
    for name, mod in model.named_modules():
        if isinstance(mod, W.Int4Linear):
            # Both paths (the kernel's own de-quantization, and the dense one) give the GGUF's numbers bit for bit.
            assert torch.equal(kernel_weight(mod), weights[name]) and torch.equal(mod.dequantize(), weights[name])


def test_int4_requantizes_what_the_gguf_does_not_reproduce(tmp_path):
    model = make_tiny_llama(vocab=VOCAB)
    write_tiny_gguf(model, tmp_path / "tiny.gguf")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3, 5] += 0.25  # the float weights no longer match the GGUF
    report = W.apply_format(model, "int4", gguf=tmp_path / "tiny.gguf")
    assert report.linears == {"int4 from GGUF blocks": 13, "int4": 1, "output int8 (tied to the embedding)": 1}
    assert "re-quantized" in report.note


def test_q4_1_blocks_unpack_like_the_gguf_package():
    import gguf

    w = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
    blocks = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_1)
    codes, scales, mins = W.q4_1_blocks(torch.from_numpy(blocks), (16, 64))
    assert codes.max() <= 15 and scales.shape == mins.shape == (16, 2)
    want = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_1)
    assert torch.equal(W.dequantize_int4(codes, scales, mins), torch.from_numpy(want))


# -- the real model -------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("fmt", W.FORMATS)
def test_real_model_in_each_format(fmt):
    lm = LM(weights=fmt)
    assert "Red" in lm.generate("Name three primary colors.", max_tokens=12)[0].text
    scores = lm.score("The opposite of hot is", [" cold", " blue"])
    assert scores[0] > scores[1]
    info = lm.backend.weights
    limit = {"float32": 6e8, "bfloat16": 3e8, "int8": 1.7e8, "int4": 1e8, "int4+bf16": 4e8}[fmt]
    assert info.format == fmt and info.bytes < limit
    if fmt in W.INT4:
        assert info.linears["int4 from GGUF blocks"] == 210 and not info.note  # every Q4_1 tensor kept as is
    if fmt == "int8":
        assert info.linears["int8 (groups of 32)"] == 210  # none fell back to one scale per row
    # The lean forward's joined q/k/v and gate/up share the model's weights (only int4/int8 scales are copied).
    assert info.bytes <= lm.stats()["weight_bytes"] < 1.12 * info.bytes


@pytest.mark.slow
def test_real_int4_reproduces_the_gguf_weights_bit_for_bit():
    from transformers import AutoModelForCausalLM

    from promptkit.models import DEFAULT_LLM, gguf_source, resolve_llm

    model = AutoModelForCausalLM.from_pretrained(resolve_llm(DEFAULT_LLM), dtype=torch.float32)
    layers = model.model.layers
    want = {"q": layers[0].self_attn.q_proj.weight.detach().clone(),  # rows reordered on load
            "down": layers[-1].mlp.down_proj.weight.detach().clone()}
    gguf = gguf_source(DEFAULT_LLM)
    W.apply_format(model, "int4", gguf=gguf, dtype=torch.float32, gguf_cache=W.gguf_cache_file(gguf))
    for key, mod in (("q", layers[0].self_attn.q_proj), ("down", layers[-1].mlp.down_proj)):
        assert torch.equal(kernel_weight(mod), want[key]) and torch.equal(mod.dequantize(), want[key]), key
