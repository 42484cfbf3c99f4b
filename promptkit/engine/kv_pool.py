"""The one KV memory pool: token slots that hold every key and value the engine keeps.

One tensor ``kv[layer, 0 (key) | 1 (value), kv_head, slot, head_dim]`` sized
by the byte budget. Cached prefixes (radix-tree nodes) and running requests
both own runs of slots in it; nothing else holds KV, so the budget bounds
all of it. Slots are handed out as contiguous runs where possible (first fit,
growing a run in place when the slots after it are free), so the KV of a
prompt is usually one view and attention reads it without a gather.
"""

from __future__ import annotations

import bisect

import torch

Run = tuple[int, int]  # (first slot, number of slots)


class KVBudgetError(ValueError):
    """A request whose KV alone does not fit the engine's KV budget."""


class KVPool:
    """Slot storage and a free-run allocator."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, max_bytes: int) -> None:
        self.bytes_per_token = num_layers * 2 * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
        self.capacity = max_bytes // self.bytes_per_token
        if self.capacity < 1:
            raise KVBudgetError(f"a KV budget of {max_bytes:,} bytes holds no token: one token of this model "
                                f"needs {self.bytes_per_token:,} bytes")
        # Untouched pages of a CPU allocation cost no memory; the budget is an upper bound.
        self.kv = torch.empty(num_layers, 2, kv_heads, self.capacity, head_dim, dtype=dtype, device=device)
        self._free: list[Run] = [(0, self.capacity)]  # sorted by start, never adjacent
        self.free_slots = self.capacity
        self.high_water = 0

    @property
    def used(self) -> int:
        return self.capacity - self.free_slots

    def view(self, run: Run) -> torch.Tensor:
        """The KV of a run for every layer: ``[layers, 2, kv_heads, n, head_dim]`` (no copy)."""
        return self.kv[:, :, :, run[0] : run[0] + run[1]]

    # -- allocation ----------------------------------------------------------------------
    def alloc(self, n: int, roomy: bool = False) -> list[Run] | None:
        """``n`` slots, as one run when a free run is long enough; None when fewer are free.
        The first free run that fits, or with ``roomy`` the longest (so the run can grow in place)."""
        if n <= 0:
            return []
        if n > self.free_slots:
            return None
        fits = [i for i, (_, length) in enumerate(self._free) if length >= n]
        if fits:
            i = max(fits, key=lambda j: self._free[j][1]) if roomy else fits[0]
            start = self._free[i][0]
            self._take(i, n)
            return [(start, n)]
        runs = []  # fragmented: largest runs first, so the request gets few pieces
        while n > 0:
            i = max(range(len(self._free)), key=lambda j: self._free[j][1])
            start, length = self._free[i]
            take = min(n, length)
            self._take(i, take)
            runs.append((start, take))
            n -= take
        return runs

    def extend(self, end: int, n: int) -> int:
        """Take up to ``n`` free slots starting exactly at ``end`` (growing a run in place)."""
        i = bisect.bisect_left(self._free, (end, 0))
        if i == len(self._free) or self._free[i][0] != end or n <= 0:
            return 0
        take = min(n, self._free[i][1])
        self._take(i, take)
        return take

    def _take(self, i: int, n: int) -> None:
        start, length = self._free[i]
        if n == length:
            del self._free[i]
        else:
            self._free[i] = (start + n, length - n)
        self.free_slots -= n
        self.high_water = max(self.high_water, self.used)

    def free(self, runs: list[Run]) -> None:
        """Return runs to the pool (merging neighbours)."""
        for start, length in runs:
            if length <= 0:
                continue
            self.free_slots += length
            i = bisect.bisect_left(self._free, (start, 0))
            if i > 0:
                assert self._free[i - 1][0] + self._free[i - 1][1] <= start, "freeing a free slot"
            if i < len(self._free):
                assert start + length <= self._free[i][0], "freeing a free slot"
            if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == start:  # join the run before
                i -= 1
                start, length = self._free[i][0], self._free[i][1] + length
                del self._free[i]
            if i < len(self._free) and start + length == self._free[i][0]:  # join the run after
                length += self._free[i][1]
                del self._free[i]
            self._free.insert(i, (start, length))

    def check(self) -> None:
        """Raise AssertionError if the free list is inconsistent."""
        end = -1
        for start, length in self._free:
            assert length > 0 and start > end, "free runs overlap or touch"
            end = start + length
        assert end <= self.capacity and self.free_slots == sum(n for _, n in self._free), "free count drifted"


def split_runs(runs: list[Run], n: int) -> tuple[list[Run], list[Run]]:
    """The first ``n`` slots of ``runs`` and the rest."""
    head, tail = [], []
    for start, length in runs:
        if n >= length:
            head.append((start, length))
            n -= length
        elif n > 0:
            head.append((start, n))
            tail.append((start + n, length - n))
            n = 0
        else:
            tail.append((start, length))
    return head, tail


def merge_runs(runs: list[Run]) -> list[Run]:
    """Adjacent runs joined, so consecutive slots are read as one view."""
    out: list[Run] = []
    for s, n in runs:
        if out and out[-1][0] + out[-1][1] == s:
            out[-1] = (out[-1][0], out[-1][1] + n)
        elif n:
            out.append((s, n))
    return out


def run_slots(runs: list[Run], device: torch.device | str = "cpu") -> torch.Tensor:
    """Slot indices of ``runs`` in order, as one LongTensor."""
    if len(runs) == 1:
        return torch.arange(runs[0][0], runs[0][0] + runs[0][1], device=device)
    return torch.cat([torch.arange(s, s + n) for s, n in runs]).to(device) if runs else \
        torch.empty(0, dtype=torch.long, device=device)
