"""A radix tree over token ids whose nodes own runs of KV-pool slots.

Each node's edge is a run of token ids whose KV sits in consecutive pool slots
starting at ``start``. Caching a finished prompt hands its slots to the tree
(nothing is copied); splitting an edge is slot arithmetic. A request locks
the path from the root to the deepest node of its prefix while it runs (a
locked node is never evicted). Unlocked leaves are evicted least recently
used first, from a heap, when the pool needs their slots.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .kv_pool import KVPool, Run, split_runs


@dataclass(eq=False)
class Node:
    tokens: tuple[int, ...] = ()
    start: int = 0  # pool slot of the first token of this edge
    parent: Node | None = None
    children: dict[int, Node] = field(default_factory=dict)
    lock_ref: int = 0
    last_access: int = 0

    @property
    def run(self) -> Run:
        return (self.start, len(self.tokens))

    def path(self) -> list[Node]:
        """Nodes from the first below the root down to this one."""
        out, node = [], self
        while node.parent is not None:
            out.append(node)
            node = node.parent
        return out[::-1]


@dataclass
class CacheStats:
    tokens_requested: int = 0
    tokens_cached: int = 0
    tokens_prefilled: int = 0
    evictions: int = 0
    evicted_tokens: int = 0


def common_prefix_length(a: Sequence[int], b: Sequence[int], start: int = 0) -> int:
    """How many leading tokens of ``a`` equal ``b``'s from ``start`` on."""
    n = 0
    for x, y in zip(a, itertools.islice(b, start, None)):
        if x != y:
            break
        n += 1
    return n


class RadixCache:
    """Token-prefix index over pool slots, with locks and LRU eviction of leaves."""

    def __init__(self, pool: KVPool, enabled: bool = True) -> None:
        self.pool = pool
        self.enabled = enabled
        self.root = Node()
        self.stats = CacheStats()
        self.cached_tokens = 0  # slots the tree owns
        self.locked_tokens = 0  # of those, slots on locked paths
        self._clock = itertools.count(1)
        self._heap: list[tuple[int, int, Node]] = []  # (last access, tiebreak, leaf) candidates
        self._seq = itertools.count()

    def tick(self) -> int:
        """The next time on the LRU clock (shared with the chunk store)."""
        return next(self._clock)

    def kv(self, node: Node) -> torch.Tensor:
        """The node's KV for every layer, ``[layers, 2, kv_heads, n, head_dim]`` (a view)."""
        return self.pool.view(node.run)

    # -- lookup ------------------------------------------------------------
    def match_prefix(self, tokens: list[int], limit: int | None = None) -> tuple[Node, int]:
        """Deepest node covering the longest cached prefix of ``tokens[:limit]``, and its length.

        A match that ends inside an edge splits that node so the returned node
        ends exactly at the match.
        """
        limit = len(tokens) if limit is None else min(limit, len(tokens))
        node, pos, now = self.root, 0, next(self._clock)
        if not self.enabled:
            return node, 0
        while pos < limit:
            child = node.children.get(tokens[pos])
            if child is None:
                break
            n = min(common_prefix_length(child.tokens, tokens, pos), limit - pos)
            if n == 0:
                break
            if n < len(child.tokens):
                child = self._split(child, n)
            child.last_access = now
            node, pos = child, pos + n
        return node, pos

    def _split(self, node: Node, n: int) -> Node:
        """Cut ``node``'s edge after ``n`` tokens; return the new upper node."""
        assert node.parent is not None and 0 < n < len(node.tokens)
        upper = Node(tokens=node.tokens[:n], start=node.start, parent=node.parent, lock_ref=node.lock_ref,
                     last_access=node.last_access)
        node.parent.children[node.tokens[0]] = upper
        node.tokens, node.start, node.parent = node.tokens[n:], node.start + n, upper
        upper.children[node.tokens[0]] = node
        return upper

    # -- insertion ---------------------------------------------------------
    def insert(self, tokens: list[int], runs: list[Run], kv_start: int) -> tuple[Node, int]:
        """Cache ``tokens``, whose KV for ``tokens[kv_start:]`` sits in pool ``runs``.

        The tree takes the slots of tokens it did not hold; the slots of tokens
        it already held are returned to the pool. Either way the caller no
        longer owns ``runs``. Returns the node ending at ``len(tokens)``.
        """
        assert self.enabled and sum(n for _, n in runs) == len(tokens) - kv_start
        node, pos = self.match_prefix(tokens)
        if pos < kv_start:
            raise ValueError(f"insert needs KV from token {pos}, but it starts at {kv_start}")
        dup, runs = split_runs(runs, pos - kv_start)
        self.pool.free(dup)
        now = next(self._clock)
        for start, length in runs:
            child = Node(tokens=tuple(tokens[pos : pos + length]), start=start, parent=node, last_access=now)
            node.children[child.tokens[0]] = child
            self.cached_tokens += length
            node, pos = child, pos + length
        if node.parent is not None and not node.children:
            self._push(node)
        return node, pos

    # -- locking and eviction ---------------------------------------------
    def lock(self, node: Node) -> None:
        """Protect ``node`` and its ancestors from eviction."""
        while node.parent is not None:
            if node.lock_ref == 0:
                self.locked_tokens += len(node.tokens)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: Node) -> None:
        leaf = node
        while node.parent is not None:
            assert node.lock_ref > 0, "unlock without lock"
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.locked_tokens -= len(node.tokens)
            node = node.parent
        if leaf.parent is not None and not leaf.children and leaf.lock_ref == 0:
            self._push(leaf)

    def _push(self, leaf: Node) -> None:
        heapq.heappush(self._heap, (leaf.last_access, next(self._seq), leaf))

    def oldest(self) -> int | None:
        """Last access of the least recently used evictable leaf (None when there is none)."""
        while self._heap:
            t, _, leaf = self._heap[0]
            if leaf.parent is None or leaf.children or leaf.lock_ref:
                heapq.heappop(self._heap)  # gone, grew children or locked since it was pushed
            elif leaf.last_access != t:
                heapq.heappop(self._heap)
                self._push(leaf)  # used since: back in the queue at its new time
            else:
                return t
        return None

    def evict(self, tokens: int) -> int:
        """Free at least ``tokens`` slots from unlocked leaves, least recently used first."""
        freed = 0
        while freed < tokens and self.oldest() is not None:  # the heap's top is now a current leaf
            leaf = heapq.heappop(self._heap)[2]
            parent = leaf.parent
            del parent.children[leaf.tokens[0]]
            leaf.parent = None
            self.pool.free([leaf.run])
            self.cached_tokens -= len(leaf.tokens)
            freed += len(leaf.tokens)
            self.stats.evictions += 1
            self.stats.evicted_tokens += len(leaf.tokens)
            if parent.parent is not None and not parent.children and parent.lock_ref == 0:
                self._push(parent)
        return freed

    def clear(self) -> None:
        """Drop every unlocked node."""
        self.evict(self.cached_tokens + 1)

    # -- reporting ---------------------------------------------------------
    def nodes(self) -> list[Node]:
        out, stack = [], list(self.root.children.values())
        while stack:
            n = stack.pop()
            out.append(n)
            stack.extend(n.children.values())
        return out

    def size_info(self) -> dict[str, int]:
        bpt = self.pool.bytes_per_token
        return {"nodes": len(self.nodes()), "tokens": self.cached_tokens, "bytes": self.cached_tokens * bpt,
                "locked_bytes": self.locked_tokens * bpt,
                "evictable_bytes": (self.cached_tokens - self.locked_tokens) * bpt}

    def check_integrity(self) -> None:
        """Raise AssertionError if the tree's invariants do not hold."""
        total = locked = 0
        for n in self.nodes():
            assert n.parent is not None and n.parent.children.get(n.tokens[0]) is n, "broken parent link"
            assert len(n.tokens) > 0 and 0 <= n.start and n.start + len(n.tokens) <= self.pool.capacity, "bad run"
            assert n.lock_ref >= 0, "negative lock count"
            assert all(c.lock_ref <= n.lock_ref for c in n.children.values()), "child locked more than parent"
            total += len(n.tokens)
            locked += len(n.tokens) if n.lock_ref else 0
        assert total == self.cached_tokens, f"token count drifted: {total} != {self.cached_tokens}"
        assert locked == self.locked_tokens, f"locked count drifted: {locked} != {self.locked_tokens}"
