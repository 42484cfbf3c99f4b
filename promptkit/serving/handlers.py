"""The endpoints: ``/health``, ``/stats``, ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``.

Each checks what it can on the event loop (model, limits), renders prompts and constraints
in a worker thread, and leaves the generations to a :class:`~promptkit.serving.run.Run`.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from jinja2 import TemplateError, TemplateSyntaxError
from pydantic import BaseModel

from ..backends.base import SamplingParams
from ..chat_documents import document_spans
from ..pipeline import Pipeline
from ..stages import Generate
from ..structured import Constraint
from ..types import Generation
from ..wire import Body, ChatBody, CompletionBody, chat_messages, tool_grammar
from .errors import APIError, plain
from .format import DONE, Reply, chat, chat_choice, chunk, completion, completion_choice, event, usage, \
    usage_chunk, usage_of
from .run import Job, admitted
from .served import Served

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default on /v1/completions; chat runs to EOS or the context's end

router = APIRouter()


def served(request: Request) -> Served:
    return request.app.state.served


async def authorized(request: Request, s: Served = Depends(served)) -> None:
    """Count the request, and refuse it without the API key (when the server has one)."""
    s.admission.bump("requests")
    if s.api_key is None:
        return
    given = request.headers.get("authorization", "")
    if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), s.api_key.encode())):
        raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                       type="authentication_error", code="invalid_api_key")


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/v1/models", dependencies=[Depends(authorized)])
async def models(s: Served = Depends(served)) -> dict[str, Any]:
    return {"object": "list", "data": s.model_cards()}


@router.get("/v1/models/{model_id:path}", dependencies=[Depends(authorized)])
async def model(model_id: str, s: Served = Depends(served)) -> dict[str, Any]:
    for card in s.model_cards():
        if card["id"] == model_id:
            return card
    raise APIError(404, f"the model {model_id!r} does not exist", param="model", code="model_not_found")


@router.get("/stats", dependencies=[Depends(authorized)])
async def stats(s: Served = Depends(served)) -> dict[str, Any]:
    """The backend's stats (as of ``stats_age_s`` seconds ago: never waiting on an engine step) and
    the server's counters (live)."""
    snapshot, age = await s.stats.get()
    return {**snapshot, "stats_age_s": age, "server": s.admission.snapshot(), "max_queue": s.limits.max_queue,
            "limits": s.limits.as_dict()}


@router.post("/v1/completions", dependencies=[Depends(authorized)])
async def completions(body: CompletionBody, request: Request, s: Served = Depends(served)) -> Any:
    check_model(s, body)
    prompts = body.prompts()
    if body.model in s.pipelines:
        if len(prompts) != 1 or not isinstance(prompts[0], str):
            raise APIError(400, "a pipeline model takes one text prompt", param="prompt")
        return await run_pipeline(s, request, body, prompts[0], chat=False, limit=body.max_tokens)
    s.limits.check(len(prompts), body.n, body.stop)
    limit = COMPLETIONS_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    want_lp, top = body.logprobs is not None, body.logprobs or 0
    constraint = await anyio.to_thread.run_sync(constraint_of, body)
    params = params_of(s, body, limit or None, want_lp, top, constraint)
    reply = Reply(s.name, s.backend, chat=False, n=body.n, logprobs=want_lp, include_usage=include_usage(body))
    async with admitted(s, request, jobs_of(prompts, params, body), "prompt", constraint_field(body)) as run:
        if body.echo:  # the prompts' own tokens and logprobs come first
            reply.echoes = await run.echoes(prompts, top)
            if limit == 0:
                return await anyio.to_thread.run_sync(lambda: JSONResponse(echo_only(reply, want_lp)))
        return await (run.stream(reply) if body.stream else run.whole(reply))


@router.post("/v1/chat/completions", dependencies=[Depends(authorized)])
async def chat_completions(body: ChatBody, request: Request, s: Served = Depends(served)) -> Any:
    check_model(s, body)
    if body.model in s.pipelines:
        users = [m.text() for m in body.messages if m.role == "user"]
        if not users:
            raise APIError(400, "a pipeline model needs a user message (its input)", param="messages")
        return await run_pipeline(s, request, body, users[-1], chat=True, limit=body.token_limit())
    s.limits.check(1, body.n, body.stop)
    prompt = await anyio.to_thread.run_sync(chat_prompt, s, body)
    params = params_of(s, body, body.token_limit(), bool(body.logprobs), body.top_logprobs or 0, prompt.constraint)
    reply = Reply(s.name, s.backend, chat=True, n=body.n, logprobs=bool(body.logprobs),
                  tools=bool(body.tool_mode()), include_usage=include_usage(body))
    jobs = jobs_of([prompt.text], params, body, [prompt.documents])
    async with admitted(s, request, jobs, "messages", "tools" if body.tool_mode() else constraint_field(body)) as run:
        return await (run.stream(reply) if body.stream else run.whole(reply))


# -- preparing a request ----------------------------------------------------------------------
def check_model(s: Served, body: Body) -> None:
    if body.model != s.name and body.model not in s.pipelines:
        known = ", ".join(repr(m) for m in [s.name, *s.pipelines])
        raise APIError(404, f"the model {body.model!r} does not exist; this server serves {known}",
                       param="model", code="model_not_found")


@dataclass
class ChatPrompt:
    text: str
    documents: list[tuple[int, int]] | None
    constraint: Constraint | None


def chat_prompt(s: Served, body: ChatBody) -> ChatPrompt:
    """(worker thread) The chat's prompt text through the model's template, the character spans
    of its documents (when the backend reuses their KV) and its output constraint."""
    constraint = constraint_of(body)
    if body.tool_mode():
        try:
            constraint = Constraint(grammar=tool_grammar(body, constraint))
        except ValueError as e:
            raise APIError(400, f"the tools' parameters cannot be followed: {plain(e)}", param="tools") from None
    try:
        text = s.backend.apply_chat_template(chat_messages(body))
    except TemplateSyntaxError:
        raise  # the template itself is broken: the server's fault
    except (TemplateError, ValueError, TypeError) as e:  # the template refuses these messages
        raise APIError(400, f"the model's chat template refuses these messages: {e}", param="messages") from None
    documents = document_spans(text, body.messages) if getattr(s.backend, "supports_kv_reuse", False) else None
    return ChatPrompt(text, documents or None, constraint)


def constraint_of(body: Body) -> Constraint | None:
    """(worker thread: compiling a schema can take a while) The request's output constraint."""
    try:
        return body.constraint()
    except ValueError as e:
        raise APIError(400, plain(e), param=constraint_field(body)) from None


def constraint_field(body: Body) -> str | None:
    fields = sorted(body.constraint_fields())
    return fields[0] if len(fields) == 1 else None


def params_of(s: Served, body: Body, limit: int | None, logprobs: bool, top: int, constraint: Constraint | None
              ) -> SamplingParams:
    if limit is not None and limit > s.backend.max_context:
        raise APIError(400, f"max_tokens={limit} exceeds the model's context of {s.backend.max_context} tokens",
                       param="max_tokens")
    try:
        return SamplingParams(
            max_tokens=limit, temperature=body.temperature or 0.0, top_p=body.top_p or 1.0, stop=body.stop,
            seed=body.seed, logprobs=logprobs, top_logprobs=top, constraint=constraint,
            presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
            logit_bias=body.logit_bias or {})
    except ValueError as e:
        raise APIError(400, str(e)) from None


def jobs_of(prompts: list[Any], params: SamplingParams, body: Body, documents: list[Any] | None = None
            ) -> list[Job]:
    """Each prompt's ``n`` choices; with a seed, choice ``k`` of the request draws with ``seed + k``."""
    jobs: list[Job] = []
    for i, p in enumerate(prompts):
        for _ in range(body.n):
            own = params if params.seed is None or body.n == 1 else \
                params.model_copy(update={"seed": body.choice_seed(len(jobs))})
            jobs.append(Job(p, own, documents[i] if documents else None))
    return jobs


def include_usage(body: Body) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def echo_only(reply: Reply, want_lp: bool) -> dict[str, Any]:
    """``max_tokens=0`` with ``echo``: each prompt back with its logprobs, nothing generated."""
    echoes = reply.echoes or []
    choices = [completion_choice(k, e.text, "length", e.logprobs() if want_lp else None)
               for k, e in enumerate(echoes) for _ in range(reply.n)]
    return completion(reply.model, choices, usage(sum(len(e.tl.token_ids) for e in echoes), 0, 0))


# -- served pipelines ---------------------------------------------------------------------------
async def run_pipeline(s: Served, request: Request, body: Body, text: str, chat: bool, limit: int | None) -> Any:
    """Run a served pipeline on one input; streamed as a single chunk when asked to stream."""
    s.limits.check(1, body.n, body.stop)
    try:
        pipeline = tuned(s.pipelines[body.model], body.pipeline_settings(limit))
    except ValueError as e:
        raise APIError(400, str(e)) from None
    async with admitted(s, request, [Job(text, SamplingParams())], "messages" if chat else "prompt") as run:
        record = await run.call(pipeline, text)
    out = record.output if isinstance(record.output, str) else \
        record.output.model_dump_json() if isinstance(record.output, BaseModel) else \
        json.dumps(record.output, default=str)
    g = Generation(text=out, finish_reason=record.generation.finish_reason if record.generation else "stop",
                   usage=record.generation.usage if record.generation else Generation(text="").usage)
    reply = Reply(body.model, s.backend, chat=chat, include_usage=include_usage(body))
    if body.stream:
        return StreamingResponse(iter(pipeline_events(reply, g)), media_type="text/event-stream")
    if chat:
        return chat_reply(reply, g)
    return completion(body.model, [completion_choice(0, g.text, g.finish_reason, None)], usage_of([g]), reply.rid)


def chat_reply(reply: Reply, g: Generation) -> dict[str, Any]:
    return chat(reply.model, reply.rid, [chat_choice(0, g, reply.backend, False)], usage_of([g]))


def pipeline_events(reply: Reply, g: Generation) -> list[str]:
    events = [chunk(reply.model, reply.rid, g.text, g.finish_reason, reply.chat)]
    if reply.chat:
        events.insert(0, chunk(reply.model, reply.rid, {"role": "assistant", "content": ""}, None, True))
    if reply.include_usage:
        events.append(usage_chunk(reply.model, reply.rid, reply.chat, usage_of([g])))
    return [event(e) for e in events] + [DONE]


def tuned(pipeline: Pipeline, settings: dict[str, Any]) -> Pipeline:
    """``pipeline`` with a request's sampling settings in its generate stages: ``max_tokens`` caps the
    stage's own, ``stop`` adds to its stops, the others replace the stage's values."""
    if not settings:
        return pipeline
    if not any(isinstance(s, Generate) for s in pipeline.stages):
        raise ValueError(f"this pipeline does not generate text, so {', '.join(sorted(settings))} cannot apply to it")

    def tuned_stage(stage: Generate) -> Generate:
        update = dict(settings)
        if "max_tokens" in update and stage.max_tokens is not None:
            update["max_tokens"] = min(stage.max_tokens, update["max_tokens"])
        if "stop" in update:
            update["stop"] = [*stage.stop, *update["stop"]]
        return stage.model_copy(update=update)

    stages = [tuned_stage(s) if isinstance(s, Generate) else s for s in pipeline.stages]
    return Pipeline(*stages, name=pipeline.name, input_key=pipeline.input_key)
