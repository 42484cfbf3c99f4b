"""A radix tree over token ids whose nodes own the KV of their tokens, for every layer.

Each node's edge is a run of token ids and a tensor ``kv`` of shape
``[layers, 2, kv_heads, n_tokens, head_dim]``. A request locks the path from
the root to the deepest node of its prefix while it runs (a locked node is
never evicted); unlocked leaves are evicted least-recently-used first when an
insertion would exceed ``max_bytes``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch


class CacheBudgetError(ValueError):
    """A request whose KV alone exceeds the cache budget."""


@dataclass(eq=False)
class Node:
    tokens: tuple[int, ...] = ()
    kv: torch.Tensor | None = None
    parent: Node | None = None
    children: dict[int, Node] = field(default_factory=dict)
    lock_ref: int = 0
    last_access: int = 0

    @property
    def nbytes(self) -> int:
        return 0 if self.kv is None else self.kv.numel() * self.kv.element_size()

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


def _common(a: tuple[int, ...], b: list[int] | tuple[int, ...], start: int) -> int:
    n = 0
    for x, y in zip(a, itertools.islice(b, start, None)):
        if x != y:
            break
        n += 1
    return n


class RadixCache:
    """Token-prefix KV cache with LRU eviction under a byte budget."""

    def __init__(self, max_bytes: int, bytes_per_token: int) -> None:
        self.max_bytes = max_bytes
        self.bytes_per_token = bytes_per_token
        self.root = Node()
        self.used_bytes = 0
        self.stats = CacheStats()
        self._clock = itertools.count(1)

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

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
            n = min(_common(child.tokens, tokens, pos), limit - pos)
            if n < len(child.tokens):
                child = self._split(child, n) if n > 0 else None
                if child is None:
                    break
            child.last_access = now
            node, pos = child, pos + n
            if n == 0:
                break
        return node, pos

    def _split(self, node: Node, n: int) -> Node:
        """Cut ``node``'s edge after ``n`` tokens; return the new upper node."""
        assert node.parent is not None and node.kv is not None and 0 < n < len(node.tokens)
        upper = Node(tokens=node.tokens[:n], kv=node.kv[:, :, :, :n].clone(), parent=node.parent,
                     lock_ref=node.lock_ref, last_access=node.last_access)
        node.parent.children[node.tokens[0]] = upper
        node.tokens, node.kv, node.parent = node.tokens[n:], node.kv[:, :, :, n:].clone(), upper
        upper.children[node.tokens[0]] = node
        return upper

    # -- insertion ---------------------------------------------------------
    def insert(self, tokens: list[int], kv: torch.Tensor, kv_start: int) -> tuple[Node, int]:
        """Cache ``tokens`` whose KV for ``tokens[kv_start:]`` is ``kv`` (``[L, 2, H, n, D]``).

        Returns the deepest node now covering a prefix of ``tokens`` and its
        length; that is all of ``tokens`` unless the budget could not make room.
        """
        node, pos = self.match_prefix(tokens)
        if pos >= len(tokens) or not self.enabled:
            return node, pos
        if pos < kv_start:
            raise ValueError(f"insert needs KV from token {pos}, but it starts at {kv_start}")
        new = len(tokens) - pos
        need = new * self.bytes_per_token
        if self.used_bytes + need > self.max_bytes:
            self.lock(node)  # never evict the node we are about to extend
            self.evict(self.used_bytes + need - self.max_bytes)
            self.unlock(node)
            if self.used_bytes + need > self.max_bytes:
                return node, pos
        child = Node(tokens=tuple(tokens[pos:]), kv=kv[:, :, :, pos - kv_start :].clone(), parent=node,
                     last_access=next(self._clock))
        node.children[child.tokens[0]] = child
        self.used_bytes += child.nbytes
        return child, len(tokens)

    # -- locking and eviction ---------------------------------------------
    def lock(self, node: Node) -> None:
        """Protect ``node`` and its ancestors from eviction."""
        while node.parent is not None:
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: Node) -> None:
        while node.parent is not None:
            node.lock_ref -= 1
            assert node.lock_ref >= 0, "unlock without lock"
            node = node.parent

    def evict(self, nbytes: int) -> int:
        """Free at least ``nbytes`` from unlocked leaves, least recently used first."""
        freed = 0
        while freed < nbytes:
            leaves = [n for n in self._nodes() if not n.children and n.lock_ref == 0]
            if not leaves:
                break
            leaf = min(leaves, key=lambda n: n.last_access)
            freed += leaf.nbytes
            self.used_bytes -= leaf.nbytes
            self.stats.evictions += 1
            self.stats.evicted_tokens += len(leaf.tokens)
            del leaf.parent.children[leaf.tokens[0]]  # type: ignore[union-attr]
            leaf.parent, leaf.kv = None, None
        return freed

    def clear(self) -> None:
        """Drop every unlocked node."""
        self.evict(self.used_bytes + 1)

    # -- reporting ---------------------------------------------------------
    def _nodes(self) -> list[Node]:
        out, stack = [], list(self.root.children.values())
        while stack:
            n = stack.pop()
            out.append(n)
            stack.extend(n.children.values())
        return out

    def size_info(self) -> dict[str, int]:
        nodes = self._nodes()
        locked = sum(n.nbytes for n in nodes if n.lock_ref > 0)
        return {"nodes": len(nodes), "tokens": sum(len(n.tokens) for n in nodes), "bytes": self.used_bytes,
                "locked_bytes": locked, "evictable_bytes": self.used_bytes - locked, "max_bytes": self.max_bytes}

    def check_integrity(self) -> None:
        """Raise AssertionError if the tree's invariants do not hold."""
        total = 0
        for n in self._nodes():
            assert n.parent is not None and n.parent.children.get(n.tokens[0]) is n, "broken parent link"
            assert n.kv is not None and n.kv.shape[3] == len(n.tokens) > 0, "KV length differs from edge"
            assert n.lock_ref >= 0, "negative lock count"
            assert all(c.lock_ref <= n.lock_ref for c in n.children.values()), "child locked more than parent"
            keys = [c.tokens[0] for c in n.children.values()]
            assert len(keys) == len(set(keys)), "two children start with the same token"
            total += n.nbytes
        assert total == self.used_bytes, f"byte count drifted: {total} != {self.used_bytes}"
        assert self.used_bytes <= max(self.max_bytes, 0), "cache exceeds its budget"
