"""What this CPU runs fast: its vector ISA, bfloat16 instructions and AMX, and its model name."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch


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
def cpu_features() -> CpuFeatures:
    """Probe this CPU once (torch's cpuinfo, and whether the kernel grants AMX tile data)."""
    listed = bool(torch.cpu._is_amx_tile_supported())
    return CpuFeatures(
        capability=torch.backends.cpu.get_cpu_capability(),
        avx512_bf16=bool(torch.cpu._is_avx512_bf16_supported()),
        amx_listed=listed,
        amx_usable=listed and bool(torch._C._cpu._init_amx()),
    )
