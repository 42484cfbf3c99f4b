"""A backend over any OpenAI-compatible server (vLLM, SGLang, ``promptkit serve``) with httpx.

``LM("smollm2-135m-instruct", backend="openai", base_url="http://127.0.0.1:8000/v1")``
runs a pipeline unchanged against the server.

Rendering: the facade renders chat prompts to text before they reach a
backend, so this backend needs the model's tokenizer to apply the chat
template. It uses, in order, the ``tokenizer`` given (an object or a local
directory), the embedded model of that name (files already on disk, nothing
fetched), else none: then prompts are sent as plain text (``is_chat`` is
False) and token counts come from the server's ``/tokenize`` where it has one.

Scoring uses ``/v1/completions`` with ``echo=true, logprobs=1, max_tokens=0``:
the server returns the log-probability of every prompt token (vLLM and
``promptkit serve`` do; OpenAI's hosted API does not, and ``score`` then
says so).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from ..structured import Constraint
from ..types import Generation, TokenLogprobs, Usage
from .base import ContextLengthError, PromptInput, SamplingParams, StreamEvent

RETRIES_429 = 5
DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"


class ServerError(RuntimeError):
    """The server answered with an error (the message is the server's, with its status)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{message} (HTTP {status})")
        self.status = status


class OpenAIBackend:
    """The Backend protocol over HTTP.

    ``model``: the id the server serves (``/v1/models``). ``base_url``: ending in
    ``/v1`` (default: ``$PROMPTKIT_BASE_URL``, ``$OPENAI_BASE_URL``, else
    ``http://127.0.0.1:8000/v1``, so a recipe's ``backend: openai`` needs no URL).
    ``api_key``: sent as a Bearer token (default ``$PROMPTKIT_API_KEY`` or ``$OPENAI_API_KEY``). ``tokenizer``: see the module
    docstring. ``max_concurrency``: requests in flight at once for a batch (the
    server batches them). ``max_context``: overrides what the server reports.
    ``constraint_fields``: how constraints travel. A JSON schema always goes as
    ``response_format`` json_schema; a regex, grammar or choice list as vLLM's
    ``guided_regex``/``guided_grammar``/``guided_choice`` (``"guided"``: vLLM before
    0.12 and ``promptkit serve``) or inside ``structured_outputs`` (vLLM 0.11 on).
    """

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None,
                 timeout: float = 120.0, tokenizer: Any = None, max_concurrency: int = 8,
                 max_context: int | None = None, constraint_fields: str = "guided") -> None:
        if constraint_fields not in ("guided", "structured_outputs"):
            raise ValueError("constraint_fields must be 'guided' or 'structured_outputs'")
        self.constraint_fields = constraint_fields
        self.model_name = model
        base_url = base_url or os.environ.get("PROMPTKIT_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
        self.base_url = (base_url or DEFAULT_BASE_URL).rstrip("/")
        api_key = api_key or os.environ.get("PROMPTKIT_API_KEY") or os.environ.get("OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)
        self.max_concurrency = max_concurrency
        self.tokenizer = _load_tokenizer(model, tokenizer)
        self.is_chat = bool(self.tokenizer is not None and getattr(self.tokenizer, "chat_template", None))
        self.max_context = max_context or self._server_context()
        self.requests = 0

    def __repr__(self) -> str:
        return f"OpenAIBackend({self.model_name!r}, base_url={self.base_url!r})"

    # -- HTTP --------------------------------------------------------------------------
    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST JSON; retry 429 with backoff; turn error bodies into clear exceptions."""
        for attempt in range(RETRIES_429 + 1):
            try:
                r = self.http.post(path, json=body)
            except httpx.HTTPError as e:
                raise ServerError(0, f"cannot reach {self.base_url}{path}: {e}") from None
            self.requests += 1
            if r.status_code != 429 or attempt == RETRIES_429:
                break
            time.sleep(min(0.1 * 2**attempt, 2.0))
        if r.status_code >= 400:
            raise _error(r, self.base_url)
        return r.json()

    def _server_context(self) -> int:
        try:
            r = self.http.get("/models")
        except httpx.HTTPError as e:
            raise ServerError(0, f"cannot reach the server at {self.base_url}: {e}") from None
        if r.status_code >= 400:
            raise _error(r, self.base_url)
        cards = {c.get("id"): c for c in r.json().get("data", [])}
        if self.model_name not in cards:
            raise ValueError(f"the server at {self.base_url} does not serve {self.model_name!r}; "
                             f"it serves {sorted(cards)}")
        return int(cards[self.model_name].get("max_model_len") or 4096)

    # -- text ---------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        if not self.is_chat:
            return "\n\n".join(m["content"] for m in messages)
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def count_tokens(self, text: str) -> int:
        if self.tokenizer is not None:
            return len(self.tokenizer(text)["input_ids"])
        url = self.base_url.removesuffix("/v1") + "/tokenize"  # vLLM's endpoint lives beside /v1
        try:
            r = self.http.post(url, json={"model": self.model_name, "prompt": text})
            r.raise_for_status()
            return int(r.json()["count"])
        except (httpx.HTTPError, KeyError, ValueError):
            raise NotImplementedError(
                f"counting tokens needs the model's tokenizer (pass tokenizer='local/dir') or a server with "
                f"/tokenize; {self.base_url} has neither") from None

    # -- generation ------------------------------------------------------------------
    def _body(self, text: PromptInput, params: SamplingParams, **extra: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model_name, "prompt": text, "temperature": params.temperature,
                                "top_p": params.top_p, **extra}
        if params.max_tokens is not None:
            body["max_tokens"] = params.max_tokens
        elif self.max_context:  # completions default to 16 tokens: ask for the rest of the context instead
            body["max_tokens"] = max(1, self.max_context - self._prompt_tokens(text))
        if params.stop:
            body["stop"] = params.stop
        if params.seed is not None:
            body["seed"] = params.seed
        if params.logprobs:
            body["logprobs"] = max(1, params.top_logprobs)
        if params.presence_penalty:
            body["presence_penalty"] = params.presence_penalty
        if params.frequency_penalty:
            body["frequency_penalty"] = params.frequency_penalty
        if params.logit_bias:
            body["logit_bias"] = {str(t): b for t, b in params.logit_bias.items()}
        body.update(self._constraint_fields(params.constraint))
        return body

    def _constraint_fields(self, c: Constraint | None) -> dict[str, Any]:
        if c is None:
            return {}
        if c.json_schema is not None:
            return {"response_format": {"type": "json_schema", "json_schema": {"name": "output", "schema": c.json_schema}}}
        if self.constraint_fields == "structured_outputs":
            key = "regex" if c.regex is not None else "grammar" if c.grammar is not None else "choice"
            return {"structured_outputs": {key: c.regex or c.grammar or c.choices}}
        if c.regex is not None:
            return {"guided_regex": c.regex}
        if c.grammar is not None:
            return {"guided_grammar": c.grammar}
        return {"guided_choice": c.choices}

    def _prompt_tokens(self, text: PromptInput) -> int:
        return len(text) if isinstance(text, list) else self.count_tokens(text)

    def _generate_one(self, text: PromptInput, params: SamplingParams) -> Generation:
        t0 = time.perf_counter()
        data = self._post("/completions", self._body(text, params))
        choice = data["choices"][0]
        lp = choice.get("logprobs") or {}
        return Generation(
            text=choice.get("text") or "", token_ids=list(lp.get("token_ids") or []),
            logprobs=lp.get("token_logprobs") if params.logprobs else None,
            top_logprobs=lp.get("top_logprobs") if params.logprobs and params.top_logprobs else None,
            finish_reason=choice.get("finish_reason") or "length",
            usage=_usage(data.get("usage") or {}, time.perf_counter() - t0),
        )

    def generate(self, texts: list[PromptInput], params: SamplingParams) -> list[Generation]:
        if len(texts) == 1:
            return [self._generate_one(texts[0], params)]
        # One request per prompt, several in flight: the server batches them (continuous batching).
        with ThreadPoolExecutor(min(self.max_concurrency, len(texts))) as pool:
            return list(pool.map(lambda t: self._generate_one(t, params), texts))

    def generate_stream(self, text: PromptInput, params: SamplingParams) -> Iterator[StreamEvent]:
        """Stream over server-sent events; closing the iterator closes the connection (the server cancels)."""
        import json

        t0 = time.perf_counter()
        body = self._body(text, params, stream=True, stream_options={"include_usage": True})
        parts: list[str] = []
        finish, usage = "length", {}
        with self.http.stream("POST", "/completions", json=body) as r:
            if r.status_code >= 400:
                r.read()
                raise _error(r, self.base_url)
            for line in r.iter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                chunk = json.loads(payload)
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices", []):
                    finish = choice.get("finish_reason") or finish
                    if choice.get("text"):
                        parts.append(choice["text"])
                        yield StreamEvent(text=choice["text"])
        gen = Generation(text="".join(parts), finish_reason=finish, usage=_usage(usage, time.perf_counter() - t0))
        yield StreamEvent(generation=gen)

    # -- scoring ----------------------------------------------------------------------
    def _prompt_logprobs(self, text: PromptInput, top_logprobs: int = 0) -> dict[str, Any]:
        """Per-token logprobs of ``text`` itself (echo, no new tokens)."""
        body = {"model": self.model_name, "prompt": text, "max_tokens": 0, "echo": True,
                "logprobs": max(1, top_logprobs), "temperature": 0.0}
        try:
            data = self._post("/completions", body)
        except ServerError as e:
            if isinstance(e, ContextLengthError) or e.status not in (400, 404, 422):
                raise
            raise NotImplementedError(_no_echo(self.base_url, str(e))) from None
        lp = data["choices"][0].get("logprobs") or {}
        if not lp.get("token_logprobs") or not lp.get("text_offset"):
            raise NotImplementedError(_no_echo(self.base_url, "the reply had no prompt logprobs"))
        return lp

    def score(self, texts: list[str], choices: list[list[str]]) -> list[list[float]]:
        """Sum of the logprobs of the tokens that start inside each choice (tokenized with its context)."""
        jobs = [(t, c) for t, opts in zip(texts, choices) for c in opts]
        for _, c in jobs:
            if not c:
                raise ValueError("a choice is empty; score needs text to score")

        def one(job: tuple[str, str]) -> float:
            text, choice = job
            lp = self._prompt_logprobs(text + choice)
            picked = [p for p, off in zip(lp["token_logprobs"], lp["text_offset"]) if off >= len(text)]
            if not picked or any(p is None for p in picked):
                raise ValueError(f"choice {choice!r} has no tokens of its own after the prompt")
            return float(sum(picked))

        with ThreadPoolExecutor(min(self.max_concurrency, max(1, len(jobs)))) as pool:
            flat = iter(list(pool.map(one, jobs)))
        return [[next(flat) for _ in opts] for opts in choices]

    def token_logprobs(self, texts: list[PromptInput], top_logprobs: int = 0) -> list[TokenLogprobs]:
        out = []
        for text in texts:
            lp = self._prompt_logprobs(text, top_logprobs)
            tokens, offs = list(lp.get("tokens") or []), list(lp["text_offset"])
            ends = offs[1:] + [offs[-1] + len(tokens[-1]) if tokens else 0] if isinstance(text, list) else \
                offs[1:] + [len(text)]
            ids = lp.get("token_ids") or (text if isinstance(text, list) else
                                          self.tokenizer(text)["input_ids"] if self.tokenizer is not None else [])
            out.append(TokenLogprobs(token_ids=list(ids), tokens=tokens, logprobs=list(lp["token_logprobs"]),
                                     offsets=list(zip(offs, ends)),
                                     top_logprobs=lp.get("top_logprobs") if top_logprobs else None))
        return out

    def stats(self) -> dict[str, Any]:
        """This client's counters, plus the server's ``/stats`` when it has one (``promptkit serve``)."""
        mine: dict[str, Any] = {"backend": type(self).__name__, "model": self.model_name,
                                "base_url": self.base_url, "http_requests": self.requests}
        try:
            r = self.http.get(self.base_url.removesuffix("/v1") + "/stats")
            if r.status_code == 200:
                return {**r.json(), **mine}
        except httpx.HTTPError:
            pass
        return mine

    def close(self) -> None:
        self.http.close()


def _usage(u: dict[str, Any], seconds: float) -> Usage:
    cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return Usage(prompt_tokens=u.get("prompt_tokens") or 0, completion_tokens=u.get("completion_tokens") or 0,
                 cached_tokens=cached, seconds=seconds)


def _error(r: httpx.Response, base_url: str) -> Exception:
    """An exception for an error reply; context-length errors keep their own type."""
    try:
        err = r.json().get("error") or {}
        message = err.get("message") if isinstance(err, dict) else str(err)
        code = err.get("code") if isinstance(err, dict) else None
    except ValueError:
        message, code = r.text[:500], None
    message = message or r.reason_phrase
    if code == "context_length_exceeded" or "context length" in message.lower() or "context is" in message:
        return _ContextError(r.status_code, message)
    if r.status_code == 401:
        return ServerError(401, f"{base_url} refused the API key: {message}")
    return ServerError(r.status_code, f"{base_url}: {message}")


class _ContextError(ServerError, ContextLengthError):
    """A context-length error from the server: both a ServerError and a ContextLengthError."""


def _no_echo(base_url: str, why: str) -> str:
    return (f"score() and token_logprobs() need prompt logprobs (echo=true, logprobs=1, max_tokens=0) and the "
            f"server at {base_url} does not return them ({why}); use vLLM or promptkit serve")


def _load_tokenizer(model: str, tokenizer: Any) -> Any:
    """The tokenizer object to render chat prompts with, or None. Never downloads."""
    if tokenizer is not None and not isinstance(tokenizer, str):
        return tokenizer
    from transformers import AutoTokenizer

    if isinstance(tokenizer, str):
        return AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    from ..engine.models import is_embedded, resolve_llm

    if is_embedded(model):
        return AutoTokenizer.from_pretrained(resolve_llm(model), local_files_only=True)
    return None
