"""The radix prefix cache: matching, splitting, locking, LRU eviction under a byte budget."""

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from promptkit.engine.radix_cache import RadixCache

L, H, D = 2, 1, 2
BPT = L * 2 * H * D * 4  # bytes per token (float32)


def kv_for(tokens):
    """KV whose values encode the token ids, so slices can be checked after splits."""
    t = torch.tensor(tokens, dtype=torch.float32)
    return t.view(1, 1, 1, -1, 1).expand(L, 2, H, len(tokens), D).contiguous()


def path_tokens(node):
    return [t for n in node.path() for t in n.tokens]


def path_kv_ok(node):
    return all(torch.equal(n.kv, kv_for(list(n.tokens))) for n in node.path())


def test_match_insert_and_split():
    c = RadixCache(max_bytes=1000 * BPT, bytes_per_token=BPT)
    node, n = c.insert([1, 2, 3, 4], kv_for([1, 2, 3, 4]), 0)
    assert n == 4 and path_tokens(node) == [1, 2, 3, 4]
    node, n = c.match_prefix([1, 2, 9])
    assert n == 2 and path_tokens(node) == [1, 2]  # split inside the edge
    assert c.size_info()["nodes"] == 2 and path_kv_ok(node)
    node, n = c.insert([1, 2, 7, 8], kv_for([7, 8]), 2)
    assert n == 4 and path_tokens(node) == [1, 2, 7, 8] and path_kv_ok(node)
    assert c.match_prefix([1, 2, 3, 4, 5], limit=3)[1] == 3
    c.check_integrity()
    assert c.used_bytes == 6 * BPT


def test_lru_eviction_spares_locked_and_recent():
    c = RadixCache(max_bytes=8 * BPT, bytes_per_token=BPT)
    a, _ = c.insert([1, 1, 1, 1], kv_for([1, 1, 1, 1]), 0)
    b, _ = c.insert([2, 2, 2, 2], kv_for([2, 2, 2, 2]), 0)
    c.lock(a)
    c.match_prefix([2, 2, 2, 2])  # b is now more recent, but a is locked
    node, n = c.insert([3, 3, 3, 3], kv_for([3, 3, 3, 3]), 0)
    assert n == 4 and c.match_prefix([1, 1, 1, 1])[1] == 4 and c.match_prefix([2, 2, 2, 2])[1] == 0
    assert c.stats.evictions == 1
    c.unlock(a)
    c.check_integrity()


def test_insert_that_cannot_fit_is_skipped():
    c = RadixCache(max_bytes=4 * BPT, bytes_per_token=BPT)
    a, _ = c.insert([1, 2, 3], kv_for([1, 2, 3]), 0)
    c.lock(a)
    node, n = c.insert([5, 6, 7], kv_for([5, 6, 7]), 0)
    assert n == 0 and c.used_bytes == 3 * BPT
    c.unlock(a)
    c.check_integrity()


def test_disabled_cache_matches_nothing():
    c = RadixCache(max_bytes=0, bytes_per_token=BPT)
    assert c.insert([1, 2], kv_for([1, 2]), 0)[1] == 0
    assert c.match_prefix([1, 2])[1] == 0 and c.used_bytes == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(0, 3), min_size=1, max_size=12), st.booleans(), st.booleans()),
                min_size=1, max_size=25), st.integers(4, 40))
def test_random_workload_keeps_invariants(ops, budget_tokens):
    c = RadixCache(max_bytes=budget_tokens * BPT, bytes_per_token=BPT)
    held = []
    rng = random.Random(0)
    for tokens, lock, release in ops:
        node, n = c.match_prefix(tokens)
        if n < len(tokens):
            node, n = c.insert(tokens, kv_for(tokens[n:]), n)
        assert path_tokens(node) == tokens[:n] and path_kv_ok(node)
        if lock:
            c.lock(node)
            held.append((node, path_tokens(node)))
        if release and held:
            c.unlock(held.pop(rng.randrange(len(held)))[0])
        c.check_integrity()
        assert c.used_bytes <= c.max_bytes
        for h, toks in held:  # locked paths are never evicted
            assert (h is c.root or h.parent is not None) and path_tokens(h) == toks
    for h, _ in held:
        c.unlock(h)
    c.clear()
    assert c.used_bytes == 0
    c.check_integrity()


def test_unlock_without_lock_is_an_error():
    c = RadixCache(max_bytes=100 * BPT, bytes_per_token=BPT)
    node, _ = c.insert([1, 2], kv_for([1, 2]), 0)
    with pytest.raises(AssertionError):
        c.unlock(node)
