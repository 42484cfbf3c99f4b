"""Attention over the engine's KV pool: one backend per forward (``backend.py``), planned from the
batch layout (``layout.py``), with each kernel in a file of its own and one log-sum-exp merge."""

from .backend import ATTN_NAME, AttentionBackend, active, attend_lse, hf_attention, register
from .layout import BatchLayout, SegmentLayout, gather_kv
from .matmul import attend_lse_blocks
from .merge import merge_lse

__all__ = ["ATTN_NAME", "AttentionBackend", "active", "attend_lse", "hf_attention", "register", "BatchLayout",
           "SegmentLayout", "gather_kv", "attend_lse_blocks", "merge_lse"]
