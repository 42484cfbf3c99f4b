"""OpenAI's response shapes: whole completions and chat completions, stream chunks, usage and logprobs.

Building these names tokens (tokenizer work), so the server calls them in worker threads.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..backends.base import StreamEvent, text_bytes
from ..types import Generation, TokenLogprobs
from ..wire import PromptInput, parse_tool_calls


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def usage_of(per_prompt: list[Generation], gens: list[Generation] | None = None) -> dict[str, Any]:
    """Usage of a reply: each prompt counted once (``per_prompt``), every choice's completion (``gens``)."""
    gens = per_prompt if gens is None else gens
    return usage(sum(g.usage.prompt_tokens for g in per_prompt), sum(g.usage.completion_tokens for g in gens),
                 sum(g.usage.cached_tokens for g in per_prompt))


def completion_choice(index: int, text: str, finish: str, logprobs: Any) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def completion(model: str, choices: list[dict[str, Any]], use: dict[str, Any], rid: str | None = None
               ) -> dict[str, Any]:
    return {"id": rid or new_id(False), "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": use}


def chat(model: str, rid: str, choices: list[dict[str, Any]], use: dict[str, Any]) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": use}


def finish_of(g: Generation, tools: bool) -> str:
    return "tool_calls" if tools and parse_tool_calls(g.text) else g.finish_reason


def message(g: Generation, tools: bool) -> dict[str, Any]:
    calls = parse_tool_calls(g.text) if tools else None
    if calls:
        return {"role": "assistant", "content": None, "tool_calls": calls}
    return {"role": "assistant", "content": g.text}


def tool_delta(g: Generation) -> dict[str, Any]:
    msg = message(g, True)
    if "tool_calls" in msg:
        return {"tool_calls": [{"index": i, **c} for i, c in enumerate(msg["tool_calls"])]}
    return {"content": msg["content"]}


def chat_choice(index: int, g: Generation, backend: Any, tools: bool) -> dict[str, Any]:
    lp = chat_logprobs(backend, g) if g.logprobs is not None else None
    return {"index": index, "message": message(g, tools), "logprobs": lp, "finish_reason": finish_of(g, tools)}


def chunk(model: str, rid: str, delta: Any, finish: str | None, is_chat: bool, index: int = 0,
          logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    if is_chat:
        d = delta if isinstance(delta, dict) else ({"content": delta} if delta else {})
        choice = {"index": index, "delta": d, "logprobs": logprobs, "finish_reason": finish}
    else:
        choice = {"index": index, "text": delta, "logprobs": logprobs, "finish_reason": finish}
    return {"id": rid, "object": "chat.completion.chunk" if is_chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice]}


def usage_chunk(model: str, rid: str, is_chat: bool, use: dict[str, Any]) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk" if is_chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [], "usage": use}


def event(obj: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


DONE = "data: [DONE]\n\n"


class Echo:
    """A prompt as echoed back: its text and the logprobs object of its tokens."""

    def __init__(self, backend: Any, prompt: PromptInput, tl: TokenLogprobs) -> None:
        self.tl = tl
        self.text = prompt if isinstance(prompt, str) else backend.decode(tl.token_ids)
        self.tokens, self.offsets = pieces(backend, tl.token_ids), offsets(backend, tl.token_ids, 0)

    def logprobs(self) -> dict[str, Any]:
        """OpenAI's legacy logprobs object for the prompt's tokens (the first token has none)."""
        tl = self.tl
        return {"tokens": self.tokens, "token_logprobs": tl.logprobs, "top_logprobs": tl.top_logprobs,
                "text_offset": self.offsets, "token_ids": tl.token_ids}


def join_logprobs(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two legacy logprobs objects, one after the other (the prompt's, then the generated tokens')."""
    tops_a = a["top_logprobs"] or [None] * len(a["tokens"])
    tops_b = b["top_logprobs"] or [None] * len(b["tokens"])
    out = {k: a[k] + b[k] for k in ("tokens", "token_logprobs", "text_offset", "token_ids")}
    out["top_logprobs"] = tops_a + tops_b if a["top_logprobs"] or b["top_logprobs"] else None
    return out


def pieces(backend: Any, token_ids: list[int]) -> list[str]:
    """Each token as logprobs name it: its text, or ``bytes:\\x..`` for part of a character."""
    if hasattr(backend, "token_texts"):
        return backend.token_texts(token_ids)
    decode = getattr(backend, "decode", None)
    return [decode([t]) if decode else str(t) for t in token_ids]


def offsets(backend: Any, token_ids: list[int], start: int) -> list[int]:
    """Where each token begins in the text, counted from ``start``."""
    if hasattr(backend, "char_offsets"):
        return backend.char_offsets(token_ids, start)
    out, pos = [], start
    for piece in pieces(backend, token_ids):
        out.append(pos)
        pos += len(piece)
    return out


def legacy_logprobs(backend: Any, g: Generation | StreamEvent, start: int) -> dict[str, Any]:
    """Completions' logprobs object for generated tokens, text offsets counted from ``start``
    (the characters of echoed prompt, or of text already streamed)."""
    return {"tokens": pieces(backend, g.token_ids), "token_logprobs": g.logprobs, "top_logprobs": g.top_logprobs,
            "text_offset": offsets(backend, g.token_ids, start), "token_ids": g.token_ids}


def chat_logprobs(backend: Any, g: Generation | StreamEvent) -> dict[str, Any]:
    """Chat's logprobs object: one entry per generated token, with its most likely alternatives and
    each token's bytes (joined, they spell the content even where a token splits a character)."""
    names = pieces(backend, g.token_ids)
    tops = g.top_logprobs or [{} for _ in names]

    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(text_bytes(token))}

    return {"content": [{**entry(t, p), "top_logprobs": [entry(a, b) for a, b in top.items()]}
                        for t, p, top in zip(names, g.logprobs or [], tops)]}


@dataclass
class Reply:
    """How one request's generations are answered: its endpoint's shape and what it asked to see.
    Job ``k`` is choice ``k % n`` of prompt ``k // n``."""

    model: str
    backend: Any
    chat: bool
    n: int = 1
    logprobs: bool = False
    tools: bool = False
    include_usage: bool = False
    echoes: list[Echo] | None = None
    rid: str = ""

    def __post_init__(self) -> None:
        self.rid = self.rid or new_id(self.chat)

    def whole(self, gens: list[Generation]) -> dict[str, Any]:
        """The non-streamed response body, one choice per job."""
        use = usage_of(gens[:: self.n], gens)
        if self.chat:
            return chat(self.model, self.rid, [chat_choice(k, g, self.backend, self.tools)
                                               for k, g in enumerate(gens)], use)
        choices = []
        for k, g in enumerate(gens):
            echo = self.echoes[k // self.n] if self.echoes else None
            lp = legacy_logprobs(self.backend, g, len(echo.text) if echo else 0) if self.logprobs else None
            if echo and lp is not None:
                lp = join_logprobs(echo.logprobs(), lp)
            choices.append(completion_choice(k, (echo.text if echo else "") + g.text, g.finish_reason, lp))
        return completion(self.model, choices, use, self.rid)


@dataclass
class ChunkWriter:
    """A streamed reply as server-sent events: each job's chunks as its text comes, then the
    usage (when asked for) and ``[DONE]``."""

    reply: Reply
    jobs: int
    offsets: list[int] = field(default_factory=list)  # characters streamed per job (logprobs' text offsets)
    finals: list[Generation | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.offsets, self.finals = [0] * self.jobs, [None] * self.jobs

    def live(self) -> list[int]:
        """The jobs still generating."""
        return [k for k, g in enumerate(self.finals) if g is None]

    def opening(self) -> list[str]:
        r = self.reply
        if not r.chat:
            return []
        return [event(chunk(r.model, r.rid, {"role": "assistant", "content": ""}, None, True, index=k))
                for k in range(self.jobs)]

    def lines(self, evs: list[StreamEvent | None]) -> list[str]:
        """The events for one round of stream events (None: a job with none this round)."""
        out = []
        for k, ev in enumerate(evs):
            if ev is not None and self.finals[k] is None:
                out.extend(self._lines(k, ev))
                self.finals[k] = ev.generation
        return out

    def _lines(self, k: int, ev: StreamEvent) -> list[str]:
        r, g = self.reply, ev.generation
        lp = None
        if r.logprobs and ev.logprobs is not None:  # the logprobs of the tokens behind this chunk
            lp = chat_logprobs(r.backend, ev) if r.chat else legacy_logprobs(r.backend, ev, self.offsets[k])
        self.offsets[k] += len(ev.text)
        if r.tools:  # a tool-call reply is sent whole, once it can be parsed
            return [] if g is None else [event(chunk(r.model, r.rid, tool_delta(g), finish_of(g, True), True,
                                                     index=k, logprobs=lp))]
        if g is not None or ev.text or lp:
            return [event(chunk(r.model, r.rid, ev.text, g and g.finish_reason, r.chat, index=k, logprobs=lp))]
        return []

    def closing(self) -> list[str]:
        r = self.reply
        gens = [g for g in self.finals if g is not None]
        tail = [event(usage_chunk(r.model, r.rid, r.chat, usage_of(gens[:: r.n], gens)))] if r.include_usage else []
        return [*tail, DONE]
