"""The engine: requests in, tokens out, every distinct prefix prefilled once.

One loop thread owns every step: it takes submitted requests, prefills the
prefixes that requests arriving together share, admits what the KV pool has
room for, runs one packed forward over decode tokens and prefill chunks,
samples the whole batch at once and retires finished requests. Requests
whose documents reuse stored KV are assembled from the chunk store between
admission and the forward (``reuse.py``). Callers
submit and wait on a future per request (or read a stream of its tokens);
an error fails exactly the requests it concerns and is raised in their
callers, and their KV and locks are released on every path.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import queue
import secrets
import threading
import weakref
from collections.abc import Iterator
from concurrent.futures import wait
from typing import Any

import torch

from .chunk_store import ChunkStore, model_identity, write_store
from .config import EngineConfig
from .families import check_supported, text_config
from .kv_pool import KVBudgetError, KVPool
from .outputs import Outputs
from .radix_cache import RadixCache
from .request import Kind, Request
from .reuse import Assembler
from .runner import ModelRunner
from .scheduler import Scheduler, prefix_job_steps, shareable, shared_prefixes
from .threads import on_fresh_thread

log = logging.getLogger(__name__)
_engines: weakref.WeakSet = weakref.WeakSet()
IDLE_EXIT_SECONDS = 5.0  # the loop thread ends after this long without work
CANCEL_POLL_S = 0.1  # how often a cancellable wait looks at its cancel event
# At exit the loop thread finishes the step it is in (a step is bounded by max_batch_tokens): a
# thread stopped inside a torch kernel while the interpreter shuts down aborts the process.
EXIT_JOIN_SECONDS = 120.0


class Cancelled(Exception):
    """The caller cancelled the requests it was waiting for (they were aborted)."""


@atexit.register
def _close_all() -> None:
    """Stop loop threads before the interpreter tears down the libraries they use."""
    for engine in list(_engines):
        engine.close(join_timeout=EXIT_JOIN_SECONDS)

__all__ = ["Engine", "EngineConfig", "KVBudgetError", "Request"]


class Engine:
    """Continuous-batching engine over a transformers causal LM, with one KV pool and a radix prefix cache.

    >>> engine = Engine(model, eos_ids={2}, config=EngineConfig(max_kv_bytes="512MB"))
    >>> engine.run([Request(tokens=[1, 42, 7])])[0].generated
    """

    def __init__(self, model: Any, eos_ids: set[int], config: EngineConfig | None = None, **options: Any) -> None:
        base = config.model_dump(exclude_unset=True) if config is not None else {}
        self.config = EngineConfig(**{**base, **options})
        check_supported(model.config)
        self.model = model
        self.eos_ids = set(eos_ids)
        cfg = text_config(model.config)
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        p = next(model.parameters())
        dtype = p.dtype if p.dtype.is_floating_point else torch.float32
        self.pool = KVPool(cfg.num_hidden_layers, kv_heads, head_dim, dtype, p.device, self.config.max_kv_bytes)
        self.cache = RadixCache(self.pool, enabled=self.config.prefix_cache)
        self.chunks = ChunkStore(self.pool, self.cache.tick)
        self.scheduler = Scheduler(self.pool, self.cache, self.config, self.chunks)
        # Binding the lean forward converts weights: on a thread of its own (see threads.py).
        self.runner = on_fresh_thread(ModelRunner, model, self.pool, self.config.sparse, self.config.lean_forward,
                                      self.config.compile_decode)
        self.vocab_size = model.get_output_embeddings().out_features if model.get_output_embeddings() is not None \
            else model.config.vocab_size
        self.reuse = Assembler(model, self.scheduler, self.runner, self._run_jobs, self._prefill_prefixes)
        self.steps = 0
        self.outputs = Outputs(self.scheduler, self.eos_ids, self.vocab_size, self.config.fast_forward)
        self._lock = threading.RLock()  # held by the loop for each step, and by side passes (exclusive())
        self._wake = threading.Condition()
        self._inbox: list[Request] = []
        self._thread: threading.Thread | None = None
        self._closed = False
        _engines.add(self)

    @property
    def bytes_per_token(self) -> int:
        return self.pool.bytes_per_token

    @property
    def sparse_stats(self) -> Any:
        return self.runner.sparse_stats

    # -- public API ----------------------------------------------------------
    def submit(self, req: Request) -> Request:
        """Queue ``req`` for the engine loop; wait on ``req.future`` (or use :meth:`run`)."""
        return self.submit_many([req])[0]

    def submit_many(self, reqs: list[Request]) -> list[Request]:
        """Queue ``reqs`` together (the loop sees them in one step, so their shared prefixes are
        found and prefilled once)."""
        for req in reqs:
            self._validate(req)
        with self._wake:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._inbox.extend(reqs)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="promptkit-engine", daemon=True)
                self._thread.start()
            self._wake.notify()
        return reqs

    def _validate(self, req: Request) -> None:
        req.check(self.pool.capacity, self.bytes_per_token, self.pool.kv.shape[0])
        if req.params.temperature > 0:
            req.seed = req.params.seed if req.params.seed is not None else secrets.randbits(63)
        if req.reuse is not None and req.reuse.config.reuses:
            self.reuse.rerotator()  # a model whose keys cannot be moved is refused here

    def run(self, reqs: list[Request], cancel: threading.Event | None = None) -> list[Request]:
        """Submit ``reqs`` and wait until all are finished; raise the first error among them.
        Setting ``cancel`` aborts those still running and raises :class:`Cancelled`."""
        self.submit_many(reqs)
        futures = [r.future for r in reqs]
        while wait(futures, timeout=None if cancel is None else CANCEL_POLL_S).not_done:
            if cancel is not None and cancel.is_set():
                for r in reqs:
                    self.abort(r)
                wait(futures)
                raise Cancelled(f"{sum(r.finish_reason == 'abort' for r in reqs)} of {len(reqs)} requests cancelled")
        for r in reqs:
            if r.error is not None:
                raise r.error
        return reqs

    def stream(self, req: Request) -> Iterator[int]:
        """Submit ``req`` and yield its tokens as they come; an engine error is raised here.
        Closing the iterator early aborts the request."""
        req.events = queue.SimpleQueue()
        self.submit(req)
        try:
            while True:
                ev = req.events.get()
                if ev is None:
                    return
                if isinstance(ev, BaseException):
                    raise ev
                yield ev
        finally:
            if not req.finished:
                self.abort(req)

    def abort(self, req: Request) -> None:
        """Stop ``req`` at the next step (its KV is freed, its caller sees finish_reason "abort")."""
        req.aborted = True
        with self._wake:
            self._wake.notify()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the model between steps (for a side pass that runs it directly)."""
        with self._lock:
            yield

    def attention_to(self, tokens: list[int], query_from: int, num_layers: int, first_layer: int = 0) -> torch.Tensor:
        """See :meth:`ModelRunner.attention_to`; runs between engine steps."""
        limit = getattr(text_config(self.model.config), "max_position_embeddings", None)
        if limit and len(tokens) > limit:  # positions past the context would be attended to wrongly
            raise ValueError(f"{len(tokens)} tokens exceed the model's context of {limit}")
        with self._lock:
            return on_fresh_thread(self.runner.attention_to, tokens, query_from, num_layers, first_layer)

    def clear_cache(self, chunks: bool = True) -> None:
        """Drop every cached prefix not in use (and, with ``chunks``, every stored chunk and the
        lead-in of a loaded store)."""
        with self._lock:
            self.cache.clear()
            if chunks:
                self.chunks.clear()
                self.chunks.lead_in = None

    # -- the chunk store -------------------------------------------------------------
    def store_chunks(self, lead_in: list[int], chunks: list[list[int]]) -> int:
        """Encode ``chunks`` (token ids of documents) alone after ``lead_in`` into the chunk
        store, ahead of the requests that will reuse them; returns how many are stored."""
        with self._lock:
            return on_fresh_thread(self.reuse.store_chunks, lead_in, chunks)

    def identity(self) -> dict[str, Any]:
        """What a saved chunk store must have been made with to be loaded here."""
        return model_identity(self.model, self.pool.kv.dtype)

    def export_chunks(self, lead_in: list[int]) -> tuple[torch.Tensor, list[int], list[int]]:
        """The stored chunks encoded after ``lead_in`` (see :meth:`ChunkStore.export`)."""
        with self._lock:
            return self.chunks.export(lead_in)

    def save_chunks(self, path: str, lead_in: list[int], extra: dict[str, Any] | None = None) -> int:
        """Save the stored chunks encoded after ``lead_in`` (safetensors); returns how many."""
        return write_store(path, [self.export_chunks(lead_in)], lead_in, self.identity(), extra)

    def load_chunks(self, path: str, lead_in: list[int] | None = None) -> int:
        """Load a saved chunk store (refused with StaleKVError if made for another model or,
        when given, another ``lead_in``); returns how many chunks fit the KV budget."""
        on_fresh_thread(self.reuse.rerotator)
        with self._lock:
            return on_fresh_thread(self.chunks.load, path, self.identity(), lead_in, make_room=self.scheduler._make_room)

    def check_integrity(self) -> None:
        """Raise AssertionError if KV slots leaked or the prefix tree is inconsistent."""
        with self._lock:
            self.scheduler.check()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            s, pool, sched = self.cache.stats, self.pool, self.scheduler
            bpt = pool.bytes_per_token
            return {"tokens_requested": s.tokens_requested, "tokens_cached": s.tokens_cached,
                    "tokens_prefilled": s.tokens_prefilled, "tokens_reused": self.reuse.reused_tokens,
                    "tokens_recomputed": self.reuse.recomputed_tokens, "evictions": s.evictions,
                    "evicted_tokens": s.evicted_tokens, "preemptions": sched.preemptions, "steps": self.steps,
                    "fast_forwarded_tokens": self.outputs.fast_forwarded,
                    "compiled_decode_steps": 0 if self.runner.compiled is None else self.runner.compiled.steps,
                    "compiled_decode": "off" if self.runner.compiled is None else self.runner.compiled.status,
                    "weight_bytes": self.runner.weight_bytes,
                    "running": len(sched.running), "waiting": len(sched.waiting) + len(self._inbox),
                    "kv_budget_bytes": pool.capacity * bpt, "kv_used_bytes": pool.used * bpt,
                    "kv_high_water_bytes": pool.high_water * bpt,
                    **{f"cache_{k}": v for k, v in self.cache.size_info().items()}, **self.chunks.info()}

    def close(self, join_timeout: float = 30) -> None:
        """Stop the loop thread; requests still queued fail."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=join_timeout)
        with self._lock:
            self._fail_all(RuntimeError("the engine was closed"))

    # -- the loop ----------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._inbox and not self.scheduler.has_work():
                    if not self._wake.wait(timeout=IDLE_EXIT_SECONDS) and not self._inbox:
                        self._thread = None  # idle: end, so an unused engine can be freed; submit restarts it
                        return
                if self._closed:
                    return
            try:
                with self._lock:
                    self.step()
            except BaseException as e:  # a fault of the loop itself: fail every request, never hang
                log.exception("engine step failed")
                with self._lock:
                    self._fail_all(e)

    @torch.inference_mode()
    def step(self) -> None:
        """Take new requests, admit, forward, sample, retire: one iteration. Called by the loop
        thread (with the lock held); nothing else drives steps."""
        with self._wake:
            new, self._inbox = self._inbox, []
        self.scheduler.waiting.extend(new)
        for r in [r for r in [*self.scheduler.waiting, *self.scheduler.running] if r.aborted]:
            self.outputs.finish(r, "abort")
        if self.cache.enabled:
            self._prefill_shared_prefixes(self.scheduler.window())
        try:
            admitted, failed = self.scheduler.admit()
        except Exception as e:  # the requests it was admitting fail; the running ones go on
            admitted, failed = [], [(r, e) for r in self.scheduler.window()]
        for r, e in failed:
            self.outputs.fail(r, e)
        assembling = [r for r in admitted if r.reuse is not None]
        if assembling:
            try:
                self.reuse.assemble(assembling)
            except Exception as e:  # those requests fail; the running ones go on
                log.exception("assembling from stored KV failed")
                for r in assembling:
                    self.outputs.fail(r, e)
        batch = self.scheduler.plan()
        stalled = list(self.scheduler.stalled)
        for r in stalled:
            self.outputs.finish(r, "length")  # alone and the pool holds no slot for its next token
        self.scheduler.stalled.clear()
        if not batch:
            # Nothing runs and nothing just freed its slots: no later step can make room for it.
            if self.scheduler.waiting and not self.scheduler.running and not stalled:
                r = self.scheduler.waiting[0]
                self.outputs.fail(r, KVBudgetError(f"a {len(r.tokens)}-token request does not fit the KV budget"))
            return
        try:
            logits, spans = self.runner.forward(batch)
        except Exception as e:  # the forward's requests fail; the others go on
            for r, _ in batch:
                self.outputs.fail(r, e)
            return
        self.steps += 1
        self.outputs.after_forward(batch, logits, spans)

    def _prefill_shared_prefixes(self, window: list[Request]) -> None:
        """Prefill once, ahead of their requests, the prefixes that requests arriving together share."""
        fresh = [r for r in window if r.kv.preemptions == 0 and r.kind != Kind.PREFIX]
        if len(fresh) < 2:
            return
        prompts = [r.tokens[: shareable(r)] for r in fresh]
        for level in prefix_job_steps(shared_prefixes(prompts, self.config.share_min_tokens)):
            try:
                self._prefill_prefixes(level)
            except Exception:  # sharing is an optimisation: the requests prefill their own prompts
                log.exception("prefix prefill failed")
                return

    def _prefill_prefixes(self, prefixes: list[tuple[int, ...]]) -> None:
        """Prefill into the prefix tree those of ``prefixes`` not cached yet (skipped where the pool
        has no room); a job that did not finish frees its slots, on every path."""
        jobs = [r for p in prefixes if (r := self.scheduler.start_job(list(p))) is not None]
        try:
            self._run_jobs(jobs)
        finally:
            for r in jobs:
                self.scheduler.retire(r, keep=r.pending == 0)

    def _run_jobs(self, jobs: list[Request]) -> None:
        """Prefill internal jobs (prefixes, chunks) to the end, as many per forward as fit."""
        while any(r.pending for r in jobs):
            batch = self.scheduler.plan(jobs)
            if not batch:
                break
            self.runner.forward(batch)
            for r, n in batch:
                self.scheduler.advance(r, n)

    def _fail_all(self, error: BaseException) -> None:
        """Fail every request the engine holds and release all KV (after a fault of the loop)."""
        with self._wake:
            pending, self._inbox = self._inbox, []
        sched = self.scheduler
        for r in pending + list(sched.waiting) + list(sched.running):
            try:
                self.outputs.fail(r, error)
            except Exception:  # keep failing the others
                log.exception("could not fail request %s cleanly", r.id)
        sched.waiting.clear()
        sched.running.clear()
