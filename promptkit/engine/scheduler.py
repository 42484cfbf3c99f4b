"""Admission, planning and retiring: which requests run, on which KV slots, in which forward.

Admission takes waiting requests while the KV pool has slots for their
uncached prompt (evicting unused cached prefixes and stored chunks, least
recently used first, to make room). Planning
packs one token per decoding request and then prefill chunks of the others
into one forward of at most ``max_batch_tokens``; a request that needs a slot
the pool cannot give preempts the youngest running request, which frees its
slots and waits to be recomputed. Retiring hands a request's KV to the prefix
cache (or frees it) and releases its locks, on every path.

Cache-aware ordering: requests arriving together are sorted by token ids, so
requests sharing a prefix become neighbours, and each prefix two of them share
is prefilled once as a prefix job before they are admitted (BatchLLM's global
prefix sharing); nested prefixes build on each other, one level per forward.
"""

from __future__ import annotations

import itertools
from collections import deque

from .chunk_store import ChunkStore
from .config import EngineConfig
from .kv_pool import KVPool, split_runs
from .radix_cache import Node, RadixCache, common_prefix_length
from .request import Kind, KVState, Request


class Scheduler:
    """Queues of waiting and running requests over one KV pool and its prefix tree."""

    def __init__(self, pool: KVPool, cache: RadixCache, config: EngineConfig,
                 store: ChunkStore) -> None:
        self.pool, self.cache, self.config, self.store = pool, cache, config, store
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.preemptions = 0
        self.stalled: list[Request] = []  # running requests the pool cannot give one more slot
        self._admission = itertools.count()

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- admission ---------------------------------------------------------------------
    def window(self) -> list[Request]:
        """The waiting requests the next admission may take (as many as there is room to run)."""
        room = self.config.max_running - len(self.running)
        return list(itertools.islice(self.waiting, max(0, room)))

    def admit(self) -> tuple[list[Request], list[tuple[Request, Exception]]]:
        """Move waiting requests into ``running`` while their KV fits. Returns those admitted and
        those whose admission raised (taken out of the queue, their KV released).

        Requests recomputing after a preemption go first; among the others the
        longest cached prefix goes first (cheapest, and it keeps that prefix hot).
        """
        window = self.window()
        if not window:
            return [], []
        matches = {id(r): self.cache.match_prefix(r.tokens, self._match_limit(r)) for r in window}
        order = sorted(window, key=lambda r: (r.kv.preemptions == 0, -matches[id(r)][1]))
        admitted, failed = [], []
        for r in order:
            try:
                if not self._admit_one(r, *matches[id(r)]):
                    break  # keep arrival order: later requests wait for this one
                admitted.append(r)
            except Exception as e:
                self.retire(r, keep=False)
                failed.append((r, e))
        return admitted, failed

    def _admit_one(self, r: Request, node: Node, n: int) -> bool:
        if node.parent is None and n:  # evicted since it was matched (making room for another)
            node, n = self.cache.match_prefix(r.tokens, self._match_limit(r))
        need = len(r.tokens) - n
        reserve = min(self.config.decode_reserve, r.params.max_tokens) if r.kind == Kind.GENERATE else 0
        if not self._make_room(need + reserve, protect=node):
            if self.running or not self._make_room(need, protect=node):
                return False
            reserve = 0  # alone: it takes slots for its output as it goes
        need += reserve
        self.cache.lock(node)
        r.kv.node, r.kv.cached_len, r.kv.own_len = node, n, 0
        # A request that will decode takes the longest free run, where its output extends it in place.
        r.kv.runs = self.pool.alloc(need, roomy=reserve > 0) or []
        self.waiting.remove(r)
        self.running.append(r)
        r.kv.admitted_seq = next(self._admission)
        if r.kv.preemptions == 0:
            r.counts.matched_len = n
            self.cache.stats.tokens_requested += r.prompt_len
            self.cache.stats.tokens_cached += n
        return True

    @staticmethod
    def _match_limit(r: Request) -> int:
        # Leave at least one token to compute: its logits are what the request needs. A cached
        # prefix serves selective prefill only where its tokens still sit at their own positions.
        return min(r.score_from - 1 if r.kind == Kind.SCORE else len(r.tokens) - 1, r.natural_len)

    def _make_room(self, need: int, protect: Node | None = None) -> bool:
        """Evict unused cached prefixes until ``need`` slots are free (never ``protect``'s path)."""
        if self.pool.free_slots >= need:
            return True
        if protect is not None:
            self.cache.lock(protect)
        if not len(self.store):
            self.cache.evict(need - self.pool.free_slots)
        else:  # the least recently used of tree leaves and stored chunks goes first
            while self.pool.free_slots < need:
                leaf, chunk = self.cache.oldest(), self.store.oldest()
                if leaf is None and chunk is None:
                    break
                if chunk is not None and (leaf is None or chunk < leaf):
                    self.store.evict(1)
                else:
                    self.cache.evict(1)
        if protect is not None:
            self.cache.unlock(protect)
        return self.pool.free_slots >= need

    def start_job(self, tokens: list[int], match_limit: int | None = None) -> Request | None:
        """An internal prefix job, admitted outside ``running``, computing ``tokens`` past their cached
        prefix (at most ``match_limit`` tokens of it); None when all are cached or the pool has no
        room (a job is an optimisation, never a reason to preempt)."""
        r = Request(tokens=tokens, kind="prefix")
        node, n = self.cache.match_prefix(r.tokens, match_limit)
        if n >= len(tokens) or not self._make_room(len(tokens) - n, protect=node):
            return None
        self.cache.lock(node)
        r.kv.node, r.kv.cached_len, r.kv.runs = node, n, self.pool.alloc(len(tokens) - n) or []
        return r

    def rematch(self, r: Request) -> None:
        """Before ``r`` computed anything: take a longer cached prefix if one appeared since its
        admission (its own slots for those tokens go back to the pool)."""
        kv = r.kv
        assert kv.own_len == 0 and kv.node is not None
        node, n = self.cache.match_prefix(r.tokens, self._match_limit(r))
        if n <= kv.cached_len:
            return
        self.cache.lock(node)
        self.cache.unlock(kv.node)
        head, kv.runs = split_runs(kv.runs, n - kv.cached_len)
        self.pool.free(head)
        kv.node, kv.cached_len = node, n

    # -- planning ------------------------------------------------------------------------
    def plan(self, jobs: list[Request] | None = None) -> list[tuple[Request, int]]:
        """One forward: a token for every decoding request (oldest first), then the first
        first-fit-decreasing bin of prefill work in the remaining budget (a prompt longer than
        the budget is chunked). Every planned token has a KV slot when this returns.

        ``jobs``: plan these internal requests (prefix jobs) instead of the running ones.
        """
        internal = jobs is not None
        reqs = sorted((r for r in (jobs if internal else self.running) if r.pending > 0),
                      key=lambda r: r.kv.admitted_seq)
        batch = [(r, 1) for r in reqs if r.pending == 1][: self.config.max_batch_tokens]
        room = self.config.max_batch_tokens - len(batch)
        prefilling = [r for r in reqs if r.pending > 1]
        left = room
        for r in sorted(prefilling, key=lambda r: -r.pending) if room > 0 else ():  # first fit, decreasing
            if r.pending <= left or left == room:  # the longest always (chunked when over the budget)
                batch.append((r, min(r.pending, left)))
                left -= r.pending
        planned = []
        for r, n in batch:
            if not internal and r not in self.running:
                continue  # preempted while making room for an earlier row
            if self._reserve(r, n, internal):
                planned.append((r, n))
            elif not internal and r in self.running:
                self.stalled.append(r)  # alone and out of room: the engine ends it
        return [(r, n) for r, n in planned if internal or r in self.running]

    def _grow(self, r: Request, short: int) -> list:
        """New slots for ``r`` when its last run cannot grow in place. A decoding request takes up to
        ``decode_reserve`` of them from the longest free run, where later tokens extend it in place:
        its slots stay in few runs, which a decode step reads without gathering."""
        if r.kind == Kind.GENERATE and short < self.config.decode_reserve:
            left = r.params.max_tokens - len(r.generated)
            chunk = min(self.config.decode_reserve, max(short, left), self.pool.free_slots)
            if chunk >= short:
                return self.pool.alloc(chunk, roomy=True) or []
        return self.pool.alloc(short) or []

    def _reserve(self, r: Request, n: int, internal: bool) -> bool:
        """Make sure ``r`` holds slots for ``n`` more tokens: grow its last run in place, else take
        a new run, evicting cached prefixes and then preempting the youngest running request."""
        kv = r.kv
        while (short := kv.own_len + n - kv.capacity) > 0:
            if kv.runs:
                start, length = kv.runs[-1]
                got = self.pool.extend(start + length, short)
                if got:
                    kv.runs[-1] = (start, length + got)
                    continue
            if self._make_room(short):
                kv.runs.extend(self._grow(r, short))
                continue
            if internal:
                return False
            victim = max(self.running, key=lambda x: x.kv.admitted_seq)
            if victim is r and len(self.running) == 1:
                return False  # alone and out of room: the caller ends it
            self.preempt(victim)
            if victim is r:
                return False
        return True

    def preempt(self, r: Request) -> None:
        """Free ``r``'s KV and put it first in line; it recomputes its tokens when readmitted."""
        self._release(r)
        self.running.remove(r)
        r.kv.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(r)

    # -- progress and retiring -------------------------------------------------------------
    def advance(self, r: Request, n: int) -> None:
        """``n`` more of ``r``'s tokens now have KV."""
        kv = r.kv
        if kv.todo is not None:  # an assembled prefill: the rest of the prompt is reused KV
            self.cache.stats.tokens_prefilled += n
            kv.todo = kv.todo[n:]
            if not kv.todo:
                kv.todo, kv.own_len = None, r.prompt_len - kv.cached_len
            return
        if r.computed < r.prompt_len:
            self.cache.stats.tokens_prefilled += min(n, r.prompt_len - r.computed)
        kv.own_len += n

    def cache_prompt(self, r: Request, upto: int) -> None:
        """Hand the KV of ``r.tokens[:upto]`` to the prefix tree and continue from that node."""
        kv = r.kv
        if kv.exact_len is not None:
            upto = min(upto, kv.exact_len)  # reused KV is close, not exact: never served as a prefix
        upto = min(upto, r.natural_len)  # nor is selective prefill's, past its first skipped token
        if not self.cache.enabled or upto <= kv.cached_len:
            return
        done = upto - kv.cached_len
        head, kv.runs = split_runs(kv.runs, done)
        node, _ = self.cache.insert(r.tokens[:upto], head, kv.cached_len)
        self.cache.lock(node)
        if kv.node is not None:
            self.cache.unlock(kv.node)
        kv.node, kv.cached_len, kv.own_len = node, upto, kv.own_len - done

    def retire(self, r: Request, keep: bool) -> None:
        """Take ``r`` out of the queues and release its KV; with ``keep``, cache its computed
        tokens (generations: prompt and output; scores: the prompt) before freeing the rest."""
        if keep and self.cache.enabled:
            upto = r.score_from if r.kind == Kind.SCORE else r.computed
            self.cache_prompt(r, min(upto, r.computed))
        self._release(r)
        if r in self.running:
            self.running.remove(r)
        elif r in self.waiting:
            self.waiting.remove(r)

    def _release(self, r: Request) -> None:
        self.pool.free(r.kv.runs)
        if r.kv.node is not None:
            self.cache.unlock(r.kv.node)
        r.kv = KVState(preemptions=r.kv.preemptions)  # a preempted assembly starts over

    def check(self) -> None:
        """Raise AssertionError unless every pool slot is free, cached or owned by one request."""
        self.pool.check()
        self.cache.check_integrity()
        owned = sum(r.kv.capacity for r in self.running)
        held = self.cache.cached_tokens + self.store.tokens + owned
        assert held + self.pool.free_slots == self.pool.capacity, "slots leaked"
        assert not any(r.kv.runs or r.kv.node for r in self.waiting), "a waiting request holds KV"


# -- cache-aware ordering ------------------------------------------------------------------
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


def shareable(r: Request) -> int:
    """Prompt tokens worth sharing as a prefix job: a score request's context; never a document
    that the request reuses from the chunk store."""
    n = min(r.score_from if r.kind == Kind.SCORE else len(r.tokens), r.natural_len)
    if r.reuse is not None and r.reuse.config.reuses and r.reuse.spans:
        n = min(n, r.reuse.spans[0][0])
    return n
