"""Weight formats: which one a CPU runs best, and the in-place transform of a model to one."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .cpu import CpuFeatures, cpu_features
from .gguf import GGUFInt4, read_gguf_int4
from .quant import (GROUP, Int4Linear, Int8Embedding, Int8Linear, Int8RowLinear, dequantize_int4, model_bytes,
                    quantize_int4, quantize_int8, quantize_int8_rows)

FORMATS = ("float32", "bfloat16", "int8", "int4", "int4+bf16")
INT4 = ("int4", "int4+bf16")  # the formats whose decoder linears are Int4Linear
DEFAULT_ORDER = ("bfloat16", "float32")  # the default: the first this CPU runs fast (see the README table)


class WeightFormatError(ValueError):
    """A weight format that does not exist or cannot run on the chosen device."""


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
        source = read_gguf_int4(gguf, model, gguf_cache) if gguf and fmt in INT4 else {}
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
            setattr(parent, child_name, _compact_linear(child, fmt, act, source.get(params[id(child.weight)]),
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
