"""A request's generations from admission to the last byte sent (:class:`Run`)."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from ..backends.base import GenerationError, SamplingParams, StreamEvent
from ..engine.engine import Cancelled
from ..structured import ConstraintError
from ..types import Generation
from ..wire import PromptInput
from .errors import classify
from .format import ChunkWriter, Echo, Reply, event
from .served import Served

log = logging.getLogger("promptkit.server")
DISCONNECT_POLL_S = 0.25  # how often a non-streamed request checks that its client is still there
Spans = list[tuple[int, int]]


@dataclass
class Job:
    """One generation: a prompt, its sampling settings, and its documents' character spans."""

    prompt: PromptInput
    params: SamplingParams
    documents: Spans | None = None


class Run:
    """One request's generations, from admission to the last byte sent.

    It holds the request's places in the queue and its engine streams, and frees both exactly
    once on every path: finished, failed, or the client gone (mid-stream, or before the first
    byte). Engine requests are only ever aborted through the backend (closing their streams, or
    the batch call's cancel event), never by cancelling an engine future.
    """

    def __init__(self, served: Served, request: Request, jobs: list[Job], field: str,
                 constraint_field: str | None = None) -> None:
        self.served, self.request, self.jobs = served, request, jobs
        self.field, self.constraint_field = field, constraint_field
        self.streams: list[Iterator[StreamEvent]] = []
        self.handed_off = False  # a streaming response owns the run (and closes it)
        self._places = 0
        self._outcome: str | None = None
        self._closed = False

    # -- lifetime ----------------------------------------------------------------------
    def admit(self) -> None:
        self.served.admission.acquire(len(self.jobs))
        self._places = len(self.jobs)

    def settle(self, outcome: str) -> None:
        """Record how the request ended: "ok", or "client_errors"/"server_errors" counted here
        (an error raised to the exception handlers is counted there: "raised")."""
        if self._outcome is None:
            self._outcome = outcome
            if outcome != "raised":
                self.served.admission.bump(outcome)

    def failed(self, e: Exception) -> Exception:
        """The exception to raise for ``e``: a client who left stays :class:`Cancelled`; anything
        else becomes the API error that answers it."""
        if isinstance(e, Cancelled):
            return e
        self.settle("raised")
        bad_constraint = isinstance(e, ConstraintError) and self.constraint_field
        return classify(e, self.constraint_field if bad_constraint else self.field)

    async def close(self) -> None:
        """Abort what still runs in the engine and give back the queue places (once)."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):  # runs even when the client's disconnect cancelled us
            if self.streams:
                await anyio.to_thread.run_sync(close_all, self.streams)
        if self._places:
            self.served.admission.release(self._places)
        if self._outcome is None:
            self.served.admission.bump("cancelled")

    # -- work under the run's places ---------------------------------------------------------
    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on a generation thread."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.served.generation)

    async def echoes(self, prompts: list[PromptInput], top: int) -> list[Echo]:
        """The prompts' own tokens with their logprobs (``top`` alternatives each), for ``echo``."""
        backend = self.served.backend

        def score() -> list[Echo]:
            tls = backend.token_logprobs(prompts, top_logprobs=top) if top else backend.token_logprobs(prompts)
            return [Echo(backend, p, tl) for p, tl in zip(prompts, tls)]

        return await self.call(score)

    async def whole(self, reply: Reply) -> JSONResponse:
        """Generate every job to its end; the response (rendered to JSON off the event loop)."""
        if self._batchable():
            gens = await self._watched(self._generate)
        else:
            firsts = await self._start()
            gens = await self._watched(lambda cancel: drain_all(firsts, self.streams, cancel))
        return await anyio.to_thread.run_sync(lambda: JSONResponse(reply.whole(gens)))

    async def stream(self, reply: Reply) -> StreamingResponse:
        """A streamed response, once every job has its first event (so request errors are still a 4xx)."""
        firsts = await self._start()
        self.served.admission.bump("streams")
        self.handed_off = True
        return RunResponse(self, self._events(firsts, ChunkWriter(reply, len(self.jobs))))

    def _batchable(self) -> bool:
        return all(j.params == self.jobs[0].params for j in self.jobs)

    def _generate(self, cancel: threading.Event) -> list[Generation]:
        backend, params = self.served.backend, self.jobs[0].params
        extra: dict[str, Any] = {}
        if any(j.documents for j in self.jobs):
            extra["documents"] = [j.documents for j in self.jobs]
        if getattr(backend, "supports_cancel", False):
            extra["cancel"] = cancel
        return backend.generate([j.prompt for j in self.jobs], params, **extra)

    async def _start(self) -> list[StreamEvent]:
        """Open a stream per job and wait for each one's first event (the prompt is tokenized and
        prefilled by then)."""
        return await self._watched(self._open)

    def _open(self, cancel: threading.Event) -> list[StreamEvent]:
        backend = self.served.backend
        for j in self.jobs:  # kept as they open, so that close() aborts them whatever fails here
            self.streams.append(backend.generate_stream(j.prompt, j.params, **({"documents": j.documents}
                                                                               if j.documents else {})))
        return [first(s, cancel) for s in self.streams]

    async def _events(self, firsts: list[StreamEvent], writer: ChunkWriter) -> AsyncIterator[str]:
        try:
            lines = writer.opening() + await anyio.to_thread.run_sync(writer.lines, firsts)
            while True:
                for line in lines:
                    yield line
                live = writer.live()
                if not live:
                    break
                lines = await self.call(lambda: writer.lines(advance(self.streams, live)))
            for line in writer.closing():
                yield line
            self.settle("ok")
        except Exception as e:  # after the first chunk the status is sent: the error goes in the stream
            error = classify(e, self.field)
            self.settle("client_errors" if error.status < 500 else "server_errors")
            yield event(error.body())

    async def _watched(self, fn: Callable[[threading.Event], Any]) -> Any:
        """``fn(cancel)`` on a generation thread, with ``cancel`` set if the client disconnects
        meanwhile, so that a request nobody waits for stops decoding."""
        cancel = threading.Event()

        async def watch() -> None:
            while not cancel.is_set():
                await anyio.sleep(DISCONNECT_POLL_S)
                if await self.request.is_disconnected():
                    cancel.set()

        outcome: dict[str, Any] = {}
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(watch)
            try:
                outcome["value"] = await self.call(fn, cancel)
            except Exception as e:  # raised outside the task group, which would wrap it in an ExceptionGroup
                outcome["error"] = e
            finally:
                tasks.cancel_scope.cancel()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]


@asynccontextmanager
async def admitted(served: Served, request: Request, jobs: list[Job], field: str,
                   constraint_field: str | None = None) -> AsyncIterator[Run]:
    """A :class:`Run` holding its places in the queue (or a 429); closed on leaving the block unless
    a streaming response took it over. ``field``: what request errors are about ("prompt", "messages")."""
    run = Run(served, request, jobs, field, constraint_field)
    try:
        run.admit()
        yield run
        if not run.handed_off:
            run.settle("ok")
    except Exception as e:
        raise run.failed(e) from None
    finally:
        if not run.handed_off:
            await run.close()


class RunResponse(StreamingResponse):
    """A server-sent event stream that closes its run however the response ends, the client's
    leaving before the first byte included (when the body's generator never starts)."""

    def __init__(self, run: Run, body: AsyncIterator[str]) -> None:
        super().__init__(body, media_type="text/event-stream")
        self.run = run

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
                await self.run.close()


# -- blocking helpers (worker threads) --------------------------------------------------------
def first(stream: Iterator[StreamEvent], cancel: threading.Event | None = None) -> StreamEvent:
    if cancel is not None and cancel.is_set():
        raise Cancelled("the client disconnected")
    ev = next(stream, None)
    if ev is None:
        raise GenerationError("the backend produced no output")
    return ev


def advance(streams: list[Iterator[StreamEvent]], live: list[int]) -> list[StreamEvent | None]:
    """The next event of each live stream (one round, so all of them stay in the engine's batch)."""
    out: list[StreamEvent | None] = [None] * len(streams)
    for k in live:
        ev = next(streams[k], None)
        if ev is None:
            raise GenerationError("the backend's stream ended without a final generation")
        out[k] = ev
    return out


def drain_all(firsts: list[StreamEvent], streams: list[Iterator[StreamEvent]],
              cancel: threading.Event | None = None) -> list[Generation]:
    evs: list[StreamEvent | None] = list(firsts)
    while True:
        if cancel is not None and cancel.is_set():
            raise Cancelled("the client disconnected")  # the run closes the streams, which aborts them
        live = [k for k, ev in enumerate(evs) if ev is not None and ev.generation is None]
        if not live:
            return [ev.generation for ev in evs]  # type: ignore[union-attr, misc]
        for k, ev in enumerate(advance(streams, live)):
            if ev is not None:
                evs[k] = ev


def close_all(streams: list[Iterator[StreamEvent]]) -> None:
    """Close every stream (each close aborts its engine request), whatever one of them raises."""
    for s in streams:
        try:
            s.close()  # type: ignore[attr-defined]
        except Exception:
            log.exception("closing a stream failed")
