"""An OpenAI-compatible HTTP server over an :class:`~promptkit.lm.LM` (``promptkit serve``).

Endpoints: ``/v1/models``, ``/v1/completions`` (with ``echo`` and prompt
logprobs, so remote clients can ``score``), ``/v1/chat/completions`` (with
``stream`` as server-sent events), ``/stats`` and ``/health``.

Each request runs the backend's ``generate_stream`` in a worker thread; the
local engine batches concurrent requests between decode steps. Requests
beyond ``max_queue`` (running plus waiting) get 429 rather than a growing
queue, and a client that disconnects mid-stream closes its generator, which
frees its slot in the engine.
"""

from __future__ import annotations

import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.exceptions import HTTPException

from .backends.base import ContextLengthError, SamplingParams, StreamEvent
from .chat_documents import TextPart, chat_prompt, flatten
from .lm import LM
from .types import Generation

MAX_STOP = 4


class APIError(Exception):
    """An error answered as OpenAI's ``{"error": {...}}`` body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


# -- request bodies -------------------------------------------------------------
class _Body(BaseModel):
    """Fields shared by both endpoints; anything unknown is refused by name."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    user: str | None = None  # accepted and ignored, as OpenAI clients often send it

    @field_validator("n")
    @classmethod
    def _one(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        return v


class CompletionBody(_Body):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5)

    @field_validator("prompt")
    @classmethod
    def _single(cls, v: str | list[str]) -> str:
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("send one prompt per request (a list of exactly one string)")
            v = v[0]
        if not v.strip():
            raise ValueError("prompt is empty")
        return v

    @model_validator(mode="after")
    def _zero_needs_echo(self) -> CompletionBody:
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens=0 is only allowed with echo=true (prompt logprobs)")
        if self.max_tokens == 0 and self.stream:
            raise ValueError("max_tokens=0 cannot be streamed")
        return self


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatBody:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self

    @field_validator("max_tokens")
    @classmethod
    def _positive(cls, v: int | None) -> int | None:
        if v == 0:
            raise ValueError("max_tokens must be at least 1")
        return v


# -- admission --------------------------------------------------------------------
class Counters:
    """Request counters and the bounded admission queue (thread-safe)."""

    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self.c = {"requests": 0, "ok": 0, "rejected_429": 0, "client_errors": 0, "server_errors": 0,
                  "cancelled": 0, "active": 0, "streams": 0}

    def bump(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.c[key] += n

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one of ``max_queue`` places, or answer 429 when none is free."""
        with self._lock:
            if self.c["active"] >= self.max_queue:
                self.c["rejected_429"] += 1
                raise APIError(429, f"server busy: {self.max_queue} requests already running or waiting; "
                                    "retry later", type="rate_limit_error", code="queue_full")
            self.c["active"] += 1
        try:
            yield
        finally:
            self.bump("active", -1)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.c)


# -- the app ------------------------------------------------------------------------
def create_app(lm: LM, api_key: str | None = None, max_queue: int = 64, max_workers: int = 16,
               model_name: str | None = None, pipelines: dict[str, Any] | None = None) -> FastAPI:
    """Build the ASGI app serving ``lm`` (and, optionally, pipelines as models).

    ``api_key``: when set, every request needs ``Authorization: Bearer <key>``.
    ``max_queue``: requests running or waiting at once; more get 429.
    ``max_workers``: worker threads driving generations (the engine batches them).
    ``model_name``: the id clients must send (default: the LM's model name).
    ``pipelines``: ``{model id: Pipeline}``; a request naming one runs the pipeline on
    the prompt (or the last user message) and answers with the record's output.
    """
    name = model_name or lm.model
    pipelines = dict(pipelines or {})
    if name in pipelines:
        raise ValueError(f"pipeline id {name!r} clashes with the model's name")
    backend = lm.backend
    counters = Counters(max_queue)
    limiter = anyio.CapacityLimiter(max_workers)
    app = FastAPI(title="promptkit", version="1")
    app.state.lm, app.state.counters = lm, counters

    async def guard(request: Request) -> None:
        counters.bump("requests")
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), api_key.encode())):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           type="authentication_error", code="invalid_api_key")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        if e.status != 429:  # 429s are counted where they are decided
            counters.bump("client_errors" if e.status < 500 else "server_errors")
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return await _api_error(request, APIError(400, _describe(e.errors()), param=_param(e.errors())))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException) -> JSONResponse:
        return await _api_error(request, APIError(e.status_code, str(e.detail), code=str(e.status_code)))

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception) -> JSONResponse:
        return await _api_error(request, APIError(500, f"internal error: {type(e).__name__}: {e}",
                                                  type="server_error"))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=[Depends(guard)])
    async def models() -> dict[str, Any]:
        card = {"id": name, "object": "model", "created": 0, "owned_by": "promptkit",
                "max_model_len": backend.max_context, "chat": backend.is_chat}
        cards = [{"id": p, "object": "model", "created": 0, "owned_by": "promptkit-pipeline"} for p in pipelines]
        return {"object": "list", "data": [card, *cards]}

    @app.get("/stats", dependencies=[Depends(guard)])
    async def stats() -> dict[str, Any]:
        return {**_jsonable(lm.stats()), "server": counters.snapshot(), "max_queue": max_queue}

    def check_model(body: _Body) -> None:
        if body.model != name and body.model not in pipelines:
            known = ", ".join(repr(m) for m in [name, *pipelines])
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {known}",
                           param="model", code="model_not_found")

    def params_of(body: _Body, logprobs: bool, top: int = 0) -> SamplingParams:
        return SamplingParams(max_tokens=body.max_tokens or 16, temperature=body.temperature, top_p=body.top_p,
                              stop=body.stop, seed=body.seed, logprobs=logprobs, top_logprobs=top)

    @app.post("/v1/completions", dependencies=[Depends(guard)])
    async def completions(body: CompletionBody, request: Request) -> Any:
        check_model(body)
        if body.model in pipelines:
            return await _pipeline(body, body.prompt, chat=False)  # type: ignore[arg-type]
        want_lp = body.logprobs is not None
        text = body.prompt  # type: ignore[assignment]
        if body.max_tokens == 0:  # echo only: the prompt's own logprobs (what remote score() uses)
            with counters.slot():
                tl = await _in_thread(limiter, lambda: lm.token_logprobs(text)[0])
            lp = _prompt_logprobs(text, tl) if want_lp else None
            counters.bump("ok")
            return _completion(name, text, "length", lp, _usage(len(tl.token_ids), 0, 0))
        return await _serve(request, body, params_of(body, want_lp, body.logprobs or 0), text, chat=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(guard)])
    async def chat_completions(body: ChatBody, request: Request) -> Any:
        check_model(body)
        if body.model in pipelines:
            users = [flatten(m.content) for m in body.messages if m.role == "user"]
            if not users:
                raise APIError(400, "a pipeline model needs a user message (its input)", param="messages")
            return await _pipeline(body, users[-1], chat=True)
        text, documents = chat_prompt(backend, body.messages)  # documents: see chat_documents.py
        return await _serve(request, body, params_of(body, body.logprobs, body.top_logprobs or 0), text, chat=True,
                            documents=documents)

    async def _pipeline(body: _Body, text: str, chat: bool) -> Any:
        """Run a served pipeline on one input; streamed as a single chunk when asked to stream."""
        with counters.slot():
            record = await _in_thread(limiter, lambda: pipelines[body.model](text))
        out = record.output if isinstance(record.output, str) else json.dumps(record.output, default=str)
        g = Generation(text=out, finish_reason=record.generation.finish_reason if record.generation else "stop",
                       usage=record.generation.usage if record.generation else Generation(text="").usage)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        counters.bump("ok")
        if body.stream:
            events = [_chunk(body.model, rid, g.text, g.finish_reason, chat, usage=_usage_of(g))]
            if chat:
                events.insert(0, _chunk(body.model, rid, {"role": "assistant", "content": ""}, None, chat=True))
            lines = [_event(e) for e in events] + ["data: [DONE]\n\n"]
            return StreamingResponse(iter(lines), media_type="text/event-stream")
        if chat:
            return {**_chat(body.model, rid, g, backend)}
        return _completion(body.model, g.text, g.finish_reason, None, _usage_of(g), rid)

    async def _serve(request: Request, body: _Body, params: SamplingParams, text: str, chat: bool,
                     documents: list[tuple[int, int]] | None = None) -> Any:
        if params.max_tokens > backend.max_context:
            raise APIError(400, f"max_tokens={params.max_tokens} exceeds the model's context of "
                                f"{backend.max_context} tokens", param="max_tokens")
        slot = counters.slot()
        slot.__enter__()
        try:
            reuse = {"documents": documents} if documents and getattr(backend, "supports_kv_reuse", False) else {}
            events = backend.generate_stream(text, params, **reuse)
            first = await _first(limiter, events)  # errors such as a too-long prompt surface here, as 400
        except BaseException:
            slot.__exit__(None, None, None)
            raise
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if not body.stream:
            try:
                gen = await _in_thread(limiter, lambda: _drain(first, events))
            finally:
                events.close()
                slot.__exit__(None, None, None)
            counters.bump("ok")
            echo = text if getattr(body, "echo", False) else ""
            return _chat(name, rid, gen, backend) if chat else _completion(
                name, echo + gen.text, gen.finish_reason, _legacy_logprobs(backend, gen, len(echo)) if
                params.logprobs else None, _usage_of(gen), rid)
        counters.bump("streams")
        return StreamingResponse(_sse(request, rid, first, events, slot, chat, params.logprobs),
                                 media_type="text/event-stream")

    async def _sse(request: Request, rid: str, first: StreamEvent, events: Iterator[StreamEvent], slot: Any,
                   chat: bool, logprobs: bool) -> AsyncIterator[str]:
        done, offset = False, 0
        try:
            if chat:
                yield _event(_chunk(name, rid, {"role": "assistant", "content": ""}, None, chat=True))
            ev: StreamEvent | None = first
            while ev is not None:
                lp = None
                if logprobs and ev.logprobs is not None:  # the logprobs of the tokens behind this chunk
                    lp = _chat_logprobs(backend, ev) if chat else _legacy_logprobs(backend, ev, offset)
                offset += len(ev.text)
                if ev.generation is not None:
                    g = ev.generation
                    yield _event(_chunk(name, rid, ev.text, g.finish_reason, chat, usage=_usage_of(g), logprobs=lp))
                    break
                if ev.text or lp:
                    yield _event(_chunk(name, rid, ev.text, None, chat, logprobs=lp))
                ev = await _in_thread(limiter, lambda: next(events, None))
            yield "data: [DONE]\n\n"
            done = True
            counters.bump("ok")
        finally:
            if not done:
                counters.bump("cancelled")
            # Closing the generator aborts the request in the engine and frees its batch slot;
            # shielded so that it runs even when the client's disconnect cancelled us.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(events.close)
            slot.__exit__(None, None, None)

    return app


# -- helpers -----------------------------------------------------------------------
async def _in_thread(limiter: anyio.CapacityLimiter, fn: Any) -> Any:
    try:
        return await anyio.to_thread.run_sync(fn, limiter=limiter)
    except ContextLengthError as e:
        raise APIError(400, str(e), param="prompt", code="context_length_exceeded") from None
    except ValueError as e:
        raise APIError(400, str(e)) from None


async def _first(limiter: anyio.CapacityLimiter, events: Iterator[StreamEvent]) -> StreamEvent:
    ev = await _in_thread(limiter, lambda: next(events, None))
    if ev is None:
        raise APIError(500, "the backend produced no output", type="server_error")
    return ev


def _drain(first: StreamEvent, events: Iterator[StreamEvent]) -> Generation:
    ev: StreamEvent | None = first
    while ev is not None and ev.generation is None:
        ev = next(events, None)
    if ev is None or ev.generation is None:
        raise RuntimeError("the backend's stream ended without a final generation")
    return ev.generation


def _usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _usage_of(g: Generation) -> dict[str, Any]:
    return _usage(g.usage.prompt_tokens, g.usage.completion_tokens, g.usage.cached_tokens)


def _completion(model: str, text: str, finish: str, logprobs: Any, usage: dict[str, Any],
                rid: str | None = None) -> dict[str, Any]:
    return {"id": rid or "cmpl-" + uuid.uuid4().hex[:24], "object": "text_completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}],
            "usage": usage}


def _chat(model: str, rid: str, g: Generation, backend: Any) -> dict[str, Any]:
    lp = _chat_logprobs(backend, g) if g.logprobs is not None else None
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": g.text}, "logprobs": lp,
                         "finish_reason": g.finish_reason}], "usage": _usage_of(g)}


def _chunk(model: str, rid: str, delta: Any, finish: str | None, chat: bool,
           usage: dict[str, Any] | None = None, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    if chat:
        d = delta if isinstance(delta, dict) else ({"content": delta} if delta else {})
        choice = {"index": 0, "delta": d, "logprobs": logprobs, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": delta, "logprobs": logprobs, "finish_reason": finish}
    out = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
           "created": int(time.time()), "model": model, "choices": [choice]}
    if usage is not None:
        out["usage"] = usage
    return out


def _event(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _prompt_logprobs(text: str, tl: Any) -> dict[str, Any]:
    """OpenAI's legacy logprobs object for the prompt's tokens (first token has none)."""
    offsets = [o[0] for o in tl.offsets] if tl.offsets else [0] * len(tl.token_ids)
    return {"tokens": [text[a:b] for a, b in tl.offsets] if tl.offsets else tl.tokens,
            "token_logprobs": tl.logprobs, "top_logprobs": None, "text_offset": offsets,
            "token_ids": tl.token_ids}


def _pieces(backend: Any, token_ids: list[int]) -> list[str]:
    decode = getattr(backend, "decode", None)
    return [decode([t]) if decode else str(t) for t in token_ids]


def _legacy_logprobs(backend: Any, g: Generation | StreamEvent, start: int) -> dict[str, Any]:
    """Completions' logprobs object for generated tokens, text offsets counted from ``start``
    (the characters of echoed prompt, or of text already streamed)."""
    pieces = _pieces(backend, g.token_ids)
    offsets, pos = [], start
    for p in pieces:
        offsets.append(pos)
        pos += len(p)
    return {"tokens": pieces, "token_logprobs": g.logprobs, "top_logprobs": g.top_logprobs, "text_offset": offsets,
            "token_ids": g.token_ids}


def _chat_logprobs(backend: Any, g: Generation | StreamEvent) -> dict[str, Any]:
    """Chat's logprobs object: one entry per generated token, with its most likely alternatives."""
    pieces = _pieces(backend, g.token_ids)
    tops = g.top_logprobs or [{} for _ in pieces]
    return {"content": [{"token": t, "logprob": p, "top_logprobs": [{"token": a, "logprob": b} for a, b in top.items()]}
                        for t, p, top in zip(pieces, g.logprobs or [], tops)]}


def _describe(errors: Any) -> str:
    """One readable line from pydantic's errors, naming each offending field."""
    parts = []
    for e in errors:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        if e.get("type") == "json_invalid":
            parts.append(f"the body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}")
        elif e.get("type") == "extra_forbidden":
            parts.append(f"unsupported parameter {loc!r}")
        else:
            parts.append(f"{loc or 'body'}: {e.get('msg')}")
    return "; ".join(parts) or "invalid request"


def _param(errors: Any) -> str | None:
    for e in errors:
        if e.get("type") == "json_invalid":
            return None
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        if loc:
            return loc[0]
    return None


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=str))


class BackgroundServer:
    """Serve an app with uvicorn in a daemon thread on a loopback port (tests, notebooks, the cookbook).

    >>> with BackgroundServer(create_app(lm)) as srv:
    ...     httpx.get(srv.url + "/v1/models")
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import uvicorn

        self.host = host
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.port = port

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:54321`` (append ``/v1`` for OpenAI clients)."""
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.host}:{self.port}")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


def serve(lm: LM, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, max_queue: int = 64,
          log_level: str = "info", pipelines: dict[str, Any] | None = None) -> None:
    """Run the server in the foreground (what ``promptkit serve`` calls)."""
    import uvicorn

    app = create_app(lm, api_key=api_key, max_queue=max_queue, pipelines=pipelines)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
