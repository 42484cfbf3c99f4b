"""GGUF Q4_1 blocks: read a GGUF file's 4-bit blocks and map them to a transformers model's weights."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .quant import GROUP


def is_q4_gguf(path: str | Path | None) -> bool:
    """Whether a GGUF file holds Q4_1 weights (int4 then keeps their exact numbers), by the quantization
    its name states (the convention of GGUF publishers; the header would mean parsing every tensor's
    metadata). A name that says otherwise only changes the default format, never a number."""
    return path is not None and re.search(r"(?i)(?<![a-z0-9])q4_1(?![0-9])", Path(path).name) is not None


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

# The Q4_1 blocks of a GGUF file (codes, scales, minimums), by the transformers parameter they became.
GGUFInt4 = dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


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
    return {name: q4_1_blocks(raw, tuple(params[name].shape)) for name, raw in rows.items()
            if name in params and params[name].dim() == 2}


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
    from ...models import cache_dir

    if gguf is None:
        return None
    gguf = Path(gguf)
    return cache_dir() / "gguf" / f"{gguf.stem}-{gguf.stat().st_size}.q4_1.safetensors"
