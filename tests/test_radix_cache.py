"""The KV pool's allocator and the radix prefix tree over its slots: matching, splitting,
locking, heap-ordered LRU eviction, slots handed over without copies."""

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from promptkit.engine.kv_pool import KVPool, run_slots, split_runs
from promptkit.engine.radix_cache import RadixCache

L, H, D = 2, 1, 2
BPT = L * 2 * H * D * 4  # bytes per token (float32)


def make_cache(tokens: int) -> RadixCache:
    return RadixCache(KVPool(L, H, D, torch.float32, "cpu", tokens * BPT))


def put(cache: RadixCache, tokens: list[int]) -> list:
    """Slots holding KV whose values encode the token ids (so views can be checked after splits)."""
    runs = cache.pool.alloc(len(tokens))
    assert runs is not None
    cache.pool.kv[:, :, :, run_slots(runs)] = torch.tensor(tokens, dtype=torch.float32).view(1, 1, 1, -1, 1)
    return runs


def insert(cache: RadixCache, tokens: list[int]):
    node, n = cache.match_prefix(tokens)
    return cache.insert(tokens, put(cache, tokens[n:]), n)


def path_tokens(node):
    return [t for n in node.path() for t in n.tokens]


def path_kv_ok(cache, node):
    return all(torch.equal(cache.kv(n)[:, :, :, :, 0], torch.tensor(n.tokens, dtype=torch.float32).expand(L, 2, H, -1))
               for n in node.path())


def test_match_insert_and_split_without_copies():
    c = make_cache(1000)
    node, n = insert(c, [1, 2, 3, 4])
    assert n == 4 and path_tokens(node) == [1, 2, 3, 4]
    node, n = c.match_prefix([1, 2, 9])
    assert n == 2 and path_tokens(node) == [1, 2]  # split inside the edge
    assert c.size_info()["nodes"] == 2 and path_kv_ok(c, node)
    assert c.kv(node).data_ptr() == c.pool.kv[:, :, :, node.start].data_ptr()  # a view of the pool
    node, n = insert(c, [1, 2, 7, 8])
    assert n == 4 and path_tokens(node) == [1, 2, 7, 8] and path_kv_ok(c, node)
    assert c.match_prefix([1, 2, 3, 4, 5], limit=3)[1] == 3
    c.check_integrity()
    assert c.cached_tokens == 6 and c.pool.used == 6


def test_inserting_tokens_already_cached_returns_their_slots():
    c = make_cache(100)
    insert(c, [1, 2, 3])
    runs = put(c, [1, 2, 3, 4])  # a second request computed the same prompt on its own
    node, n = c.insert([1, 2, 3, 4], runs, 0)
    assert n == 4 and c.cached_tokens == 4 and c.pool.used == 4 and path_kv_ok(c, node)
    c.check_integrity()


def test_lru_eviction_spares_locked_and_recent():
    c = make_cache(8)
    a, _ = insert(c, [1, 1, 1, 1])
    b, _ = insert(c, [2, 2, 2, 2])
    c.lock(a)
    c.match_prefix([2, 2, 2, 2])  # b is now more recent, but a is locked
    assert c.evict(4) == 4
    assert c.match_prefix([1, 1, 1, 1])[1] == 4 and c.match_prefix([2, 2, 2, 2])[1] == 0
    assert c.stats.evictions == 1 and c.pool.free_slots == 4
    c.unlock(a)
    c.check_integrity()


def test_eviction_takes_the_least_recently_used_leaf_first():
    c = make_cache(100)
    leaves = [insert(c, [i] * 3)[0] for i in range(1, 6)]
    for i in (3, 1, 4):
        c.match_prefix([i] * 3)
    c.evict(6)  # two leaves: the two never touched again, oldest first
    assert [c.match_prefix([i] * 3)[1] for i in range(1, 6)] == [3, 0, 3, 3, 0]
    assert all(leaf.parent is None for leaf in (leaves[1], leaves[4]))


def test_disabled_cache_matches_nothing():
    c = RadixCache(KVPool(L, H, D, torch.float32, "cpu", 10 * BPT), enabled=False)
    assert c.match_prefix([1, 2]) == (c.root, 0)


def test_pool_refuses_a_budget_below_one_token():
    with pytest.raises(ValueError, match="holds no token"):
        KVPool(L, H, D, torch.float32, "cpu", BPT - 1)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "extend", "free"]), st.integers(1, 12)), max_size=60))
def test_allocator_never_hands_out_a_slot_twice(ops):
    pool = KVPool(L, H, D, torch.float32, "cpu", 40 * BPT)
    held: list[list] = []
    for op, n in ops:
        if op == "alloc":
            runs = pool.alloc(n)
            assert (runs is None) == (n > pool.free_slots + (0 if runs is None else n))
            if runs is not None:
                assert sum(k for _, k in runs) == n
                held.append(runs)
        elif op == "extend" and held:
            start, length = held[-1][-1]
            got = pool.extend(start + length, n)
            held[-1][-1] = (start, length + got)
        elif op == "free" and held:
            pool.free(held.pop(n % len(held)))
        slots = [s for runs in held for a, k in runs for s in range(a, a + k)]
        assert len(slots) == len(set(slots)) == pool.used and pool.high_water >= pool.used
        pool.check()


def test_split_runs():
    assert split_runs([(0, 3), (10, 4)], 5) == ([(0, 3), (10, 2)], [(12, 2)])
    assert split_runs([(0, 3)], 0) == ([], [(0, 3)])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(0, 3), min_size=1, max_size=12), st.booleans(), st.booleans()),
                min_size=1, max_size=25), st.integers(12, 40))
def test_random_workload_keeps_invariants(ops, budget_tokens):
    c = make_cache(budget_tokens)
    held = []
    rng = random.Random(0)
    for tokens, lock, release in ops:
        node, n = c.match_prefix(tokens)
        if n < len(tokens):
            if c.pool.free_slots < len(tokens) - n:
                c.lock(node)
                c.evict(len(tokens) - n - c.pool.free_slots)
                c.unlock(node)
            if c.pool.free_slots >= len(tokens) - n:
                node, n = c.insert(tokens, put(c, tokens[n:]), n)
        assert path_tokens(node) == tokens[:n] and path_kv_ok(c, node)
        if lock:
            c.lock(node)
            held.append((node, path_tokens(node)))
        if release and held:
            c.unlock(held.pop(rng.randrange(len(held)))[0])
        c.check_integrity()
        c.pool.check()
        assert c.cached_tokens == c.pool.used <= c.pool.capacity
        for h, toks in held:  # locked paths are never evicted
            assert (h is c.root or h.parent is not None) and path_tokens(h) == toks
    for h, _ in held:
        c.unlock(h)
    c.clear()
    assert c.cached_tokens == 0 and c.pool.free_slots == c.pool.capacity
    c.check_integrity()


def test_unlock_without_lock_is_an_error():
    c = make_cache(100)
    node, _ = insert(c, [1, 2])
    with pytest.raises(AssertionError):
        c.unlock(node)
