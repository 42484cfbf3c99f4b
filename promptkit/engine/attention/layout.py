"""Which keys each query of a packed forward reads: the batch layout the attention backend plans from.

The model runs on one packed sequence: the new tokens of every request laid
end to end. Each request's keys are the KV of its cached prefix, a path of
radix-tree nodes shared with other requests, followed by its own pool slots.
Queries of all requests that share a node attend to it in one product (as in
Hydragen / cascade attention); their partial results merge by log-sum-exp.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..kv_pool import Run, merge_runs, run_slots

SHORT_SEGMENT = 64  # segments up to this long (with a cached past) share one padded product
PAD_KEYS = 4096  # ... while their keys together are this few (copying more every layer costs more than it saves)
IN_PLACE_RUN = 1024  # a decode token reads a run of this many keys in place (a copy every layer costs more)


@dataclass
class SegmentLayout:
    """One request's slice of the packed sequence.

    Its keys are positions ``0 .. context``: a cached prefix (``prefix`` runs, positions
    ``0 .. prefix_len``) then its own tokens (``own`` runs, the new ones last). The first
    ``shared_len`` positions come from prefix groups other segments of the batch share; the
    segment attends to the rest, ``keys``, by itself (``past`` of them precede its new tokens).
    """

    start: int  # first row in the packed sequence
    length: int  # new tokens in this forward
    own: list[Run]  # pool runs of the request's own tokens, these new ones included
    own_past: int  # own tokens whose KV was computed before this forward
    prefix: list[Run] = field(default_factory=list)
    prefix_len: int = 0
    shared_len: int = 0
    keys: list[Run] = field(default_factory=list)  # runs of positions shared_len .. context
    sparse: bool = False  # attend to prefix + own at once through the sparse kernel (a long prefill)
    # Scattered queries (recomputing tokens among reused KV): the position of each new token; the
    # segment attends to prefix + own (which ends at its last position), key j seen by a query at p
    # when j <= p. ``own_past`` is then 0 and the new tokens' slots are anywhere in ``own``.
    positions: torch.Tensor | None = None

    @property
    def past(self) -> int:
        """Keys in ``keys`` before the first new token (the causal offset)."""
        return self.prefix_len - self.shared_len + self.own_past

    @property
    def context(self) -> int:
        """Keys the last new token sees (its position + 1)."""
        if self.positions is not None:
            return self.prefix_len + sum(n for _, n in self.own)
        return self.prefix_len + self.own_past + self.length

    @property
    def short(self) -> bool:
        """A few new tokens over a cached past (decode steps, a question after a cached prefix)."""
        return self.length <= SHORT_SEGMENT and self.past > 0 and not self.sparse and self.positions is None


@dataclass
class BatchLayout:
    """The segments of one forward, the prefix groups they share, and where the new K/V go."""

    segments: list[SegmentLayout]
    # runs of cached prefix KV (consecutive on a path) -> packed rows of every query that sees them whole
    prefix_groups: list[tuple[list[Run], torch.Tensor]] = field(default_factory=list)
    write_slots: torch.Tensor | None = None  # [T] pool slot of each packed row's new key and value


@dataclass
class ShortPlan:
    """Short segments whose keys are few enough to be copied into one padded product."""

    rows: torch.Tensor  # [R] packed rows, segment order
    key_idx: torch.Tensor  # [B, N] pool slot of each key (padded with slot 0)
    query_idx: torch.Tensor  # [B, M] packed row of each query (padded with row 0)
    bias: torch.Tensor  # [B, 1, M, N] 0 where a query sees a key, -inf elsewhere
    valid: torch.Tensor  # [B, M] real (not padding) queries


def plan_short(segs: list[SegmentLayout], device: torch.device, dtype: torch.dtype) -> ShortPlan:
    lengths = [s.length for s in segs]
    n_keys = [s.past + s.length for s in segs]
    m, n = max(lengths), max(n_keys)
    rows = torch.cat([torch.arange(s.start, s.start + s.length) for s in segs])
    query_idx = torch.zeros(len(segs), m, dtype=torch.long)
    key_idx = torch.zeros(len(segs), n, dtype=torch.long)
    for i, s in enumerate(segs):
        query_idx[i, : s.length] = torch.arange(s.start, s.start + s.length)
        key_idx[i, : n_keys[i]] = torch.cat([torch.arange(a, a + k) for a, k in s.keys])
    past = torch.tensor([s.past for s in segs])
    allowed = torch.arange(n)[None, None, :] <= (past[:, None] + torch.arange(m)[None, :])[..., None]
    bias = torch.zeros(len(segs), 1, m, n, dtype=dtype).masked_fill_(~allowed[:, None], float("-inf"))
    valid = torch.arange(m)[None, :] < torch.tensor(lengths)[:, None]
    return ShortPlan(rows.to(device), key_idx.to(device), query_idx.to(device), bias.to(device), valid.to(device))


def one_step_keys(layout: BatchLayout, device: torch.device) -> tuple[list[Run], torch.Tensor | None] | None:
    """For a forward of one new token of one request (single-stream decode), its keys: the runs of
    at least :data:`IN_PLACE_RUN` slots (read in place) and the slot indices of the others
    (gathered into one block); None for any other forward."""
    if len(layout.segments) != 1 or layout.prefix_groups:
        return None
    seg = layout.segments[0]
    if seg.length != 1 or seg.positions is not None or seg.sparse or seg.shared_len:
        return None
    runs = merge_runs(seg.keys)
    whole = [r for r in runs if r[1] >= IN_PLACE_RUN or len(runs) == 1]
    rest = [r for r in runs if r not in whole]
    return whole, run_slots(rest, device) if rest else None


def gather_kv(pool_kv: torch.Tensor, runs: list[Run]) -> torch.Tensor:
    """``pool_kv`` [kv_heads, slots, head_dim] at ``runs``: a view for one run, else a copy."""
    runs = merge_runs(runs)
    if len(runs) == 1:
        return pool_kv[:, runs[0][0] : runs[0][0] + runs[0][1]]
    return torch.cat([pool_kv[:, s : s + n] for s, n in runs], dim=1)
