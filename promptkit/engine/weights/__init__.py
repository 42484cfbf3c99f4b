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


# The names of the package, re-exported from its modules.
from .cpu import CpuFeatures, cpu_features  # noqa: F401
from .formats import (DEFAULT_ORDER, FORMATS, INT4,  # noqa: F401
                      WeightFormatError, WeightReport, activation_dtype, apply_format,
                      default_format, resolve_format)
from .gguf import GGUFInt4, gguf_cache_file, is_q4_gguf, q4_1_blocks, read_gguf_int4  # noqa: F401
from .quant import (DENSE_ROWS, GROUP, INT8_DENSE_ROWS,  # noqa: F401
                    Int4Linear, Int8Embedding, Int8Linear, Int8RowLinear,
                    dequantize_int4, fuse_linears, model_bytes, quantize_int4, quantize_int8, quantize_int8_rows)
