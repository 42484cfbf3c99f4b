"""Packing many prompts into one sequence for batched prefill.

Prompts of different lengths go end to end into bins of at most ``budget``
tokens (first-fit decreasing), so a forward pass spends no compute on
padding. Position ids restart per prompt (continuing from each prompt's
cached prefix); attention stays block-diagonal (see ``attention.py``).
"""

from __future__ import annotations

import torch


def first_fit_decreasing(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into bins whose sums stay within ``budget``.

    An item longer than the budget gets a bin of its own (the caller chunks it).
    """
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, r in enumerate(room):
            if lengths[i] <= r:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(budget - lengths[i])
    return bins


def packed_positions(starts: list[int], lengths: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Position ids of a packed sequence: ``start + arange(length)`` per segment."""
    return torch.cat([torch.arange(s, s + n, device=device) for s, n in zip(starts, lengths)])
