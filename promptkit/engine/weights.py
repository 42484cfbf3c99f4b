"""Weight formats for a loaded transformers causal LM: float32, bfloat16, int8 and int4.

:func:`apply_format` is a pure transform of the model's modules, so it
composes with whatever runs the model (the engine, ``generate``):

- ``float32``: as loaded; equal to transformers token for token.
- ``bfloat16``: every parameter in bfloat16.
- ``int8``: decoder linears keep 8-bit codes in groups of 32 with a scale and
  a minimum per group, held as two 4-bit halves that
  ``aten._weight_int4pack_mm_for_cpu`` multiplies (PyTorch's int8 kernel takes
  one scale per output row: ~1 % weight error, and a GGUF's groups lost). A
  GGUF Q4_1 block maps to codes ``17 * q``, so its numbers are kept.
- ``int4``: decoder linears keep 4-bit codes in groups of 32 with a scale and a
  minimum per group (GGUF Q4_1's layout) and multiply with
  ``aten._weight_int4pack_mm_for_cpu``. For a model converted from a GGUF file
  the codes, scales and minimums are the GGUF's own, not re-derived from floats.
- ``int4+bf16``: int4 for decode, and each decoder linear also keeps its weight
  in bfloat16 for wide forwards (prefill), which would otherwise de-quantize
  every weight in every forward. Decode reads 4-bit weights, prefill runs
  bfloat16 GEMMs; it holds both (about the bytes of int4 and bfloat16 together).
  The default on a CPU with AVX512-BF16 for a model shipped as a Q4_1 GGUF.

In int8 and int4 the activations, norms and KV cache are bfloat16
(:func:`activation_dtype`), and from :data:`DENSE_ROWS` rows on (prefill;
:data:`INT8_DENSE_ROWS` for int8) a linear de-quantizes its weight and runs a
dense GEMM instead of the kernel. The token embedding and the output
projection share one int8 table with a scale per row (tied, as in SmolLM2;
llama.cpp also keeps that tensor in 8 bits): the lookup de-quantizes the rows
it picks and the output projection uses ``aten._weight_int8pack_mm``.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMATS = ("float32", "bfloat16", "int8", "int4", "int4+bf16")
INT4 = ("int4", "int4+bf16")  # the formats whose decoder linears are Int4Linear
GROUP = 32  # values per int4 group: a GGUF Q4_1 block
DEFAULT_ORDER = ("bfloat16", "float32")  # the default: the first this CPU runs fast (see the README table)
DENSE_ROWS = 32  # from this many rows on, int8/int4 de-quantize and run a dense GEMM (measured crossover)
INT8_DENSE_ROWS = 64  # the same for grouped int8, whose two kernel calls cost twice per row (measured)


class WeightFormatError(ValueError):
    """A weight format that does not exist or cannot run on the chosen device."""


# -- what the CPU runs fast ---------------------------------------------------------------------
@dataclass(frozen=True)
class CpuFeatures:
    """The CPU's instruction sets that matter for weight formats."""

    capability: str  # the vector ISA torch's kernels use here: AVX512, AVX2, DEFAULT
    avx512_bf16: bool
    amx_listed: bool  # the CPU reports AMX tiles
    amx_usable: bool  # ... and the kernel lets this process use them

    @property
    def bf16(self) -> bool:
        """bfloat16 arithmetic in hardware (AVX512-BF16 or AMX)."""
        return self.avx512_bf16 or self.amx_usable

    def runs_fast(self, fmt: str) -> bool:
        """Whether PyTorch has a fast CPU path for ``fmt`` here.

        bfloat16 matmuls need bfloat16 instructions; the int8/int4 weight-only
        kernels are vectorized for AVX512 only (elsewhere they run scalar code).
        """
        if fmt == "bfloat16":
            return self.bf16
        if fmt == "int4+bf16":
            return self.bf16 and self.capability.startswith("AVX512")
        if fmt in ("int8", "int4"):
            return self.capability.startswith("AVX512")
        return True

    def describe(self) -> str:
        amx = "usable" if self.amx_usable else "listed but not enabled by the kernel" if self.amx_listed else "no"
        return f"{self.capability}, AVX512-BF16 {'yes' if self.avx512_bf16 else 'no'}, AMX {amx}"


@cache
def cpu_model() -> str:
    """The CPU's model name as the OS reports it (``/proc/cpuinfo``), and its core count."""
    name = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    import platform

    return f"{name or platform.processor() or platform.machine()}, {os.cpu_count()} cores"


@cache
def cpu_features() -> CpuFeatures:
    """Probe this CPU once (torch's cpuinfo, and whether the kernel grants AMX tile data)."""
    listed = bool(torch.cpu._is_amx_tile_supported())
    return CpuFeatures(
        capability=torch.backends.cpu.get_cpu_capability(),
        avx512_bf16=bool(torch.cpu._is_avx512_bf16_supported()),
        amx_listed=listed,
        amx_usable=listed and bool(torch._C._cpu._init_amx()),
    )


def default_format(device: torch.device | str = "cpu", features: CpuFeatures | None = None,
                   q4_gguf: bool = False) -> str:
    """The fastest format on ``device`` whose greedy outputs stay close to float32's (see the README's table).

    ``q4_gguf``: the model ships as a Q4_1 GGUF, so int4 keeps its own numbers and
    ``int4+bf16`` (4-bit decode, bfloat16 prefill) comes first where the CPU runs it.
    """
    if torch.device(device).type != "cpu":
        return "bfloat16"
    feats = features or cpu_features()
    order = ("int4+bf16", *DEFAULT_ORDER) if q4_gguf else DEFAULT_ORDER
    return next(f for f in order if feats.runs_fast(f))


def is_q4_gguf(path: str | Path | None) -> bool:
    """Whether a GGUF file holds Q4_1 weights (int4 then keeps their exact numbers), by the quantization
    its name states (the convention of GGUF publishers; the header would mean parsing every tensor's
    metadata). A name that says otherwise only changes the default format, never a number."""
    return path is not None and re.search(r"(?i)(?<![a-z0-9])q4_1(?![0-9])", Path(path).name) is not None


def activation_dtype(fmt: str, device: torch.device | str = "cpu") -> torch.dtype:
    """The float dtype of activations, norms and KV cache for a format.

    int8/int4 use bfloat16: PyTorch's weight-only CPU kernels have their fast
    path for bfloat16 activations only (float32 ones run 10-30x slower).
    """
    return torch.float32 if fmt == "float32" else torch.bfloat16


def resolve_format(weights: str | None, device: torch.device | str = "cpu",
                   features: CpuFeatures | None = None, q4_gguf: bool = False) -> tuple[str, str]:
    """Validate a requested format for ``device``: ``(format, note)``.

    ``None`` takes ``$PROMPTKIT_WEIGHTS`` if set, else :func:`default_format` (``q4_gguf``: see there).
    A format this CPU has no fast path for falls back to float32 and says so (a
    warning, and the note); int8/int4 exist only on CPU and are refused elsewhere.
    """
    dev = torch.device(device)
    feats = (features or cpu_features()) if dev.type == "cpu" else None
    weights = weights or os.environ.get("PROMPTKIT_WEIGHTS") or None
    if weights is None:
        fmt = default_format(dev, feats, q4_gguf)
        return fmt, f"{fmt}: the default for {f'this CPU ({feats.describe()})' if feats else dev.type}"
    fmt = {"bf16": "bfloat16", "fp32": "float32"}.get(str(weights).lower(), str(weights).lower())
    if fmt not in FORMATS:
        raise WeightFormatError(f"unknown weight format {weights!r}; choose one of {', '.join(FORMATS)}")
    if dev.type != "cpu" and fmt.startswith("int"):
        raise WeightFormatError(f"{fmt} weights run on CPU only; on {dev.type} use weights='bfloat16' or 'float32'")
    if feats is not None and not feats.runs_fast(fmt):
        note = (f"{fmt} asked for, but PyTorch has no fast path for it on this CPU ({feats.describe()}); "
                "running float32 instead")
        warnings.warn(note, stacklevel=3)
        return "float32", note
    return fmt, fmt


# -- compact modules ----------------------------------------------------------------------------
class Int8RowLinear(nn.Module):
    """``y = x @ (q * scale).T + bias`` with int8 ``q`` and one scale per output row.

    The output projection's layout (an int8 table shared with the token
    embedding), and decoder linears whose shape the grouped :class:`Int8Linear`
    cannot tile.

    Few rows (decode) go through the weight-only kernel, which reads a quarter
    of float32's bytes; from :data:`DENSE_ROWS` rows on (prefill, wide decode
    batches) de-quantizing once and running a dense GEMM is faster, as the
    kernel's cost grows with every row.
    """

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] >= DENSE_ROWS:
            y = nn.functional.linear(rows, self.qweight.to(rows.dtype) * self.scales[:, None])
        else:
            y = torch.ops.aten._weight_int8pack_mm(rows, self.qweight, self.scales)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class Int8Embedding(nn.Module):
    """A token embedding over an int8 table with one scale per row (shared with a tied :class:`Int8RowLinear`)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, padding_idx: int | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.padding_idx = padding_idx
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[ids].to(self.scales.dtype) * self.scales[ids].unsqueeze(-1)


class Int4Linear(nn.Module):
    """Weight-only int4 linear: groups of 32 input values share a scale and a minimum.

    Weight value = ``scale * code + minimum`` with ``code`` in 0..15 (GGUF
    Q4_1). PyTorch's kernel computes ``(code - 8) * scale + zero``, so it is
    given ``zero = minimum + 8 * scale``. From :data:`DENSE_ROWS` rows on the
    weight is de-quantized from the packed codes and a dense GEMM runs, as in
    :class:`Int8RowLinear`; with ``dense`` (the weight in the activation dtype, kept
    beside the codes) that GEMM reads it instead.
    """

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, minimums: torch.Tensor, dtype: torch.dtype,
                 bias: torch.Tensor | None = None, dense: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = codes.shape
        scales, minimums = scales.float(), minimums.float()
        self.register_buffer("packed", _pack_int4(codes))
        # [groups, out, 2]: scale and zero of each group, in the activation dtype (the kernel's contract).
        self.register_buffer("scale_zero", torch.stack([scales, minimums + 8 * scales], -1)
                             .transpose(0, 1).contiguous().to(dtype))
        self.register_buffer("bias", bias)
        self.register_buffer("dense", dense)
        self.unpackable = _unpack_order(self.out_features, self.in_features) is not None  # codes can be read back

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] >= DENSE_ROWS and self.dense is not None:
            y = nn.functional.linear(rows, self.dense.to(rows.dtype))
        elif rows.shape[0] >= DENSE_ROWS and self.unpackable:
            y = nn.functional.linear(rows, self.dequantize().to(rows.dtype))
        else:
            y = _int4_mm(rows, self)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def codes_scales_minimums(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The codes [out, in], scales and minimums [out, in / 32] this module was built from."""
        codes = _in_weight_order(_nibbles(self.packed), self.out_features, self.in_features)
        scale, zero = self.scale_zero.float().transpose(0, 1).unbind(-1)
        return codes.to(torch.uint8), scale, zero - 8 * scale

    def dequantize(self) -> torch.Tensor:
        """The float32 weight ``(code - 8) * scale + zero``, [out, in]."""
        codes = _in_weight_order(_nibbles(self.packed), self.out_features, self.in_features)
        scale, zero = self.scale_zero.float().transpose(0, 1).unbind(-1)
        return _scaled(codes, scale, zero - 8 * scale)


class Int8Linear(nn.Module):
    """Weight-only int8 in groups of 32 input values: weight = ``scale * code + minimum``, code in 0..255.

    PyTorch's int8 weight-only CPU kernel takes one scale per output row, which
    costs ~1 % weight error (and, on a model already quantized in groups, the
    groups' own numbers). Here each code is split into its high and low nibble,
    held as two :class:`Int4Linear` (scales ``16 * scale`` and ``scale``, the
    minimum with the high half), and a decode step runs the int4 kernel on both
    and adds: int8's bytes, with a scale and a minimum per 32 values. From
    :data:`INT8_DENSE_ROWS` rows on the weight is de-quantized for a dense GEMM.
    """

    def __init__(self, high: Int4Linear, low: Int4Linear, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = high.out_features, high.in_features
        self.high, self.low = high, low
        self.register_buffer("bias", bias)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, minimums: torch.Tensor, dtype: torch.dtype,
                   bias: torch.Tensor | None = None) -> Int8Linear:
        """From 8-bit ``codes`` [out, in] and ``scales``, ``minimums`` [out, in / 32] (see :func:`quantize_int8`)."""
        codes, scales = codes.to(torch.uint8), scales.float()
        return cls(Int4Linear(codes >> 4, 16 * scales, minimums, dtype),
                   Int4Linear(codes & 0x0F, scales, torch.zeros_like(scales), dtype), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] >= INT8_DENSE_ROWS:
            y = nn.functional.linear(rows, self.dequantize().to(rows.dtype))
        else:
            y = _int4_mm(rows, self.high) + _int4_mm(rows, self.low)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def dequantize(self) -> torch.Tensor:
        """The float32 weight, [out, in]: one pass over the joined codes (both halves share a layout)."""
        high, low = self.high.packed, self.low.packed  # each byte: two codes' high (low) nibbles
        joined = torch.stack([(high << 4) | (low & 0x0F), (high & 0xF0) | (low >> 4)], -1).reshape(-1)
        codes = _in_weight_order(joined, self.out_features, self.in_features)
        scale = self.low.scale_zero[..., 0].float().transpose(0, 1)
        high_scale, high_zero = self.high.scale_zero.float().transpose(0, 1).unbind(-1)
        return _scaled(codes, scale, high_zero - 8 * high_scale)


def _scaled(codes: torch.Tensor, scales: torch.Tensor, minimums: torch.Tensor) -> torch.Tensor:
    """``scale * code + minimum`` per group of 32, float32, [out, in]."""
    n, k = codes.shape
    w = codes.reshape(n, k // GROUP, GROUP).float() * scales[..., None] + minimums[..., None]
    return w.reshape(n, k)


def _int4_mm(x: torch.Tensor, lin: Int4Linear) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, lin.packed, GROUP, lin.scale_zero)


def row_kernel(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``module``'s product for a 2-D input of fewer than :data:`DENSE_ROWS` rows (a decode step),
    as a direct call of its kernel: the same numbers as ``module(x)``, without the module's dispatch."""
    bias = getattr(module, "bias", None)
    if isinstance(module, Int4Linear) and bias is None:
        packed, scale_zero, mm4 = module.packed, module.scale_zero, torch.ops.aten._weight_int4pack_mm_for_cpu
        return lambda x: mm4(x, packed, GROUP, scale_zero)
    if isinstance(module, Int8Linear) and bias is None:
        high, low = row_kernel(module.high), row_kernel(module.low)
        return lambda x: high(x) + low(x)
    if isinstance(module, Int8RowLinear) and bias is None:
        qweight, scales, mm8 = module.qweight, module.scales, torch.ops.aten._weight_int8pack_mm
        return lambda x: mm8(x, qweight, scales)
    if isinstance(module, nn.Linear):
        weight, linear = module.weight, nn.functional.linear
        return lambda x: linear(x, weight, bias)
    return module


def fuse_linears(linears: list[nn.Module]) -> nn.Module | None:
    """One module computing ``cat([lin(x) for lin in linears], -1)`` (for q/k/v, or gate/up), in the
    linears' own format: their output rows side by side, so no number changes. None if they differ
    in format or cannot be joined. The linears keep working on views of the joined tensors (their
    own copies are freed); int4's (and int8's) packed codes too where the packing's row blocks
    split at the linears' boundaries (64 rows here), and their scales stay their own."""
    kinds = {type(m) for m in linears}
    if len(kinds) != 1:
        return None
    kind = kinds.pop()
    biases = [m.bias for m in linears]
    if any(b is None for b in biases) and any(b is not None for b in biases):
        return None
    bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
    if kind is nn.Linear:
        w = torch.cat([m.weight.detach() for m in linears])
        fused = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
        fused.weight.data = w
        if bias is not None:
            fused.bias.data = bias
        shared = ("weight",)
    elif kind is Int8RowLinear:
        fused = Int8RowLinear(torch.cat([m.qweight for m in linears]), torch.cat([m.scales for m in linears]), bias)
        shared = ("qweight", "scales")
    elif kind is Int8Linear:
        high, low = fuse_linears([m.high for m in linears]), fuse_linears([m.low for m in linears])
        if high is None or low is None:
            return None
        fused, shared = Int8Linear(high, low, bias), ()
    elif kind is Int4Linear and all(m.unpackable for m in linears):
        parts = [m.codes_scales_minimums() for m in linears]
        dense = None if any(m.dense is None for m in linears) else torch.cat([m.dense for m in linears])
        fused = Int4Linear(*(torch.cat(x) for x in zip(*parts)), dtype=linears[0].scale_zero.dtype, bias=bias,
                           dense=dense)
        shared = ("dense",) if dense is not None else ()
        if _holds_rows(fused.packed, [m.packed for m in linears]):  # rows packed in blocks that split there
            shared += ("packed",)
    else:
        return None
    for name in (*shared, *(("bias",) if bias is not None else ())):
        _share_rows(linears, name, getattr(fused, name))
    return fused


def _holds_rows(joined: torch.Tensor, parts: list[torch.Tensor]) -> bool:
    """Whether ``joined`` is ``parts`` stacked row after row, so each part can be a view of it."""
    start = 0
    for part in parts:
        if not torch.equal(joined[start : start + part.shape[0]], part):
            return False
        start += part.shape[0]
    return start == joined.shape[0]


def _share_rows(linears: list[nn.Module], name: str, joined: torch.Tensor) -> None:
    """Point each linear's ``name`` tensor at its rows of ``joined`` (one copy of the weights, not two)."""
    start = 0
    for m in linears:
        t = getattr(m, name)
        t.data = joined[start : start + t.shape[0]]
        start += t.shape[0]


def _pack_int4(codes: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0x0F, packed >> 4], -1).reshape(-1)


def _in_weight_order(nibbles: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Packed-order nibbles (or per-nibble values) of an [n, k] int4 weight, as [n, k] in weight order."""
    if _blocks_of_64(n, k):  # a reshape and a transpose instead of a gather of n * k indices
        return nibbles.reshape(n // 64, k, 32, 2).permute(0, 3, 2, 1).reshape(n, k)
    return nibbles[_unpack_order(n, k)].reshape(n, k)


@cache
def _blocks_of_64(n: int, k: int) -> bool:
    """Whether this PyTorch packs an [n, k] weight in blocks of 64 rows, row ``r`` and ``r + 32`` of a
    block sharing a byte (its AVX512 layout): checked against :func:`_unpack_order`, not assumed."""
    if n % 64 or _unpack_order(n, k) is None:
        return False
    blocked = torch.arange(n * k).reshape(n // 64, k, 32, 2).permute(0, 3, 2, 1).reshape(-1)
    return torch.equal(blocked, _unpack_order(n, k))


@lru_cache(maxsize=4)  # an int64 per weight: kept for the few shapes in use, not for every shape seen
def _unpack_order(n: int, k: int) -> torch.Tensor | None:
    """For each weight position of an [n, k] int4 weight, the packed nibble that holds it (None: not a permutation).

    Found by packing probe codes that spell out each position's index four
    bits at a time, so it follows whatever layout this PyTorch packs into.
    """
    index = torch.arange(n * k)
    held = torch.zeros(n * k, dtype=torch.int64)  # position held by each nibble
    for shift in range(0, max(1, (n * k - 1).bit_length()), 4):
        held |= _nibbles(_pack_int4(((index >> shift) & 0x0F).reshape(n, k))).long() << shift
    if held.numel() != n * k or not torch.equal(held.sort().values, index):
        return None
    order = torch.empty_like(held)
    order[held] = index
    return order


# -- quantizers ---------------------------------------------------------------------------------
def quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``(codes, scales)`` with ``w ≈ codes * scales[:, None]``."""
    w = w.float()
    scales = (w.abs().amax(1) / 127).clamp_min(1e-12)
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


def quantize_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit in groups of 32 along the input (GGUF Q4_1's rule): ``(codes, scales, minimums)``."""
    return _quantize_groups(w, 15)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 8-bit in groups of 32 along the input: ``(codes, scales, minimums)``.

    A group already on a 4-bit grid (a GGUF Q4_1 block, whose minimum and
    maximum are codes 0 and 15) maps to codes ``17 * q``: its numbers are kept.
    """
    return _quantize_groups(w, 255)


def _quantize_groups(w: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, k = w.shape
    g = w.float().reshape(n, k // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    scales = (hi - lo) / top
    inv = torch.where(scales == 0, 0.0, 1 / scales)
    codes = torch.floor((g - lo[..., None]) * inv[..., None] + 0.5).clamp(0, top).to(torch.uint8)
    return codes.reshape(n, k), scales, lo


def dequantize_int4(codes: torch.Tensor, scales: torch.Tensor, minimums: torch.Tensor) -> torch.Tensor:
    """The float32 weight ``scale * code + minimum`` (the GGUF's own de-quantization)."""
    n, k = codes.shape
    w = scales.float()[..., None] * codes.reshape(n, k // GROUP, GROUP).float() + minimums.float()[..., None]
    return w.reshape(n, k)


# -- GGUF Q4_1 blocks ---------------------------------------------------------------------------
def q4_1_blocks(raw: torch.Tensor, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unpack a GGUF Q4_1 tensor ([rows, blocks * 20] bytes) into ``(codes, scales, minimums)``.

    A block is a float16 scale, a float16 minimum and 16 bytes: value ``j < 16``
    in the low nibble of byte ``j``, value ``16 + j`` in its high nibble.
    """
    n, k = shape
    blocks = raw.reshape(n, k // GROUP, 20)
    scales = blocks[..., 0:2].contiguous().view(torch.float16)[..., 0].float()
    minimums = blocks[..., 2:4].contiguous().view(torch.float16)[..., 0].float()
    qs = blocks[..., 4:]
    codes = torch.stack([qs & 0x0F, qs >> 4], -2).reshape(n, k)
    return codes, scales, minimums


@dataclass
class GGUFInt4:
    """The Q4_1 blocks of a GGUF file, by the name of the transformers parameter they became."""

    blocks: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def read_gguf_int4(path: str | Path, model: nn.Module, cache: str | Path | None = None) -> GGUFInt4:
    """The Q4_1 weights of ``path`` mapped to ``model``'s linear weights, rows as transformers laid them out.

    transformers reorders some rows when it loads a GGUF (llama's q/k heads);
    the same reordering is applied to the raw blocks (whole rows move).
    :func:`apply_format` checks each result against the loaded float weights
    and uses only those that match exactly. ``cache`` is a safetensors file
    that keeps the reordered blocks (reading a GGUF's metadata takes seconds).
    """
    from safetensors.torch import load_file, save_file

    if cache and Path(cache).exists():
        rows = load_file(str(cache))
    else:
        rows = _gguf_q4_1_rows(path, model)
        if cache:
            tmp = Path(f"{cache}.tmp")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            save_file(rows, str(tmp))
            tmp.rename(cache)  # atomic: a half-written file is never read
    params = dict(model.named_parameters())
    out = GGUFInt4()
    for name, raw in rows.items():
        if name in params and params[name].dim() == 2:
            out.blocks[name] = q4_1_blocks(raw, tuple(params[name].shape))
    return out


def _gguf_q4_1_rows(path: str | Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """Each Q4_1 tensor's raw blocks ([rows, blocks * 20] bytes), by transformers parameter name and row order."""
    from gguf import GGMLQuantizationType, GGUFReader, get_tensor_name_map
    from gguf.constants import MODEL_ARCH_NAMES

    reader = GGUFReader(str(path))
    arch_name = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    arch = next(a for a, name in MODEL_ARCH_NAMES.items() if name == arch_name)
    names = get_tensor_name_map(arch, model.config.num_hidden_layers)
    to_hf = {}
    for hf_name, _ in model.named_parameters():
        gguf_name = names.get_name(hf_name.removesuffix(".weight"))
        if gguf_name:
            to_hf[gguf_name + ".weight"] = hf_name
    reorder = _row_order(arch_name, model.config)
    return {to_hf[t.name]: reorder(t.name, torch.from_numpy(t.data.copy())) for t in reader.tensors
            if t.tensor_type == GGMLQuantizationType.Q4_1 and t.name in to_hf}


def _row_order(arch: str, config: Any):
    """The row reordering transformers applies to a GGUF tensor (its own tensor processor), or none."""
    try:
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor
    except ImportError:  # a transformers without it: rows as stored; mismatches are caught later
        return lambda name, x: x
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())
    return lambda name, x: torch.from_numpy(processor.process(weights=x.numpy(), name=name).weights.copy())


def gguf_cache_file(gguf: str | Path | None) -> Path | None:
    """Where :func:`read_gguf_int4` keeps a GGUF's reordered Q4_1 blocks (under the promptkit cache)."""
    from .models import cache_dir

    if gguf is None:
        return None
    gguf = Path(gguf)
    return cache_dir() / "gguf" / f"{gguf.stem}-{gguf.stat().st_size}.q4_1.safetensors"


# -- the transform ------------------------------------------------------------------------------
@dataclass
class WeightReport:
    """What :func:`apply_format` did: the format, the activation dtype, bytes and how each linear was made."""

    format: str
    activation_dtype: str
    bytes: int = 0
    linears: dict[str, int] = field(default_factory=dict)
    note: str = ""

    def count(self, how: str) -> None:
        self.linears[how] = self.linears.get(how, 0) + 1


def apply_format(model: nn.Module, fmt: str, gguf: str | Path | None = None,
                 dtype: torch.dtype | None = None, gguf_cache: str | Path | None = None) -> WeightReport:
    """Convert ``model`` in place to ``fmt`` (one of :data:`FORMATS`); returns a :class:`WeightReport`.

    ``gguf`` is the file the float weights were de-quantized from: int4 takes
    its Q4_1 blocks where they reproduce those weights exactly (``gguf_cache``:
    see :func:`read_gguf_int4`). ``dtype`` forces the activation dtype (default
    :func:`activation_dtype`).
    """
    if fmt not in FORMATS:
        raise WeightFormatError(f"unknown weight format {fmt!r}; choose one of {', '.join(FORMATS)}")
    device = next(model.parameters()).device
    act = dtype or activation_dtype(fmt, device)
    report = WeightReport(format=fmt, activation_dtype=str(act).removeprefix("torch."))
    if fmt.startswith("int"):
        source = read_gguf_int4(gguf, model, gguf_cache) if gguf and fmt in INT4 else GGUFInt4()
        _quantize_linears(model, fmt, act, source, report)
    for p in model.parameters():  # norms and anything left in float; buffers (rotary frequencies) stay as they are
        p.data = p.data.to(act)
    report.bytes = model_bytes(model)
    return report


def _quantize_linears(model: nn.Module, fmt: str, act: torch.dtype, source: GGUFInt4, report: WeightReport) -> None:
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight
    params = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or child is head:
                continue
            setattr(parent, child_name, _compact_linear(child, fmt, act, source.blocks.get(params[id(child.weight)]),
                                                        report))
    # Embedding and output projection: one int8 table with a scale per row (kept tied when tied).
    q, s = quantize_int8_rows(embed.weight.detach())
    model.set_input_embeddings(Int8Embedding(q, s.to(act), embed.padding_idx))
    if head is not None:
        if not tied:
            q, s = quantize_int8_rows(head.weight.detach())
        model.set_output_embeddings(Int8RowLinear(q, s.to(act), _bias(head, act)))
        report.count("output int8 (tied to the embedding)" if tied else "output int8")


def _compact_linear(lin: nn.Linear, fmt: str, act: torch.dtype, blocks: tuple | None,
                    report: WeightReport) -> nn.Module:
    w = lin.weight.detach()
    tiles = lin.in_features % GROUP == 0 and lin.out_features % 16 == 0  # the int4 kernel's tiles
    if fmt == "int8" and tiles:
        report.count("int8 (groups of 32)")
        return Int8Linear.from_codes(*quantize_int8(w), dtype=act, bias=_bias(lin, act))
    if fmt in INT4 and tiles:
        if blocks is not None and torch.equal(dequantize_int4(*blocks), w.float()):
            report.count("int4 from GGUF blocks")
        else:
            if blocks is not None:
                report.note = "some GGUF blocks did not reproduce the loaded weights; those were re-quantized"
            blocks = quantize_int4(w)
            report.count("int4")
        dense = w.to(act) if fmt == "int4+bf16" else None
        return Int4Linear(*blocks, dtype=act, bias=_bias(lin, act), dense=dense)
    q, s = quantize_int8_rows(w)
    report.count("int8 per row")
    return Int8RowLinear(q, s.to(act), _bias(lin, act))


def _bias(lin: nn.Module, act: torch.dtype) -> torch.Tensor | None:
    return None if getattr(lin, "bias", None) is None else lin.bias.detach().to(act)


def model_bytes(*modules: nn.Module) -> int:
    """Bytes held by the modules' parameters and buffers, each storage counted once."""
    seen: dict[int, int] = {}
    for t in (t for m in modules for t in [*m.parameters(), *m.buffers()]):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())
