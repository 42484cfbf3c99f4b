"""EngineConfig: every engine setting in one validated place.

The engine, the local backend, ``LM(...)`` keyword options and the CLI all
build one of these, so a setting is named, defaulted and checked once.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .compiled import CompileMode, default_mode
from .selective import ModeSettings, SelectivePrefill
from .sparse import SparseConfig

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


def parse_bytes(value: int | str) -> int:
    """``64MB``, ``2GiB``, ``1_000_000`` or an int -> bytes."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([\d_.]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {value!r} (use bytes, or a number with KB, MB, GB, KiB, MiB or GiB)")
    return int(float(m.group(1).replace("_", "")) * _UNITS[m.group(2).lower()])


class KVReuse(ModeSettings):
    """How a prompt's documents reuse KV computed for each of them alone (the chunk store).

    ``full``: prefill them in place (exact, the reference). ``blend``: take their stored KV,
    re-rotated to where they land, and recompute the ``recompute_ratio`` of their tokens
    whose KV deviates most once they see the real context (measured at ``select_layer``).
    ``sink``: recompute the first ``sink_tokens`` of each document. ``none``: recompute
    nothing. ``"blend"`` alone is accepted for ``KVReuse(mode="blend")``.
    """

    mode: Literal["full", "blend", "sink", "none"] = "full"
    recompute_ratio: float = Field(0.15, ge=0.0, le=1.0, description="blend: share of document tokens recomputed")
    select_layer: int = Field(1, ge=1, description="blend: the layer whose KV deviation picks the tokens "
                              "(the layers before it are recomputed for every token)")
    sink_tokens: int = Field(16, ge=0, description="sink: first tokens of each document recomputed")
    min_chunk_tokens: int = Field(8, ge=1, description="shorter documents are prefilled in place")

    @property
    def reuses(self) -> bool:
        return self.mode != "full"


class EngineConfig(BaseModel):
    """Settings of the local engine.

    ``max_kv_bytes`` bounds *all* KV memory: the prefix cache and the requests
    running. Under pressure the engine evicts unused cached prefixes first,
    then preempts the youngest running request (it is recomputed later).
    """

    model_config = ConfigDict(extra="forbid")

    max_kv_bytes: int = Field(2 << 30, gt=0, description="bytes of KV memory for the cache and running requests "
                              "together (accepts '64MB', '2GiB')")
    prefix_cache: bool = Field(True, description="keep finished prompts' KV to reuse their prefixes")
    max_batch_tokens: int = Field(2048, gt=0, description="tokens per forward: bounds activation memory; "
                                  "longer prefills are chunked")
    max_running: int = Field(64, gt=0, description="requests decoded together")
    share_min_tokens: int = Field(16, ge=1, description="shortest prefix that requests arriving together "
                                  "share to be prefilled once, ahead of them")
    decode_reserve: int = Field(16, ge=1, description="KV slots reserved per request at admission for the "
                                "tokens it will generate (more are taken as it goes)")
    fast_forward: bool = Field(True, description="under a grammar, emit a token the grammar allows alone "
                               "without sampling it (computed with the next token in one forward)")
    lean_forward: bool = Field(True, description="run llama-style models through the engine's lean forward "
                               "(fused weights, same numbers as transformers, far fewer operations)")
    compile_decode: CompileMode = Field(default_factory=default_mode, description="single-stream decode through "
                                        "one compiled graph (CPU, bfloat16 activations): 'auto' loads the cached "
                                        "graph or builds it in a background process, eager until ready; 'cached' "
                                        "never builds; 'build' builds now and waits; 'off' (True: auto, False: off; "
                                        "default $PROMPTKIT_COMPILE_DECODE or auto)")
    sparse: SparseConfig | None = Field(None, description="sparse prefill for long prompts (True: defaults)")
    prefill: SelectivePrefill | None = Field(None, description="selective prefill of generations by default: "
                                             "'filter' (the model's first layers choose the tokens), "
                                             "SelectivePrefill settings, or None (every token)")
    kv_reuse: KVReuse = Field(default_factory=KVReuse, description="default reuse of documents' stored KV for "
                              "requests that mark their documents ('full', 'blend', 'sink' or 'none')")

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        if isinstance(data, dict) and "max_cache_bytes" in data:
            data = dict(data)
            old = parse_bytes(data.pop("max_cache_bytes"))
            warnings.warn("max_cache_bytes is deprecated: use max_kv_bytes (one budget for all KV) and "
                          "prefix_cache=False to turn the cache off", DeprecationWarning, stacklevel=4)
            if old <= 0:
                data.setdefault("prefix_cache", False)
            else:
                data.setdefault("max_kv_bytes", old)
        return data

    @field_validator("max_kv_bytes", mode="before")
    @classmethod
    def _bytes(cls, v: Any) -> int:
        return parse_bytes(v)

    @field_validator("compile_decode", mode="before")
    @classmethod
    def _compile_mode(cls, v: Any) -> Any:
        return {True: "auto", False: "off"}.get(v, v) if isinstance(v, bool) else v

    @field_validator("sparse", mode="before")
    @classmethod
    def _sparse(cls, v: Any) -> Any:
        return (SparseConfig() if v else None) if isinstance(v, bool) else v

    @classmethod
    def split(cls, options: dict[str, Any]) -> tuple[EngineConfig, dict[str, Any]]:
        """Pick this config's fields (and the ``max_cache_bytes`` alias) out of keyword options."""
        names = set(cls.model_fields) | {"max_cache_bytes"}
        mine = {k: v for k, v in options.items() if k in names}
        rest = {k: v for k, v in options.items() if k not in names}
        return cls(**mine), rest
