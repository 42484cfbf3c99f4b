"""Request routers for engine replicas behind Ray Serve (its request-router API).

:class:`PrefixAffinityRouter` sends a request to the replica most likely to hold its
prefix in its KV cache, the idea of Ray Serve LLM's ``PrefixCacheAffinityRouter``,
llm-d's and SGLang's routers. The router remembers, per replica, the chained hashes
of fixed-size blocks of the prompts it sent there (system message first, as the
chat template lays them out), up to a bound per replica, least recently used out
first. A request goes to the replica that matches the most leading blocks, unless
that replica has ``imbalance`` more requests in flight than the least loaded one, or
nothing matches: then it goes to the least loaded replica (fewest remembered blocks
on ties), so a hot prefix never piles its traffic on one replica.

:class:`RandomRouter` picks a replica at random: the baseline.

Requests carry their routing text as ``routing_text`` (see
:class:`~promptkit.distributed.serve.ForwardedRequest`). Each router lives in the
process that holds the handle (the gateway), so its memory is exact for the
requests that gateway sends.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica


def block_hashes(text: str, block_chars: int = 64) -> list[int]:
    """Chained hashes of the text's whole blocks of ``block_chars`` characters (each hash covers the prefix so far)."""
    out, h = [], 0
    for start in range(0, len(text) - block_chars + 1, block_chars):
        h = hash((h, text[start : start + block_chars]))
        out.append(h)
    return out


def routing_text(request: PendingRequest | None) -> str:
    """The text a request is routed by (empty when it carries none)."""
    if request is None:
        return ""
    for arg in request.args:
        text = getattr(arg, "routing_text", None)
        if isinstance(text, str):
            return text
    return ""


class PrefixAffinityRouter(FIFOMixin, RequestRouter):
    """To the replica holding the longest prefix of the request; to the least loaded one when loads are uneven."""

    def initialize_state(self, block_chars: int = 64, imbalance: int = 4, min_match_blocks: int = 1,
                         blocks_per_replica: int = 100_000) -> None:
        """``block_chars``: characters per hashed block. ``imbalance``: requests in flight beyond the least
        loaded replica's past which affinity gives way. ``min_match_blocks``: leading blocks a replica must
        match to be preferred. ``blocks_per_replica``: blocks remembered per replica."""
        self.block_chars, self.imbalance = block_chars, imbalance
        self.min_match_blocks, self.blocks_per_replica = min_match_blocks, blocks_per_replica
        self.blocks: dict[ReplicaID, OrderedDict[int, None]] = {}
        self.in_flight: dict[ReplicaID, int] = {}

    # -- choosing ----------------------------------------------------------------------------
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        hashes = block_hashes(routing_text(pending_request), self.block_chars)
        load = {r.replica_id: self._load(r) for r in candidate_replicas}
        match = {r.replica_id: self._matched(r.replica_id, hashes) for r in candidate_replicas}
        least = min(load.values())
        best = max(candidate_replicas, key=lambda r: (match[r.replica_id], -load[r.replica_id]))
        if match[best.replica_id] >= self.min_match_blocks and load[best.replica_id] - least <= self.imbalance:
            first = best
        else:
            first = min(candidate_replicas, key=lambda r: (load[r.replica_id], len(self.blocks.get(r.replica_id, ())),
                                                           random.random()))
        rest = sorted((r for r in candidate_replicas if r is not first), key=lambda r: load[r.replica_id])
        return [[first], rest] if rest else [[first]]

    def _load(self, replica: RunningReplica) -> int:
        cached = self.replica_queue_len_cache.get(replica.replica_id)
        return max(self.in_flight.get(replica.replica_id, 0), cached or 0)

    def _matched(self, replica_id: ReplicaID, hashes: list[int]) -> int:
        held = self.blocks.get(replica_id)
        if not held:
            return 0
        n = 0
        for h in hashes:
            if h not in held:
                break
            n += 1
        return n

    # -- remembering ---------------------------------------------------------------------------
    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        self.in_flight[replica_id] = self.in_flight.get(replica_id, 0) + 1
        held = self.blocks.setdefault(replica_id, OrderedDict())
        for h in block_hashes(routing_text(pending_request), self.block_chars):
            held[h] = None
            held.move_to_end(h)
        while len(held) > self.blocks_per_replica:
            held.popitem(last=False)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self.in_flight[replica_id] = max(0, self.in_flight.get(replica_id, 0) - 1)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.blocks.pop(replica_id, None)
        self.in_flight.pop(replica_id, None)


class RandomRouter(FIFOMixin, RequestRouter):
    """A replica at random (the others, least loaded first, only when it is full): the baseline."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        first = random.choice(candidate_replicas)
        rest = [r for r in candidate_replicas if r is not first]
        return [[first], rest] if rest else [[first]]
