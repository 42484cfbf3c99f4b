"""An OpenAI-compatible HTTP server over an :class:`~promptkit.lm.LM` (``promptkit serve``).

Endpoints: ``/v1/models``, ``/v1/completions`` (lists of prompts, token-id prompts, ``echo``
with prompt logprobs and top_logprobs, so remote clients and lm-eval can score),
``/v1/chat/completions`` (``response_format``, ``tools``/``tool_choice``, ``stream`` as
server-sent events with ``stream_options.include_usage``), ``/stats`` and ``/health``.
Both take ``n``, penalties, ``logit_bias`` and vLLM's ``guided_*`` constraints; the
accepted fields are declared in :mod:`promptkit.wire`, and any other is refused by name.

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
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from .backends.base import ContextLengthError, GenerationError, SamplingParams, StreamEvent, text_bytes
from .chat_documents import document_spans
from .engine.engine import Cancelled
from .lm import LM
from .pipeline import Pipeline
from .stages import Generate
from .structured import Constraint
from .types import Generation, TokenLogprobs
from .wire import Body, ChatBody, CompletionBody, PromptInput, chat_messages, parse_tool_calls, tool_grammar

DISCONNECT_POLL_S = 0.25  # how often a non-streamed request checks that its client is still there
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default on /v1/completions; chat runs to EOS or the context's end


class APIError(Exception):
    """An error answered as OpenAI's ``{"error": {...}}`` body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


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
        message = str(e.detail)
        if e.status_code == 400 and "parsing the body" in message:  # FastAPI's words for undecodable bytes
            message = "the body could not be read: send JSON encoded as UTF-8"
        return await _api_error(request, APIError(e.status_code, message, code=str(e.status_code)))

    @app.exception_handler(Cancelled)
    async def _cancelled(request: Request, e: Cancelled) -> Response:
        counters.bump("cancelled")
        return Response(status_code=499)  # nobody reads it: the client has gone

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

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(guard)])
    async def model(model_id: str) -> dict[str, Any]:
        for card in (await models())["data"]:
            if card["id"] == model_id:
                return card
        raise APIError(404, f"the model {model_id!r} does not exist", param="model", code="model_not_found")

    @app.get("/stats", dependencies=[Depends(guard)])
    async def stats() -> dict[str, Any]:
        return {**_jsonable(lm.stats()), "server": counters.snapshot(), "max_queue": max_queue}

    def check_model(body: Body) -> None:
        if body.model != name and body.model not in pipelines:
            known = ", ".join(repr(m) for m in [name, *pipelines])
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {known}",
                           param="model", code="model_not_found")

    def params_of(body: Body, limit: int | None, logprobs: bool, top: int, constraint: Constraint | None
                  ) -> SamplingParams:
        if limit is not None and limit > backend.max_context:
            raise APIError(400, f"max_tokens={limit} exceeds the model's context of {backend.max_context} tokens",
                           param="max_tokens")
        try:
            return SamplingParams(
                max_tokens=limit, temperature=body.temperature or 0.0, top_p=body.top_p or 1.0, stop=body.stop,
                seed=body.seed, logprobs=logprobs, top_logprobs=top, constraint=constraint,
                presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
                logit_bias=body.logit_bias or {})
        except ValueError as e:
            raise APIError(400, str(e)) from None

    @app.post("/v1/completions", dependencies=[Depends(guard)])
    async def completions(body: CompletionBody, request: Request) -> Any:
        check_model(body)
        prompts = body.prompts()
        if body.model in pipelines:
            if len(prompts) != 1 or not isinstance(prompts[0], str):
                raise APIError(400, "a pipeline model takes one text prompt", param="prompt")
            return await _pipeline(body, prompts[0], chat=False, limit=body.max_tokens)
        limit = COMPLETIONS_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        want_lp, top = body.logprobs is not None, body.logprobs or 0
        params = params_of(body, limit or None, want_lp, top, _constraint(body))
        echoes = None
        if body.echo:  # the prompts' own tokens and logprobs come first
            with counters.slot():
                tls = await _in_thread(limiter, lambda: backend.token_logprobs(prompts, top_logprobs=top) if top
                                       else backend.token_logprobs(prompts))
            echoes = [_Echo(backend, p, tl) for p, tl in zip(prompts, tls)]
            if limit == 0:
                counters.bump("ok")
                choices = [_completion_choice(k, e.text, "length", e.logprobs() if want_lp else None)
                           for k, e in enumerate(echoes) for _ in range(body.n)]
                usage = _usage(sum(len(e.tl.token_ids) for e in echoes), 0, 0)
                return _completion(name, choices, usage)
        return await _serve(request, body, prompts, params, chat=False, echoes=echoes)

    @app.post("/v1/chat/completions", dependencies=[Depends(guard)])
    async def chat_completions(body: ChatBody, request: Request) -> Any:
        check_model(body)
        if body.model in pipelines:
            users = [m.text() for m in body.messages if m.role == "user"]
            if not users:
                raise APIError(400, "a pipeline model needs a user message (its input)", param="messages")
            return await _pipeline(body, users[-1], chat=True, limit=body.token_limit())
        constraint = _constraint(body)
        if body.tool_mode():
            constraint = Constraint(grammar=tool_grammar(body, constraint))
        text = backend.apply_chat_template(chat_messages(body))
        params = params_of(body, body.token_limit(), bool(body.logprobs), body.top_logprobs or 0, constraint)
        documents = document_spans(text, body.messages) if getattr(backend, "supports_kv_reuse", False) else None
        return await _serve(request, body, [text], params, chat=True, documents=[documents] if documents else None)

    async def _pipeline(body: Body, text: str, chat: bool, limit: int | None) -> Any:
        """Run a served pipeline on one input; streamed as a single chunk when asked to stream."""
        try:
            pipeline = _tuned(pipelines[body.model], body.pipeline_settings(limit))
        except ValueError as e:
            raise APIError(400, str(e)) from None
        with counters.slot():
            record = await _in_thread(limiter, lambda: pipeline(text))
        out = record.output if isinstance(record.output, str) else \
            record.output.model_dump_json() if isinstance(record.output, BaseModel) else \
            json.dumps(record.output, default=str)
        g = Generation(text=out, finish_reason=record.generation.finish_reason if record.generation else "stop",
                       usage=record.generation.usage if record.generation else Generation(text="").usage)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        counters.bump("ok")
        if body.stream:
            events = [_chunk(body.model, rid, g.text, g.finish_reason, chat)]
            if chat:
                events.insert(0, _chunk(body.model, rid, {"role": "assistant", "content": ""}, None, chat=True))
            if body.stream_options and body.stream_options.include_usage:
                events.append({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                               "created": int(time.time()), "model": body.model, "choices": [],
                               "usage": _usage_of([g])})
            lines = [_event(e) for e in events] + ["data: [DONE]\n\n"]
            return StreamingResponse(iter(lines), media_type="text/event-stream")
        if chat:
            return _chat(body.model, rid, [_chat_choice(0, g, backend, False)], _usage_of([g]))
        return _completion(body.model, [_completion_choice(0, g.text, g.finish_reason, None)], _usage_of([g]), rid)

    async def _serve(request: Request, body: Body, prompts: list[PromptInput], params: SamplingParams, chat: bool,
                     echoes: list[_Echo] | None = None, documents: list[list[tuple[int, int]]] | None = None) -> Any:
        """Generate ``body.n`` choices per prompt (all in the engine's batch), answered whole or streamed.
        ``documents``: per prompt, the character spans of its documents (their KV may be reused)."""
        jobs = [(i, p) for i, p in enumerate(prompts) for _ in range(body.n)]
        per = [params if params.seed is None or body.n == 1 else params.model_copy(update={"seed": body.choice_seed(k)})
               for k in range(len(jobs))]
        docs = [documents[i] for i, _ in jobs] if documents else None
        if not body.stream and all(pp == params for pp in per):  # one batch through the batch API
            extra = {"documents": docs} if docs else {}
            cancellable = getattr(backend, "supports_cancel", False)
            with counters.slot():
                gens = await _watched(request, limiter, lambda cancel: backend.generate(
                    [p for _, p in jobs], params, **extra, **({"cancel": cancel} if cancellable else {})))
            counters.bump("ok")
            return _reply(body, jobs, gens, params, chat, echoes)
        slot = counters.slot()
        slot.__enter__()
        streams = [backend.generate_stream(p, pp, **({"documents": docs[k]} if docs else {}))
                   for k, ((_, p), pp) in enumerate(zip(jobs, per))]
        try:  # request errors (a prompt too long, a bad constraint) surface here, as 4xx
            firsts = await _watched(request, limiter, lambda cancel: [_first(s, cancel) for s in streams])
        except BaseException:
            _close_all(streams)
            slot.__exit__(None, None, None)
            raise
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        tools = chat and bool(body.tool_mode())  # type: ignore[attr-defined]
        if not body.stream:
            try:
                gens = await _watched(request, limiter, lambda cancel: _drain_all(firsts, streams, cancel))
            finally:
                _close_all(streams)
                slot.__exit__(None, None, None)
            counters.bump("ok")
            return _reply(body, jobs, gens, params, chat, echoes, rid)
        counters.bump("streams")
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(rid, firsts, streams, slot, chat, params.logprobs, tools, include_usage,
                                      body.n), media_type="text/event-stream")

    def _reply(body: Body, jobs: list, gens: list[Generation], params: SamplingParams, chat: bool,
               echoes: list[_Echo] | None, rid: str | None = None) -> dict[str, Any]:
        """The whole (non-streamed) response for ``gens``, one per job."""
        rid = rid or ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        usage = _usage_of(gens[:: body.n], gens)
        if chat:
            tools = bool(body.tool_mode())  # type: ignore[attr-defined]
            return _chat(name, rid, [_chat_choice(k, g, backend, tools) for k, g in enumerate(gens)], usage)
        choices = []
        for k, ((i, _), g) in enumerate(zip(jobs, gens)):
            echo = echoes[i] if echoes else None
            lp = _legacy_logprobs(backend, g, len(echo.text) if echo else 0) if params.logprobs else None
            if echo and lp is not None:
                lp = _join_logprobs(echo.logprobs(), lp)
            choices.append(_completion_choice(k, (echo.text if echo else "") + g.text, g.finish_reason, lp))
        return _completion(name, choices, usage, rid)

    async def _sse(rid: str, firsts: list[StreamEvent], streams: list[Iterator[StreamEvent]], slot: Any,
                   chat: bool, logprobs: bool, tools: bool, include_usage: bool, n: int) -> AsyncIterator[str]:
        done = False
        offsets = [0] * len(streams)
        finals: list[Generation | None] = [None] * len(streams)
        try:
            if chat:
                for k in range(len(streams)):
                    yield _event(_chunk(name, rid, {"role": "assistant", "content": ""}, None, chat=True, index=k))
            evs: list[StreamEvent | None] = list(firsts)
            while True:
                for k, ev in enumerate(evs):
                    if ev is None or finals[k] is not None:
                        continue
                    lp = None
                    if logprobs and ev.logprobs is not None:  # the logprobs of the tokens behind this chunk
                        lp = _chat_logprobs(backend, ev) if chat else _legacy_logprobs(backend, ev, offsets[k])
                    offsets[k] += len(ev.text)
                    g = ev.generation
                    if tools:  # a tool-call reply is sent whole, once it can be parsed
                        if g is not None:
                            yield _event(_chunk(name, rid, _tool_delta(g), _finish(g, True), chat, index=k,
                                                logprobs=lp))
                    elif g is not None:
                        yield _event(_chunk(name, rid, ev.text, g.finish_reason, chat, index=k, logprobs=lp))
                    elif ev.text or lp:
                        yield _event(_chunk(name, rid, ev.text, None, chat, index=k, logprobs=lp))
                    finals[k] = g
                live = [k for k, g in enumerate(finals) if g is None]
                if not live:
                    break
                evs = await _in_thread(limiter, lambda: _advance(streams, live))
            if include_usage:
                gens = [g for g in finals if g is not None]
                yield _event({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                              "created": int(time.time()), "model": name, "choices": [],
                              "usage": _usage_of(gens[::n], gens)})
            yield "data: [DONE]\n\n"
            done = True
            counters.bump("ok")
        except APIError as e:  # after the first chunk the status is sent: the error goes in the stream
            done = True
            counters.bump("client_errors" if e.status < 500 else "server_errors")
            yield _event({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}})
        except Exception as e:
            done = True
            counters.bump("server_errors")
            yield _event({"error": {"message": f"the generation failed: {e}", "type": "server_error",
                                    "param": None, "code": None}})
        finally:
            if not done:
                counters.bump("cancelled")
            # Closing the generators aborts the requests in the engine and frees their batch slots;
            # shielded so that it runs even when the client's disconnect cancelled us.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(lambda: _close_all(streams))
            slot.__exit__(None, None, None)

    return app


# -- helpers -----------------------------------------------------------------------
async def _watched(request: Request, limiter: anyio.CapacityLimiter, fn: Callable[[threading.Event], Any]) -> Any:
    """``fn(cancel)`` in a worker thread, with ``cancel`` set if the client disconnects meanwhile, so
    a request nobody waits for stops decoding."""
    cancel = threading.Event()

    async def watch() -> None:
        while not cancel.is_set():
            await anyio.sleep(DISCONNECT_POLL_S)
            if await request.is_disconnected():
                cancel.set()

    outcome: dict[str, Any] = {}
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(watch)
        try:
            outcome["value"] = await _in_thread(limiter, lambda: fn(cancel))
        except Exception as e:  # raised outside the task group, which would wrap it in an ExceptionGroup
            outcome["error"] = e
        finally:
            tasks.cancel_scope.cancel()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


async def _in_thread(limiter: anyio.CapacityLimiter, fn: Any) -> Any:
    try:
        return await anyio.to_thread.run_sync(fn, limiter=limiter)
    except ContextLengthError as e:
        raise APIError(400, _context_message(e), code="context_length_exceeded") from None
    except GenerationError as e:
        raise APIError(500, str(e), type="server_error") from None
    except ValueError as e:
        raise APIError(400, str(e)) from None


def _tuned(pipeline: Pipeline, settings: dict[str, Any]) -> Pipeline:
    """``pipeline`` with a request's sampling settings in its generate stages: ``max_tokens`` caps the
    stage's own, ``stop`` adds to its stops, the others replace the stage's values."""
    if not settings:
        return pipeline
    if not any(isinstance(s, Generate) for s in pipeline.stages):
        raise ValueError(f"this pipeline does not generate text, so {', '.join(sorted(settings))} cannot apply to it")

    def tuned(stage: Generate) -> Generate:
        update = dict(settings)
        if "max_tokens" in update and stage.max_tokens is not None:
            update["max_tokens"] = min(stage.max_tokens, update["max_tokens"])
        if "stop" in update:
            update["stop"] = [*stage.stop, *update["stop"]]
        return stage.model_copy(update=update)

    stages = [tuned(s) if isinstance(s, Generate) else s for s in pipeline.stages]
    return Pipeline(*stages, name=pipeline.name, input_key=pipeline.input_key)


def _context_message(e: ContextLengthError) -> str:
    """The context-length error in terms of what this server accepts (no library-only options)."""
    if getattr(e, "context", None) is None:
        return str(e)
    return (f"This model's maximum context length is {e.context} tokens, but the prompt has {e.prompt_tokens} tokens "
            f"and {e.new_tokens} more were asked for. Shorten the prompt or lower max_tokens "
            "(on /v1/chat/completions, leaving max_tokens out uses whatever room the prompt leaves).")


def _constraint(body: Body) -> Constraint | None:
    try:
        return body.constraint()
    except ValueError as e:
        fields = sorted(body.constraint_fields())
        raise APIError(400, _plain(e), param=fields[0] if len(fields) == 1 else None) from None


def _plain(e: ValueError) -> str:
    """An error's message without pydantic's framing (its model name and error count)."""
    if isinstance(e, ValidationError):
        return "; ".join(str(err.get("msg", "")).removeprefix("Value error, ") for err in e.errors())
    return str(e)


def _first(events: Iterator[StreamEvent], cancel: threading.Event | None = None) -> StreamEvent:
    if cancel is not None and cancel.is_set():
        raise Cancelled("the client disconnected")
    ev = next(events, None)
    if ev is None:
        raise GenerationError("the backend produced no output")
    return ev


def _advance(streams: list[Iterator[StreamEvent]], live: list[int]) -> list[StreamEvent | None]:
    """The next event of each live stream (one round, so all of them stay in the engine's batch)."""
    out: list[StreamEvent | None] = [None] * len(streams)
    for k in live:
        ev = next(streams[k], None)
        if ev is None:
            raise GenerationError("the backend's stream ended without a final generation")
        out[k] = ev
    return out


def _drain_all(firsts: list[StreamEvent], streams: list[Iterator[StreamEvent]],
               cancel: threading.Event | None = None) -> list[Generation]:
    evs: list[StreamEvent | None] = list(firsts)
    while True:
        if cancel is not None and cancel.is_set():
            raise Cancelled("the client disconnected")  # the caller closes the streams, which aborts them
        live = [k for k, ev in enumerate(evs) if ev is not None and ev.generation is None]
        if not live:
            return [ev.generation for ev in evs]  # type: ignore[union-attr, misc]
        for k, ev in enumerate(_advance(streams, live)):
            if ev is not None:
                evs[k] = ev


def _close_all(streams: list[Iterator[StreamEvent]]) -> None:
    for s in streams:
        s.close()  # type: ignore[attr-defined]


def _usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _usage_of(per_prompt: list[Generation], gens: list[Generation] | None = None) -> dict[str, Any]:
    """Usage of a reply: each prompt counted once (``per_prompt``), every choice's completion (``gens``)."""
    gens = per_prompt if gens is None else gens
    return _usage(sum(g.usage.prompt_tokens for g in per_prompt), sum(g.usage.completion_tokens for g in gens),
                  sum(g.usage.cached_tokens for g in per_prompt))


def _completion_choice(index: int, text: str, finish: str, logprobs: Any) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def _completion(model: str, choices: list[dict[str, Any]], usage: dict[str, Any],
                rid: str | None = None) -> dict[str, Any]:
    return {"id": rid or "cmpl-" + uuid.uuid4().hex[:24], "object": "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage}


def _finish(g: Generation, tools: bool) -> str:
    return "tool_calls" if tools and parse_tool_calls(g.text) else g.finish_reason


def _message(g: Generation, tools: bool) -> dict[str, Any]:
    calls = parse_tool_calls(g.text) if tools else None
    if calls:
        return {"role": "assistant", "content": None, "tool_calls": calls}
    return {"role": "assistant", "content": g.text}


def _tool_delta(g: Generation) -> dict[str, Any]:
    msg = _message(g, True)
    if "tool_calls" in msg:
        return {"tool_calls": [{"index": i, **c} for i, c in enumerate(msg["tool_calls"])]}
    return {"content": msg["content"]}


def _chat_choice(index: int, g: Generation, backend: Any, tools: bool) -> dict[str, Any]:
    lp = _chat_logprobs(backend, g) if g.logprobs is not None else None
    return {"index": index, "message": _message(g, tools), "logprobs": lp, "finish_reason": _finish(g, tools)}


def _chat(model: str, rid: str, choices: list[dict[str, Any]], usage: dict[str, Any]) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage}


def _chunk(model: str, rid: str, delta: Any, finish: str | None, chat: bool, index: int = 0,
           usage: dict[str, Any] | None = None, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    if chat:
        d = delta if isinstance(delta, dict) else ({"content": delta} if delta else {})
        choice = {"index": index, "delta": d, "logprobs": logprobs, "finish_reason": finish}
    else:
        choice = {"index": index, "text": delta, "logprobs": logprobs, "finish_reason": finish}
    out = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
           "created": int(time.time()), "model": model, "choices": [choice]}
    if usage is not None:
        out["usage"] = usage
    return out


def _event(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Echo:
    """A prompt as echoed back: its text and the logprobs object of its tokens."""

    def __init__(self, backend: Any, prompt: PromptInput, tl: TokenLogprobs) -> None:
        self.tl = tl
        self.text = prompt if isinstance(prompt, str) else backend.decode(tl.token_ids)
        self.tokens, self.offsets = _pieces(backend, tl.token_ids), _offsets(backend, tl.token_ids, 0)

    def logprobs(self) -> dict[str, Any]:
        """OpenAI's legacy logprobs object for the prompt's tokens (the first token has none)."""
        tl = self.tl
        return {"tokens": self.tokens, "token_logprobs": tl.logprobs, "top_logprobs": tl.top_logprobs,
                "text_offset": self.offsets, "token_ids": tl.token_ids}


def _join_logprobs(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two legacy logprobs objects, one after the other (the prompt's, then the generated tokens')."""
    tops_a = a["top_logprobs"] or [None] * len(a["tokens"])
    tops_b = b["top_logprobs"] or [None] * len(b["tokens"])
    out = {k: a[k] + b[k] for k in ("tokens", "token_logprobs", "text_offset", "token_ids")}
    out["top_logprobs"] = tops_a + tops_b if a["top_logprobs"] or b["top_logprobs"] else None
    return out


def _pieces(backend: Any, token_ids: list[int]) -> list[str]:
    """Each token as logprobs name it: its text, or ``bytes:\\x..`` for part of a character."""
    if hasattr(backend, "token_texts"):
        return backend.token_texts(token_ids)
    decode = getattr(backend, "decode", None)
    return [decode([t]) if decode else str(t) for t in token_ids]


def _offsets(backend: Any, token_ids: list[int], start: int) -> list[int]:
    """Where each token begins in the text, counted from ``start``."""
    if hasattr(backend, "char_offsets"):
        return backend.char_offsets(token_ids, start)
    out, pos = [], start
    for piece in _pieces(backend, token_ids):
        out.append(pos)
        pos += len(piece)
    return out


def _legacy_logprobs(backend: Any, g: Generation | StreamEvent, start: int) -> dict[str, Any]:
    """Completions' logprobs object for generated tokens, text offsets counted from ``start``
    (the characters of echoed prompt, or of text already streamed)."""
    return {"tokens": _pieces(backend, g.token_ids), "token_logprobs": g.logprobs, "top_logprobs": g.top_logprobs,
            "text_offset": _offsets(backend, g.token_ids, start), "token_ids": g.token_ids}


def _chat_logprobs(backend: Any, g: Generation | StreamEvent) -> dict[str, Any]:
    """Chat's logprobs object: one entry per generated token, with its most likely alternatives and
    each token's bytes (joined, they spell the content even where a token splits a character)."""
    pieces = _pieces(backend, g.token_ids)
    tops = g.top_logprobs or [{} for _ in pieces]

    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(text_bytes(token))}

    return {"content": [{**entry(t, p), "top_logprobs": [entry(a, b) for a, b in top.items()]}
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
