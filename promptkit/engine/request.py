"""A request: one generation, scoring or prefix-prefill job, and its progress.

A request is what the caller asks (tokens, kind, sampling, documents to reuse,
positions), where its KV lives (:class:`KVState`), what serving it cost
(:class:`Counts`) and its output. Its tokens are the prompt followed by what it
has generated. The engine loop alone changes a request; callers wait on
``future`` (or read ``events`` when streaming).
"""

from __future__ import annotations

import itertools
import queue
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from ..backends.base import SamplingParams
from .config import KVReuse
from .kv_pool import KVBudgetError, Run
from .radix_cache import Node

if TYPE_CHECKING:
    from ..structured import LogitsProcessor

_ids = itertools.count()


class Kind(StrEnum):
    """What a request asks of the engine."""

    GENERATE = "generate"  # sample tokens after the prompt
    SCORE = "score"  # log-probabilities of the prompt's tokens from ``score_from`` on
    PREFIX = "prefix"  # only prefill the prompt into the prefix cache


@dataclass
class Reuse:
    """Documents of a prompt whose KV may come from the chunk store, and how."""

    config: KVReuse
    spans: list[tuple[int, int]]  # token positions [start, end) of each document, in order
    lead_in: tuple[int, ...] | None = None  # tokens the documents are encoded after (None: the store's
    # lead-in if it has one, else the prompt's tokens before its first document)


@dataclass
class KVState:
    """Where a request's KV lives; the engine loop alone changes it.

    The first ``cached_len`` tokens are in the radix tree (the locked path ending at ``node``),
    the rest in the request's own pool ``runs``, of which ``own_len`` are computed. A request
    whose documents reuse stored KV has its own slots filled from the chunk store first; then only
    the positions in ``todo`` are computed (those still to compute stay in it).
    """

    node: Node | None = None
    cached_len: int = 0
    runs: list[Run] = field(default_factory=list)
    own_len: int = 0
    todo: list[int] | None = None  # ascending
    exact_len: int | None = None  # KV past this position is reused (never handed to the prefix tree)
    admitted_seq: int = -1  # admission order (the youngest is preempted first)
    preemptions: int = 0

    @property
    def capacity(self) -> int:
        """Own slots held (computed or reserved)."""
        return sum(n for _, n in self.runs)


@dataclass
class Counts:
    """What serving a request took, reported in its usage."""

    matched_len: int = 0  # prompt tokens served from the cache at first admission
    reused_tokens: int = 0  # prompt tokens whose KV came from the chunk store and was kept
    recomputed_tokens: int = 0  # document tokens taken from the store, then recomputed in context
    stored_tokens: int = 0  # document tokens encoded alone into the store for this request


@dataclass(eq=False)
class Request:
    """One job for the engine. ``tokens`` is copied: the caller's list is never changed."""

    tokens: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    kind: Kind = Kind.GENERATE
    score_from: int = 0  # score: first token whose log-probability is wanted
    stop_check: Callable[[list[int]], bool] | None = None  # called with the generated tokens after each one
    processor: LogitsProcessor | None = None  # grammar mask, penalties, logit bias
    id: int = field(default_factory=lambda: next(_ids))
    prompt_len: int = 0
    reuse: Reuse | None = None
    # Selective prefill: the position of each prompt token, the prompt being a subset of a longer one
    # whose tokens keep their positions; generated tokens follow the last. None: the token indices.
    positions: list[int] | None = None
    kv: KVState = field(default_factory=KVState)
    counts: Counts = field(default_factory=Counts)
    # output
    first_token_seconds: float | None = None
    generated: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # (token id, logprob) per step
    finished: bool = False
    finish_reason: str = ""
    error: BaseException | None = None
    aborted: bool = False
    seed: int = 0  # sampling seed (drawn at submit when the params give none)
    started: float = field(default_factory=time.perf_counter)
    seconds: float = 0.0
    future: Future = field(default_factory=Future)
    events: queue.SimpleQueue | None = None  # streaming: token ids, then None (done) or an exception

    def __post_init__(self) -> None:
        self.kind = Kind(self.kind)  # a plain string is accepted, and an unknown one refused here
        self.tokens = list(self.tokens)
        self.prompt_len = len(self.tokens)

    @property
    def computed(self) -> int:
        """Tokens before which every position has KV."""
        kv = self.kv
        return kv.todo[0] if kv.todo else kv.cached_len + kv.own_len

    @property
    def pending(self) -> int:
        """Tokens whose KV the next forwards must compute before the request can sample or finish."""
        return len(self.tokens) - self.computed if self.kv.todo is None else len(self.kv.todo)

    def position(self, index: int) -> int:
        """The position (RoPE) of token ``index``."""
        if self.positions is None:
            return index
        if index < len(self.positions):
            return self.positions[index]
        return self.positions[-1] + 1 + index - len(self.positions)

    @property
    def natural_len(self) -> int:
        """Leading tokens at their own index as position: the KV a plain prefill of them gives, so
        a prefix the cache may serve or keep (every token, without selective prefill)."""
        if self.positions is None:
            return len(self.tokens)
        gap = next((i for i, p in enumerate(self.positions) if p != i), None)
        return len(self.tokens) if gap is None else gap

    def todo_positions(self, n: int) -> list[int] | None:
        """Positions of the next ``n`` tokens to compute when they are scattered (an assembled
        prefill), else None (they are ``computed .. computed + n``)."""
        return None if self.kv.todo is None else self.kv.todo[:n]

    def check(self, kv_slots: int, bytes_per_token: int, layers: int) -> None:
        """Refuse a request no engine step could serve (a clear error before it is queued)."""
        if not self.tokens:
            raise ValueError("empty request: no tokens")
        if self.kind == "score" and not 0 < self.score_from < len(self.tokens):
            raise ValueError("score_from must leave at least one token before and after it")
        if len(self.tokens) + 1 > kv_slots:
            raise KVBudgetError(
                f"a {len(self.tokens)}-token request needs {(len(self.tokens) + 1) * bytes_per_token:,} bytes "
                f"of KV, more than the engine's KV budget of {kv_slots * bytes_per_token:,} bytes; "
                "raise max_kv_bytes or shorten the prompt")
        seed = self.params.seed
        if seed is not None and not -(2**63) <= seed < 2**63:  # one bad seed would fail its whole batch
            raise ValueError(f"seed must be a 64-bit signed integer; got {seed}")
        if self.positions is not None and (len(self.positions) != self.prompt_len or self.positions[0] < 0
                                           or any(b <= a for a, b in zip(self.positions, self.positions[1:]))):
            raise ValueError("positions must give each prompt token a position, in increasing order")
        if self.reuse is not None and self.reuse.config.reuses:
            if self.positions is not None:
                raise ValueError("selective prefill and documents' reused KV cannot be combined in one request")
            end = 0
            for s, e in self.reuse.spans:
                if not end <= s < e <= self.prompt_len:
                    raise ValueError(f"document spans must be ordered, disjoint and inside the prompt: {(s, e)}")
                end = e
            if self.reuse.config.select_layer >= layers:
                raise ValueError(f"select_layer {self.reuse.config.select_layer} is past the model's {layers} layers")
