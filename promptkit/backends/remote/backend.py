"""The Backend protocol over any OpenAI-compatible server, in the dialect of the server it finds.

``LM("smollm2-135m-instruct", backend="openai", base_url="http://127.0.0.1:8000/v1")`` runs a
pipeline unchanged against vLLM, SGLang, llama.cpp's servers, another ``promptkit serve`` or
OpenAI. At first use the backend reads ``/v1/models`` and, where that does not say, a few
well-known endpoints, to learn which server it talks to (:mod:`.kinds`; or ``server_kind=``).

* Constraints travel in the fields that server understands, or are refused before the call
  (:mod:`.dialects`); every constrained reply is checked against its constraint (:mod:`.conformance`).
* Chat prompts: with the model's tokenizer (given as an object, a local directory or an embedded
  model name, else the embedded model of the served name) the template is applied here and the
  text goes to ``/v1/completions``, exactly as the local engine sees it. Without one, chat
  prompts go to ``/v1/chat/completions`` as messages and the server applies the template.
* Scoring reads prompt log-probabilities from ``echo``, checked once per server on a probe, or on
  llama-cpp-python forces each choice's tokens after the context (:mod:`.scoring`); a server
  that can do neither (OpenAI, llama-server) is refused with the reason.
* Batches go as concurrent requests in prompt order, so prompts that share a prefix arrive
  back to back and a server with a prefix cache reuses it; the usage's ``cached_tokens`` is
  the server's ``usage.prompt_tokens_details.cached_tokens`` where it reports one.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from ...types import Generation, TokenLogprobs, Usage
from ..base import ContextLengthError, PromptInput, SamplingParams, StreamEvent
from .chat import ChatPrompt, decode_chat, encode_chat
from .conformance import check_output
from .dialects import Endpoint, UnsupportedByServer, constraint_fields, sampling_fields
from .kinds import ServerInfo, ServerKind, identify
from .scoring import (
    PROBE,
    EchoedPrompt,
    ScoringUnavailable,
    continuation_logprob,
    echoed_prompt,
    forced_logprob,
    forcing_body,
    generated_token_echoed,
)

log = logging.getLogger("promptkit.remote")

RETRIES_429 = 5
DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
DEFAULT_CONTEXT = 4096
DEFAULT_CONTEXT_BY_KIND = {ServerKind.LLAMA_CPP_PYTHON: 2048}  # its --n_ctx default; it reports none
# Servers that run one request at a time: sent one by one, in order, each prompt finds the previous
# one's tokens still in the KV cache (and llama-cpp-python interrupts a stream when another arrives).
SERIAL_KINDS = {ServerKind.LLAMA_CPP_PYTHON}
# Servers where max_tokens=null means "the rest of the context" on /v1/completions.
NULL_MAX_TOKENS_KINDS = {ServerKind.VLLM, ServerKind.LLAMA_CPP_PYTHON}
CONTINUES_ASSISTANT = {ServerKind.VLLM: {"continue_final_message": True, "add_generation_prompt": False},
                       ServerKind.SGLANG: {"continue_final_message": True}}
# Servers scored by forcing each choice's tokens after the context rather than by echo (see .scoring).
FORCING_KINDS = {ServerKind.LLAMA_CPP_PYTHON}
NO_ECHO = {
    ServerKind.OPENAI: "OpenAI's API returns no prompt log-probabilities (chat models take no echo, and its "
                       "completions endpoint no longer returns logprobs with echo)",
    ServerKind.LLAMA_CPP: "llama.cpp's llama-server does not echo the prompt on /v1/completions",
}


class ServerError(RuntimeError):
    """The server answered with an error (the message is the server's, with its status)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{message} (HTTP {status})")
        self.status = status


class _ContextError(ServerError, ContextLengthError):
    """A context-length error from the server: both a ServerError and a ContextLengthError."""


class OpenAIBackend:
    """The Backend protocol over HTTP.

    ``model``: the id the server serves (``/v1/models``). ``base_url``: ending in ``/v1`` (default:
    ``$PROMPTKIT_BASE_URL``, ``$OPENAI_BASE_URL``, else ``http://127.0.0.1:8000/v1``). ``api_key``:
    sent as a Bearer token (default ``$PROMPTKIT_API_KEY`` or ``$OPENAI_API_KEY``). ``tokenizer``:
    the model's tokenizer, as an object, a local directory or an embedded model name (default: the
    embedded model of ``model``'s name, if any); with it chat templates are applied here.
    ``max_concurrency``: requests in flight at once for a batch (default 8; 1 for llama-cpp-python,
    which serves one at a time). ``max_context``: overrides what the server reports.
    ``server_kind``: skips detection (``"vllm"``, ``"sglang"``, ``"llama.cpp"``, ``"llama-cpp-python"``,
    ``"promptkit"``, ``"openai"`` or ``"openai-compatible"``: see :class:`ServerKind`); what was found is
    logged on the ``promptkit.remote`` logger and kept on ``.server``. ``transport``: an httpx
    transport (tests, proxies).
    """

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None,
                 timeout: float = 120.0, tokenizer: Any = None, max_concurrency: int | None = None,
                 max_context: int | None = None, server_kind: str | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.model_name = model
        base_url = base_url or os.environ.get("PROMPTKIT_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
        self.base_url = (base_url or DEFAULT_BASE_URL).rstrip("/")
        self.root = self.base_url.removesuffix("/v1")
        api_key = api_key or os.environ.get("PROMPTKIT_API_KEY") or os.environ.get("OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)
        self.requests = 0
        self._lock = threading.Lock()
        self._totals = {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}
        self._cached_reported = False
        self._echo_mode: tuple[str, str] | None = None  # ("aligned" | "bos" | "refused", BOS text or reason)
        self._token_ids: dict[str, list[int]] = {}  # a choice's tokens as the server tokenizes it alone
        card = self._model_card()
        self.server: ServerInfo = identify(card, self.base_url, self._get_json, server_kind)
        self.tokenizer = load_tokenizer(model, tokenizer)
        self.is_chat = self._chat_capable(card)
        self.max_context = max_context or self.server.context or DEFAULT_CONTEXT_BY_KIND.get(self.server.kind,
                                                                                            DEFAULT_CONTEXT)
        self.max_concurrency = max_concurrency or (1 if self.server.kind in SERIAL_KINDS else 8)
        self._log_found(max_context)

    def __repr__(self) -> str:
        return f"OpenAIBackend({self.model_name!r}, base_url={self.base_url!r}, server={self.server.kind.value!r})"

    # -- finding out ----------------------------------------------------------------------
    def _model_card(self) -> dict[str, Any]:
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
        return cards[self.model_name]

    def _get_json(self, path: str) -> dict[str, Any] | None:
        """GET a path at the server's root; None on any failure (a probe that found nothing)."""
        try:
            r = self.http.get(self.root + path, timeout=10.0)
            data = r.json() if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _chat_capable(self, card: dict[str, Any]) -> bool:
        if self.tokenizer is not None:
            return bool(getattr(self.tokenizer, "chat_template", None))
        return bool(card.get("chat", True))  # promptkit's card says; other servers apply their own template

    def _log_found(self, max_context: int | None) -> None:
        s = self.server
        context = ("given" if max_context else "reported" if s.context else
                   "not reported, assumed; pass max_context= to set it")
        chat = ("rendered here with the tokenizer" if self.tokenizer is not None else
                "sent as messages to /v1/chat/completions" if self.is_chat else "sent as plain text")
        log.info("%s: %s server%s (found by %s); context %d (%s); chat prompts %s", self.base_url, s.kind.value,
                 f" {s.version}" if s.version else "", s.evidence, self.max_context, context, chat)

    # -- HTTP ---------------------------------------------------------------------------------
    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST JSON; retry 429 with backoff; turn error bodies into clear exceptions."""
        for attempt in range(RETRIES_429 + 1):
            try:
                r = self.http.post(path, json=body)
            except httpx.HTTPError as e:
                raise ServerError(0, f"cannot reach {self.base_url}{path}: {e}") from None
            with self._lock:
                self.requests += 1
            if r.status_code != 429 or attempt == RETRIES_429:
                break
            time.sleep(min(0.1 * 2**attempt, 2.0))
        if r.status_code >= 400:
            raise _error(r, self.base_url)
        return r.json()

    def _usage(self, u: dict[str, Any], seconds: float) -> Usage:
        """The reply's usage (counted into this backend's totals)."""
        details = u.get("prompt_tokens_details") or {}
        usage = Usage(prompt_tokens=u.get("prompt_tokens") or 0, completion_tokens=u.get("completion_tokens") or 0,
                      cached_tokens=details.get("cached_tokens") or 0, seconds=seconds)
        with self._lock:
            self._cached_reported |= "cached_tokens" in details
            for k in self._totals:
                self._totals[k] += getattr(usage, k)
        return usage

    # -- text ---------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        if self.tokenizer is not None and getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if self.is_chat:
            return encode_chat(messages)
        return "\n\n".join(m["content"] for m in messages)

    def count_tokens(self, text: str) -> int:
        chat = decode_chat(text)
        if chat is not None:
            return self._count_chat(chat)
        if self.tokenizer is not None:
            return len(self.tokenizer(text)["input_ids"])
        return self._count_remote(text)

    def _count_remote(self, text: str) -> int:
        kind = self.server.kind
        try:
            if kind is ServerKind.LLAMA_CPP_PYTHON:
                return int(self._post(self.root + "/extras/tokenize/count", {"input": text})["count"])
            if kind is ServerKind.LLAMA_CPP:
                return len(self._post(self.root + "/tokenize", {"content": text})["tokens"])
            if kind in (ServerKind.VLLM, ServerKind.GENERIC):
                return int(self._post(self.root + "/tokenize", {"model": self.model_name, "prompt": text})["count"])
        except (ServerError, KeyError, TypeError, ValueError):
            pass
        raise NotImplementedError(f"counting tokens needs the model's tokenizer (pass tokenizer='local/dir' or an "
                                  f"embedded model name) or a server that tokenizes; the {kind.value} server at "
                                  f"{self.base_url} does not") from None

    def _count_chat(self, chat: ChatPrompt) -> int:
        if self.server.kind is ServerKind.VLLM:
            body = {"model": self.model_name, "messages": self._messages(chat),
                    **(CONTINUES_ASSISTANT[ServerKind.VLLM] if chat.assistant_prefix else
                       {"add_generation_prompt": True})}
            return int(self._post(self.root + "/tokenize", body)["count"])
        raise NotImplementedError(f"counting a chat prompt's tokens needs its chat template: pass tokenizer= (a local "
                                  f"directory or an embedded model name); the {self.server.kind.value} server cannot "
                                  "count them")

    # -- request bodies ---------------------------------------------------------------------
    def _request(self, text: PromptInput, params: SamplingParams) -> tuple[Endpoint, dict[str, Any]]:
        """The endpoint and body for one prompt (refusing, before any call, what the server cannot do)."""
        chat = decode_chat(text)
        if chat is not None:
            return "chat", self._chat_body(chat, params)
        return "completions", self._completion_body(text, params)

    def _sampling(self, params: SamplingParams) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model_name, "temperature": params.temperature, "top_p": params.top_p,
                                **sampling_fields(self.server)}
        if params.stop:
            body["stop"] = params.stop
        if params.seed is not None:
            body["seed"] = params.seed
        if params.presence_penalty:
            body["presence_penalty"] = params.presence_penalty
        if params.frequency_penalty:
            body["frequency_penalty"] = params.frequency_penalty
        if params.logit_bias:
            body["logit_bias"] = {str(t): b for t, b in params.logit_bias.items()}
        return body

    def _completion_body(self, text: PromptInput, params: SamplingParams) -> dict[str, Any]:
        body = {**self._sampling(params), "prompt": text,
                **constraint_fields(self.server, params.constraint, "completions")}
        body["max_tokens"] = params.max_tokens if params.max_tokens is not None else self._rest_of_context(text)
        if params.logprobs:
            body["logprobs"] = max(1, params.top_logprobs)
        return body

    def _rest_of_context(self, text: PromptInput) -> int | None:
        """max_tokens for "until EOS or the context's end" (completions default to 16 tokens)."""
        if self.server.kind in NULL_MAX_TOKENS_KINDS:
            return None
        used = len(text) if isinstance(text, list) else self.count_tokens(text)
        return max(1, self.max_context - used)

    def _messages(self, chat: ChatPrompt) -> list[dict[str, str]]:
        if not chat.assistant_prefix:
            return list(chat.messages)
        if self.server.kind not in CONTINUES_ASSISTANT:
            raise UnsupportedByServer(
                f"the prompt's answer prefix {chat.assistant_prefix!r} starts the assistant's turn, and the "
                f"{self.server.kind.value} server's chat endpoint cannot continue a turn; pass tokenizer= (a local "
                "directory or an embedded model name) so the template is applied here, or drop the answer prefix")
        return [*chat.messages, {"role": "assistant", "content": chat.assistant_prefix}]

    def _chat_body(self, chat: ChatPrompt, params: SamplingParams) -> dict[str, Any]:
        body = {**self._sampling(params), "messages": self._messages(chat),
                **constraint_fields(self.server, params.constraint, "chat")}
        if chat.assistant_prefix:
            body.update(CONTINUES_ASSISTANT[self.server.kind])
        if params.max_tokens is not None:  # else the chat default: until EOS or the context's end
            body["max_completion_tokens" if self.server.kind is ServerKind.OPENAI else "max_tokens"] = params.max_tokens
        if params.logprobs:
            body["logprobs"] = True
            if params.top_logprobs:
                body["top_logprobs"] = params.top_logprobs
        return body

    # -- generation ---------------------------------------------------------------------------
    def _generation(self, endpoint: Endpoint, data: dict[str, Any], params: SamplingParams,
                    seconds: float) -> Generation:
        choice = data["choices"][0]
        if endpoint == "chat":
            text = (choice.get("message") or {}).get("content") or ""
            logprobs, top, ids = _chat_logprobs(choice.get("logprobs"))
        else:
            text, lp = choice.get("text") or "", choice.get("logprobs") or {}
            logprobs, top, ids = lp.get("token_logprobs"), lp.get("top_logprobs"), list(lp.get("token_ids") or [])
        gen = Generation(text=text, token_ids=ids, logprobs=logprobs if params.logprobs else None,
                         top_logprobs=top if params.logprobs and params.top_logprobs else None,
                         finish_reason=choice.get("finish_reason") or "length",
                         usage=self._usage(data.get("usage") or {}, seconds))
        self._check(gen, params)
        return gen

    def _check(self, gen: Generation, params: SamplingParams) -> None:
        finished = gen.finish_reason == "stop" and not params.stop  # a stop string may cut a match short
        check_output(params.constraint, gen.text, finished, self.server.kind.value)

    def _generate_one(self, request: tuple[Endpoint, dict[str, Any]], params: SamplingParams) -> Generation:
        endpoint, body = request
        t0 = time.perf_counter()
        data = self._post(_path(endpoint), body)
        return self._generation(endpoint, data, params, time.perf_counter() - t0)

    def generate(self, texts: list[PromptInput], params: SamplingParams) -> list[Generation]:
        requests = [self._request(t, params) for t in texts]  # every refusal before the first call
        if len(requests) == 1 or self.max_concurrency == 1:
            return [self._generate_one(r, params) for r in requests]
        # Several in flight, issued in prompt order: the server batches them and shares their prefixes.
        with ThreadPoolExecutor(min(self.max_concurrency, len(requests))) as pool:
            return list(pool.map(lambda r: self._generate_one(r, params), requests))

    def generate_stream(self, text: PromptInput, params: SamplingParams) -> Iterator[StreamEvent]:
        """Stream over server-sent events; closing the iterator closes the connection (the server cancels)."""
        endpoint, body = self._request(text, params)
        body.update(stream=True, stream_options={"include_usage": True})
        t0 = time.perf_counter()
        parts: list[str] = []
        finish, usage = "length", {}
        with self.http.stream("POST", _path(endpoint), json=body) as r:
            if r.status_code >= 400:
                r.read()
                raise _error(r, self.base_url)
            for chunk in _events(r):
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices", []):
                    finish = choice.get("finish_reason") or finish
                    piece = (choice.get("delta") or {}).get("content") if endpoint == "chat" else choice.get("text")
                    if piece:
                        parts.append(piece)
                        yield StreamEvent(text=piece)
        gen = Generation(text="".join(parts), finish_reason=finish,
                         usage=self._usage(usage, time.perf_counter() - t0))
        self._check(gen, params)
        yield StreamEvent(generation=gen)

    # -- scoring --------------------------------------------------------------------------------
    def _echo(self, text: PromptInput, top_logprobs: int = 0) -> dict[str, Any]:
        """An echo reply for ``text``: its tokens' log-probabilities, then one generated token."""
        body: dict[str, Any] = {"model": self.model_name, "prompt": text, "max_tokens": 1, "echo": True,
                                "logprobs": max(1, top_logprobs), "temperature": 0.0, **sampling_fields(self.server)}
        if self.server.kind is ServerKind.LLAMA_CPP_PYTHON:
            body["min_tokens"] = 1  # a token is always generated, so the probe can tell how entries line up
        return self._post_logprobs(body)

    def _post_logprobs(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST a completion that asks for logprobs; a server that cannot give them is ScoringUnavailable."""
        try:
            data = self._post("/completions", body)
        except ServerError as e:
            if isinstance(e, ContextLengthError):
                raise
            raise ScoringUnavailable(self._no_logprobs(str(e))) from None
        if not (data["choices"][0].get("logprobs") or {}).get("token_logprobs"):
            raise ScoringUnavailable(self._no_logprobs("the reply had no logprobs"))
        return data

    def _no_logprobs(self, why: str) -> str:
        hint = (" (start llama-cpp-python's server with --logits_all true)"
                if self.server.kind is ServerKind.LLAMA_CPP_PYTHON else "")
        return (f"score() and token_logprobs() need token log-probabilities (logprobs=1, with echo=true for the "
                f"prompt's) and the {self.server.kind.value} server at {self.base_url} does not return them "
                f"({why}){hint}")

    def _echo_alignment(self) -> tuple[str, str]:
        """Once per backend: whether echoed entries line up with their tokens, found on a probe."""
        with self._lock:
            if self._echo_mode is not None:
                return self._echo_mode
        mode = self._probe_echo()
        log.info("%s: echoed prompt logprobs: %s", self.base_url, mode[0] if mode[0] != "bos" else
                 f"right for prompts that start with {mode[1]!r}")
        with self._lock:
            self._echo_mode = mode
        return mode

    def _probe_echo(self) -> tuple[str, str]:
        if generated_token_echoed(self._echo(PROBE), PROBE) is not False:
            return "aligned", ""
        bos = getattr(self.tokenizer, "bos_token", None) if self.tokenizer is not None else None
        if bos and generated_token_echoed(self._echo(bos + PROBE), bos + PROBE):
            return "bos", bos
        return "refused", "the server pairs each echoed token with the next position's log-probability"

    def _check_scorable(self, text: PromptInput, echo: bool) -> None:
        """Refuse, before any scoring call, what this server cannot score right (``echo``: read from echo)."""
        if self.server.kind in NO_ECHO:
            raise ScoringUnavailable(f"score() needs prompt log-probabilities: {NO_ECHO[self.server.kind]}")
        if decode_chat(text) is not None:
            raise ScoringUnavailable(
                "scoring a chat prompt needs the text the model sees, and this backend has no tokenizer to apply "
                "the chat template with (the chat endpoint returns no prompt log-probabilities): pass tokenizer= "
                "(a local directory or an embedded model name), or score with chat=False")
        if echo:
            self._check_echo_alignment(text)

    def _check_echo_alignment(self, text: PromptInput) -> None:
        mode, detail = self._echo_alignment()
        if mode == "bos" and not (isinstance(text, str) and text.startswith(detail)):
            raise ScoringUnavailable(
                f"the {self.server.kind.value} server pairs each echoed token with the next position's "
                f"log-probability unless the prompt starts with the model's BOS token {detail!r} (as its chat "
                "template does); give a prompt that starts with it, or use vLLM, SGLang or promptkit serve")
        if mode == "refused":
            raise ScoringUnavailable(f"the {self.server.kind.value} server's echoed log-probabilities cannot be "
                                     f"trusted: {detail}")

    def score(self, texts: list[str], choices: list[list[str]]) -> list[list[float]]:
        """Total log-likelihood of each choice after its text."""
        return self.score_with_usage(texts, choices)[0]

    def score_with_usage(self, texts: list[str], choices: list[list[str]]) -> tuple[list[list[float]], list[Usage]]:
        """:meth:`score`, and per text the usage of its choices' requests together."""
        jobs = [(t, c) for t, opts in zip(texts, choices) for c in opts]
        if any(not c for _, c in jobs):
            raise ValueError("a choice is empty; score needs text to score")
        forcing = self.server.kind in FORCING_KINDS
        for t in dict.fromkeys(texts):
            self._check_scorable(t, echo=not forcing)
        one = self._forced if forcing else self._echoed
        # Choices of a prompt back to back, in prompt order: each shares its prompt's prefix with the last.
        with ThreadPoolExecutor(min(self.max_concurrency, max(1, len(jobs)))) as pool:
            flat = iter(list(pool.map(lambda job: one(*job), jobs)))
        scores, usages = [], []
        for opts in choices:
            done = [next(flat) for _ in opts]
            scores.append([v for v, _ in done])
            usages.append(sum((u for _, u in done), Usage()))
        return scores, usages

    def _echoed(self, text: str, choice: str) -> tuple[float, Usage]:
        """The choice's log-likelihood from the echoed log-probabilities of ``text + choice``."""
        t0 = time.perf_counter()
        reply = self._echo(text + choice)
        value = continuation_logprob(echoed_prompt(reply, text + choice), text + choice, len(text))
        return value, self._usage(reply.get("usage") or {}, time.perf_counter() - t0)

    def _forced(self, text: str, choice: str) -> tuple[float, Usage]:
        """The choice's log-likelihood from generating its tokens after ``text`` under a logit bias."""
        t0 = time.perf_counter()
        ids = self._choice_tokens(choice)
        reply = self._post_logprobs({"model": self.model_name, **sampling_fields(self.server),
                                     **forcing_body(text, ids)})
        value = forced_logprob(reply, choice, len(ids))
        if value is None:  # biased tokens came out in another order: force them one at a time
            return self._forced_stepwise(text, choice, ids)
        return value, self._usage(reply.get("usage") or {}, time.perf_counter() - t0)

    def _forced_stepwise(self, text: str, choice: str, ids: list[int]) -> tuple[float, Usage]:
        total, spelled, usage, context = 0.0, "", Usage(), None
        for j, token in enumerate(ids):
            t0 = time.perf_counter()
            reply = self._post_logprobs({"model": self.model_name, **sampling_fields(self.server),
                                         **forcing_body(text + spelled, [token])})
            piece = reply["choices"][0].get("text") or ""
            step = forced_logprob(reply, piece, 1)
            prompt_tokens = (reply.get("usage") or {}).get("prompt_tokens")
            context = prompt_tokens if context is None else context
            if step is None or prompt_tokens != context + j or not choice.startswith(spelled + piece):
                raise ScoringUnavailable(f"the {self.server.kind.value} server did not generate {choice!r} as its "
                                         "own tokens after the prompt, so its log-likelihood cannot be read")
            total, spelled = total + step, spelled + piece
            usage = usage + self._usage(reply.get("usage") or {}, time.perf_counter() - t0)
        if spelled != choice:
            raise ScoringUnavailable(f"the server's tokens for {choice!r} spell {spelled!r}")
        return total, usage

    def _choice_tokens(self, choice: str) -> list[int]:
        """The server's tokens for ``choice`` alone (as the local engine tokenizes a choice), cached."""
        with self._lock:
            if choice in self._token_ids:
                return self._token_ids[choice]
        ids, bos = self._server_tokens(choice), self._server_tokens("")  # "" is just the BOS, if one is added
        ids = ids[len(bos):] if ids[: len(bos)] == bos else ids
        if not ids:
            raise ValueError(f"choice {choice!r} has no tokens")
        with self._lock:
            self._token_ids[choice] = ids
        return ids

    def _server_tokens(self, text: str) -> list[int]:
        try:
            return list(self._post(self.root + "/extras/tokenize", {"model": self.model_name, "input": text})["tokens"])
        except (ServerError, KeyError, TypeError) as e:
            raise ScoringUnavailable(f"scoring on the {self.server.kind.value} server needs its /extras/tokenize "
                                     f"endpoint: {e}") from None

    def token_logprobs(self, texts: list[PromptInput], top_logprobs: int = 0) -> list[TokenLogprobs]:
        for text in texts:
            self._check_scorable(text, echo=True)
        return [self._token_logprobs(text, top_logprobs) for text in texts]

    def _token_logprobs(self, text: PromptInput, top_logprobs: int) -> TokenLogprobs:
        reply = self._echo(text, top_logprobs)
        echo = echoed_prompt(reply, text if isinstance(text, str) else "")
        ids = echo.token_ids or (text if isinstance(text, list) else self._local_ids(text, echo))
        return TokenLogprobs(token_ids=list(ids), tokens=echo.tokens, logprobs=echo.logprobs,
                             offsets=list(zip(echo.starts, echo.ends)),
                             top_logprobs=echo.top_logprobs if top_logprobs else None)

    def _local_ids(self, text: str, echo: EchoedPrompt) -> list[int]:
        """The tokenizer's ids for ``text`` when they are the tokens the server returned, else none."""
        if self.tokenizer is None:
            return []
        ids = list(self.tokenizer(text)["input_ids"])
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if len(ids) == len(echo.tokens) + 1 and ids[0] == bos:
            ids = ids[1:]  # llama-cpp-python leaves a leading BOS out of the entries
        return ids if len(ids) == len(echo.tokens) else []

    # -- accounting -------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """This client's counters (and the server's own ``/stats`` where it has one: ``promptkit serve``).

        ``cached_tokens``: prompt tokens the server reported served from its prefix cache;
        ``cached_tokens_reported``: whether it reports them at all.
        """
        with self._lock:
            mine: dict[str, Any] = {"backend": type(self).__name__, "model": self.model_name,
                                    "base_url": self.base_url, "server_kind": self.server.kind.value,
                                    "server_version": self.server.version, "http_requests": self.requests,
                                    **self._totals, "cached_tokens_reported": self._cached_reported}
        server = self._get_json("/stats") if self.server.kind is ServerKind.PROMPTKIT else None
        return {**server, **mine} if server else mine

    def close(self) -> None:
        self.http.close()


def _path(endpoint: Endpoint) -> str:
    return "/chat/completions" if endpoint == "chat" else "/completions"


def _events(r: httpx.Response) -> Iterator[dict[str, Any]]:
    """The JSON payloads of a server-sent event stream, up to ``[DONE]``."""
    for line in r.iter_lines():
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        if payload:
            yield json.loads(payload)


def _chat_logprobs(lp: dict[str, Any] | None) -> tuple[list[float] | None, list[dict[str, float]] | None, list[int]]:
    """A chat reply's per-token logprobs as completions give them: values, top alternatives, (no ids)."""
    content = (lp or {}).get("content") or []
    if not content:
        return None, None, []
    values = [float(t["logprob"]) for t in content]
    top = [{a["token"]: float(a["logprob"]) for a in t.get("top_logprobs") or []} for t in content]
    return values, top, []


def _error(r: httpx.Response, base_url: str) -> Exception:
    """An exception for an error reply; context-length errors keep their own type."""
    try:
        body = r.json()
        err = body.get("error") or body.get("detail") or {}
        message = err.get("message") if isinstance(err, dict) else str(err)
        code = err.get("code") if isinstance(err, dict) else None
    except (ValueError, AttributeError):
        message, code = r.text[:500], None
    message = message or r.reason_phrase
    if code == "context_length_exceeded" or "context length" in message.lower() or "context is" in message:
        return _ContextError(r.status_code, message)
    if r.status_code == 401:
        return ServerError(401, f"{base_url} refused the API key: {message}")
    return ServerError(r.status_code, f"{base_url}: {message}")


def load_tokenizer(model: str, tokenizer: Any) -> Any:
    """The tokenizer to render chat prompts with: the object given, the embedded model or local directory
    named by ``tokenizer``, else the embedded model named ``model``; None when there is none. Never downloads."""
    if tokenizer is not None and not isinstance(tokenizer, str):
        return tokenizer
    from transformers import AutoTokenizer

    from ...models import is_embedded, resolve_llm

    name = tokenizer if isinstance(tokenizer, str) else model
    if is_embedded(name):
        return AutoTokenizer.from_pretrained(resolve_llm(name), local_files_only=True)
    if isinstance(tokenizer, str):
        return AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    return None
