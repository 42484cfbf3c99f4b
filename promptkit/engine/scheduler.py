"""Cache-aware ordering: find the prefixes a batch shares and prefill each once.

Requests are sorted by their token ids, so requests sharing a prefix become
neighbours; the longest prefix each shares with a neighbour is prefilled once
as a prefix job before the requests themselves are admitted (BatchLLM's
global prefix sharing); nested prefixes build on each other, one level per forward.
"""

from __future__ import annotations


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def shared_prefixes(prompts: list[list[int]], min_length: int = 16) -> list[tuple[int, ...]]:
    """Distinct prefixes of at least ``min_length`` tokens that two or more prompts share.

    Each prompt contributes the longest prefix it shares with its neighbour in
    sorted order (capped one token short of either prompt, so every request
    still computes the logits of its last prompt token). Returned shortest first.
    """
    order = sorted(range(len(prompts)), key=lambda i: prompts[i])
    found: set[tuple[int, ...]] = set()
    for a, b in zip(order, order[1:]):
        pa, pb = prompts[a], prompts[b]
        n = min(common_prefix_length(pa, pb), len(pa) - 1, len(pb) - 1)
        if n >= min_length:
            found.add(tuple(pa[:n]))
    return sorted(found, key=len)


def prefix_job_steps(prefixes: list[tuple[int, ...]]) -> list[list[tuple[int, ...]]]:
    """Group prefix jobs (shortest first) into forward steps: a job runs one step after the
    longest job that is its own prefix, so jobs in one step extend already cached prefixes
    and share nothing else worth computing once (their common prefix, if long, is a job too)."""
    depth: dict[tuple[int, ...], int] = {}
    for p in prefixes:
        depth[p] = max((depth[q] + 1 for q in depth if p[: len(q)] == q), default=0)
    steps: list[list[tuple[int, ...]]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
    for p, d in depth.items():
        steps[d].append(p)
    return steps


def longest_prefix_first(matched: list[int]) -> list[int]:
    """Admission order: requests with the longest cached prefix first (they are cheapest and keep it hot)."""
    return sorted(range(len(matched)), key=lambda i: -matched[i])
