"""promptkit under DSPy: a ``dspy.LM`` whose engine is promptkit's, in-process or over ``promptkit serve``.

    >>> import dspy
    >>> from promptkit.dspy import PromptkitLM
    >>> dspy.configure(lm=PromptkitLM())          # the embedded model, in this process
    >>> dspy.configure(lm=PromptkitLM(base_url="http://127.0.0.1:8000/v1"))  # a promptkit server

What it adds to DSPy's own ``dspy.LM``:

- Output formats held by the grammar engine. Under DSPy's ChatAdapter the reply is decoded
  under a grammar of the adapter's own format: the ``[[ ## field ## ]]`` marker of each output
  field in order, each value held to its field's type where a type says what a value looks like
  (numbers, booleans, ``Literal`` and ``Enum`` choices, JSON for lists, dicts and models), then
  ``[[ ## completed ## ]]``. So even a 135M model's reply always parses. Under the JSON adapter
  the engine declares that it honours response schemas, so DSPy sends the signature's schema and
  the reply is decoded under it.
- DSPy's threads land in the engine's batches. ``Evaluate(num_threads=...)`` and the
  optimizers' parallel calls each call the engine from their own thread; the engine decodes
  requests that arrive together in one batch, and every prompt that shares DSPy's instruction
  and demonstrations reuses their KV from the prefix cache (computed once).
- Usage: each call reports ``prompt_tokens``, ``completion_tokens`` and, in
  ``prompt_tokens_details``, ``cached_tokens`` (served from the prefix cache) and
  ``cache_creation_tokens`` (prefilled by this call, then kept in the cache), through DSPy's usage
  tracking (``dspy.track_usage()``, ``dspy.configure(track_usage=True)``).

It follows DSPy 3.4's engine contract (``complete(Request) -> Response``), so it subclasses
``dspy.LM`` (a ``BaseLM``) with a custom engine rather than overriding the deprecated ``forward``.
This module imports DSPy; nothing else in promptkit does.
"""

from __future__ import annotations

import ast
import asyncio
import enum
import json
import re
import threading
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin

try:
    import dspy
except ImportError as e:
    raise ImportError("promptkit.dspy needs DSPy 3.4: pip install 'promptkit[dspy]'") from e
from dspy.lm15 import (ContextLengthError, InvalidRequestError, Message, RateLimitError, Response, ServerError,
                       TextPart, TokenLogprob, TopLogprob, TransportError, UnsupportedFeatureError, Usage,
                       response_to_events)

from .backends.base import ContextLengthError as PromptTooLong
from .backends.base import text_bytes
from .engine.kv_pool import KVBudgetError
from .lm import LM, get_lm
from .structured import Constraint, lark_json

__all__ = ["AsyncPromptkitEngine", "OutputField", "PromptkitEngine", "PromptkitLM", "chat_adapter_fields",
           "chat_adapter_grammar", "output_constraint"]

DEFAULT_MAX_TOKENS = 512
COMPLETED = "completed"
# What DSPy's ChatAdapter asks for at the end of the last user message (ChatAdapter.user_message_output_requirements).
_CHAT_REQUIREMENTS = re.compile(
    r"Respond with the corresponding output fields, starting with the field (?P<fields>.+?), and then ending "
    r"with the marker for `\[\[ ## completed ## \]\]`\.", re.DOTALL)
_MARKER = re.compile(r"`\[\[ ## (\w+) ## \]\]`")
_TYPE_HINT = re.compile(r"^ \(must be formatted as a valid Python (?P<type>.+)\)$", re.DOTALL)
# Free text: lines that hold no "[[" and start with no "[" (DSPy's parser reads a line starting with a
# marker as a new field, and small models write marker-like lines instead of an answer), the first line
# not with "{" either (DSPy's system message shows each field as "{name}", which small models copy), and
# at most one newline at the end, so that the separator's newline ends the value.
_LINE_REST = r"(?:[^\[\n]|\[[^\[\n])*\[?"
TEXT_VALUE = rf"/[^\[\n{{]{_LINE_REST}(?:\n[^\[\n]{_LINE_REST})*\n?/"
_NUMBERS = {int: r"/-?[0-9]+/", float: r"/-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?/"}
MARKER_TOKENS = 12  # about what one "[[ ## field ## ]]" marker and its newlines take
TYPED_VALUE_TOKENS = 24  # room left for a typed (non-text) value when free text is capped


# -- output formats ------------------------------------------------------------------------------
@dataclass(frozen=True)
class OutputField:
    """One output field the ChatAdapter asks for: its name and type (None: free text)."""

    name: str
    annotation: Any = None


def chat_adapter_fields(text: str) -> list[OutputField] | None:
    """The output fields DSPy's ChatAdapter asks for in ``text`` (its last user message), in order,
    typed from the innermost calling module's signature where it agrees with the message's type
    hints, else from the hints themselves; None when ``text`` is not a ChatAdapter request."""
    found = _CHAT_REQUIREMENTS.search(text)
    if found is None:
        return None
    listing = found.group("fields")
    markers = list(_MARKER.finditer(listing))
    signature_types = _caller_output_types()
    out = []
    for i, m in enumerate(markers):
        end = markers[i + 1].start() if i + 1 < len(markers) else len(listing)
        tail = listing[m.end():end].removesuffix(", then ")
        hint = _TYPE_HINT.match(tail)
        hinted = hint.group("type") if hint else ("" if not tail else None)
        out.append(OutputField(m.group(1), _field_type(signature_types.get(m.group(1)), hinted)))
    return out


def _caller_output_types() -> dict[str, Any]:
    """Output field annotations of the module making this call (a Predict), if any."""
    modules = dspy.settings.caller_modules or []
    signature = getattr(modules[-1], "signature", None) if modules else None
    fields = getattr(signature, "output_fields", None) or {}
    return {name: f.annotation for name, f in fields.items()}


def _field_type(annotation: Any, hint: str | None) -> Any:
    """The signature's annotation when the adapter's hint names it, else a type read from the hint."""
    from dspy.adapters.utils import get_annotation_name

    if annotation is not None and hint == ("" if annotation is str else get_annotation_name(annotation)):
        return annotation
    return _type_from_hint(hint)


def _type_from_hint(hint: str | None) -> Any:
    """The type a ChatAdapter hint names, for the types whose values have a shape (None: free text)."""
    simple = {"": str, "str": str, "int": int, "float": float, "bool": bool}
    if hint in simple:
        return simple[hint]
    if hint and hint.startswith("Literal[") and hint.endswith("]"):
        try:
            values = ast.literal_eval(hint[len("Literal"):])
        except (ValueError, SyntaxError):
            return None
        return Literal[tuple(values)] if values else None
    return None


def chat_adapter_grammar(fields: Sequence[OutputField], max_tokens: int | None = None) -> str:
    """A Lark grammar (llguidance) for a ChatAdapter reply with these output fields.

    Each field is its ``[[ ## name ## ]]`` marker line and a value, then a blank line; the reply ends
    with ``[[ ## completed ## ]]``. Free-text values are lines holding no ``[[``; with ``max_tokens``,
    each is capped so that every field and the final marker fit in it.
    """
    values = [_value_rule(f.annotation) for f in fields]
    cap = _text_cap(max_tokens, len(fields), sum(kind == "text" for _, kind in values))
    sequence, rules = [], []
    for i, (f, (body, kind)) in enumerate(zip(fields, values)):
        rules.append(f"value{i}{f'[max_tokens={cap}]' if kind == 'text' and cap else ''}: {body}")
        # A free-text value may end with its own newline (the blank line needs one more); others need two.
        separator = "\n" if kind == "text" else "\n\n"
        sequence += [_lark_string(f"[[ ## {f.name} ## ]]\n"), f"value{i}", _lark_string(separator)]
    sequence.append(_lark_string(f"[[ ## {COMPLETED} ## ]]"))
    return "\n".join([f"start: {' '.join(sequence)}", *rules])


def _lark_string(text: str) -> str:
    return json.dumps(text)


def _text_cap(max_tokens: int | None, n_fields: int, n_text: int) -> int | None:
    """Tokens each free-text value may take so that the whole reply fits in ``max_tokens``."""
    if not max_tokens or not n_text:
        return None
    room = max_tokens - MARKER_TOKENS * (n_fields + 1) - TYPED_VALUE_TOKENS * (n_fields - n_text)
    return max(8, room // n_text)


def _value_rule(annotation: Any) -> tuple[str, str]:
    """The Lark body of a value of this type, and its kind: "text" (free text), "typed" or "json"."""
    annotation = _without_none(annotation)
    if annotation is None or annotation is str or _is_dspy_type(annotation):
        return TEXT_VALUE, "text"
    if annotation is bool:
        return '"True" | "False"', "typed"
    if annotation in _NUMBERS:
        return _NUMBERS[annotation], "typed"
    if get_origin(annotation) is Literal:
        return _alternatives(str(v) for v in get_args(annotation)), "typed"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        by_value = all(isinstance(m.value, str) for m in annotation)
        return _alternatives(m.value if by_value else m.name for m in annotation), "typed"
    try:
        import pydantic

        return lark_json(pydantic.TypeAdapter(annotation).json_schema()), "json"
    except Exception:  # a type pydantic cannot describe: its value is free text DSPy parses its own way
        return TEXT_VALUE, "text"


def _without_none(annotation: Any) -> Any:
    """``X`` for ``X | None`` (a value is always written); anything else as it is."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _is_dspy_type(annotation: Any) -> bool:
    """DSPy's own value types (Reasoning, Code, History, ...), which its adapter formats and parses itself."""
    from dspy.adapters.types.base_type import Type as DspyType

    return isinstance(annotation, type) and issubclass(annotation, DspyType)


def _alternatives(values: Any) -> str:
    return " | ".join(_lark_string(v) for v in dict.fromkeys(values))


def output_constraint(request: dspy.lm15.Request, max_tokens: int | None = None) -> Constraint | None:
    """What the reply to a DSPy request must match: the response_format's JSON schema, the ChatAdapter's
    field format (its free text capped to fit ``max_tokens``), or nothing (any other prompt)."""
    rf = request.config.response_format
    if rf and rf.get("type") in ("json_schema", "json_object"):
        schema = rf.get("schema") or (rf.get("json_schema") or {}).get("schema") or {"type": "object"}
        return Constraint(json_schema=schema)
    users = [m for m in request.messages if m.role == "user"]
    fields = chat_adapter_fields(_text(users[-1])) if users else None
    if fields:
        return Constraint(grammar=chat_adapter_grammar(fields, max_tokens))
    return None


# -- the wire between DSPy and a model ----------------------------------------------------------
@dataclass
class Reply:
    """One generation, as either transport returns it."""

    text: str
    finish_reason: str
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[dict[str, Any]] | None = None  # OpenAI chat logprobs "content" entries


@dataclass
class Settings:
    """The sampling settings of a DSPy request, in promptkit's terms."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    top_logprobs: int | None = None  # None: no logprobs; 0: the chosen tokens' only

    @classmethod
    def of(cls, config: dspy.lm15.Config) -> Settings:
        return cls(max_tokens=config.max_tokens or DEFAULT_MAX_TOKENS, temperature=config.temperature or 0.0,
                   top_p=config.top_p if config.top_p is not None else 1.0, stop=list(config.stop), seed=config.seed,
                   presence_penalty=config.presence_penalty or 0.0, frequency_penalty=config.frequency_penalty or 0.0,
                   top_logprobs=config.logprobs)


class InProcess:
    """Generates on a promptkit :class:`~promptkit.lm.LM` in this process (no HTTP)."""

    def __init__(self, lm: LM) -> None:
        self.lm = lm
        self.model_name = lm.model

    def generate(self, messages: list[dict[str, str]], s: Settings, constraint: Constraint | None) -> Reply:
        text = self.lm.backend.apply_chat_template(messages)
        try:
            g = self.lm.generate(
                text, chat=False, max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, stop=s.stop,
                seed=s.seed, presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
                logprobs=s.top_logprobs is not None, top_logprobs=s.top_logprobs or 0,
                **_constraint_kwargs(constraint))[0]
        except PromptTooLong as e:
            raise ContextLengthError(str(e), provider="promptkit") from e
        except KVBudgetError as e:
            raise InvalidRequestError(str(e), provider="promptkit") from e
        return Reply(g.text, g.finish_reason, g.usage.prompt_tokens, g.usage.cached_tokens, g.usage.completion_tokens,
                     self._logprobs(g) if s.top_logprobs is not None else None)

    def _logprobs(self, g: Any) -> list[dict[str, Any]]:
        names = self.lm.backend.token_texts(g.token_ids)
        tops = g.top_logprobs or [{} for _ in names]
        return [{"token": t, "logprob": lp, "top_logprobs": [{"token": a, "logprob": b} for a, b in top.items()]}
                for t, lp, top in zip(names, g.logprobs or [], tops)]

    def stats(self) -> dict[str, Any]:
        return self.lm.stats()

    def state(self) -> dict[str, Any]:
        return {"model": self.model_name}


def _constraint_kwargs(c: Constraint | None) -> dict[str, Any]:
    return {} if c is None else c.model_dump(exclude_none=True)


class Served:
    """Generates through a promptkit server's OpenAI chat endpoint (``base_url`` ends in ``/v1``).

    Constraints travel as ``response_format`` (JSON schemas) or vLLM's ``guided_grammar``, which
    ``promptkit serve`` decodes under; concurrent calls share one connection pool, and the server
    batches them in its engine.
    """

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 timeout: float = 600.0, max_connections: int = 64) -> None:
        import httpx

        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=timeout, headers=headers,
                                   limits=httpx.Limits(max_connections=max_connections))
        self.model_name = model or self._only_model()

    def _only_model(self) -> str:
        return self._get("/models")["data"][0]["id"]

    def _get(self, path: str, root: bool = False) -> dict[str, Any]:
        base = self.base_url.removesuffix("/v1") if root else self.base_url
        return self._checked(lambda: self.client.get(base + path))

    def generate(self, messages: list[dict[str, str]], s: Settings, constraint: Constraint | None) -> Reply:
        body: dict[str, Any] = {
            "model": self.model_name, "messages": messages, "max_tokens": s.max_tokens, "temperature": s.temperature,
            "top_p": s.top_p, "stop": s.stop or None, "seed": s.seed, "presence_penalty": s.presence_penalty,
            "frequency_penalty": s.frequency_penalty, **_constraint_fields(constraint)}
        if s.top_logprobs is not None:
            body.update(logprobs=True, top_logprobs=s.top_logprobs or None)
        out = self._checked(lambda: self.client.post(self.base_url + "/chat/completions",
                                                     json={k: v for k, v in body.items() if v is not None}))
        choice, usage = out["choices"][0], out.get("usage") or {}
        return Reply(choice["message"].get("content") or "", choice.get("finish_reason") or "stop",
                     usage.get("prompt_tokens", 0), (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
                     usage.get("completion_tokens", 0), (choice.get("logprobs") or {}).get("content"))

    def _checked(self, send: Any) -> dict[str, Any]:
        """The JSON of a response; failures as lm15 errors, so DSPy retries the transient ones."""
        import httpx

        try:
            r = send()
        except httpx.TimeoutException as e:
            raise TransportError(f"the promptkit server did not answer in time: {e}") from e
        except httpx.HTTPError as e:
            raise TransportError(f"cannot reach the promptkit server at {self.base_url}: {e}") from e
        if r.status_code == 200:
            return r.json()
        message = _error_message(r)
        error = RateLimitError if r.status_code == 429 else ServerError if r.status_code >= 500 else InvalidRequestError
        raise error(message, provider="promptkit", status=r.status_code)

    def stats(self) -> dict[str, Any]:
        return self._get("/stats", root=True)

    def state(self) -> dict[str, Any]:
        return {"model": self.model_name, "base_url": self.base_url}


def _constraint_fields(c: Constraint | None) -> dict[str, Any]:
    if c is None:
        return {}
    if c.json_schema is not None:
        return {"response_format": {"type": "json_schema", "json_schema": {"name": "output", "schema": c.json_schema}}}
    return {"guided_grammar": c.grammar, "guided_regex": c.regex, "guided_choice": c.choices}


def _error_message(r: Any) -> str:
    try:
        return r.json()["error"]["message"]
    except Exception:
        return r.text[:500]


# -- the DSPy engine -------------------------------------------------------------------------------
class PromptkitEngine:
    """DSPy's engine contract (``complete(Request) -> Response``) over promptkit.

    Declares response schemas and logprobs as supported, so DSPy's JSON adapter sends the
    signature's schema. Safe to call from many threads at once: that is how DSPy's parallel
    evaluation reaches the engine's batches.
    """

    supports_response_schema = True
    supports_function_calling = False
    supports_reasoning = False
    supported_params = frozenset({"temperature", "max_tokens", "top_p", "stop", "seed", "response_format",
                                  "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "n"})

    def __init__(self, transport: InProcess | Served) -> None:
        self.transport = transport
        self._lock = threading.Lock()
        self._totals = dict.fromkeys(("calls", "prompt_tokens", "cached_tokens", "completion_tokens"), 0)

    @classmethod
    def connect(cls, lm: LM | str | None = None, base_url: str | None = None, api_key: str | None = None,
                timeout: float = 600.0) -> PromptkitEngine:
        """In-process on ``lm`` (an LM, or a model name for :func:`~promptkit.lm.get_lm`; default the
        embedded model), or over HTTP to the promptkit server at ``base_url`` (serving ``lm``, a name)."""
        if base_url is not None:
            if isinstance(lm, LM):
                raise ValueError("give either an LM (in-process) or a base_url (a server), not both")
            return cls(Served(base_url, lm, api_key, timeout))
        return cls(InProcess(lm if isinstance(lm, LM) else get_lm(lm) if lm else get_lm()))

    @property
    def model_name(self) -> str:
        return self.transport.model_name

    def complete(self, request: dspy.lm15.Request) -> Response:
        from dspy.clients.engines.base import validate_request

        validate_request(request)
        if request.tools:
            raise UnsupportedFeatureError("promptkit's DSPy engine has no native tool calling; use an adapter "
                                          "without use_native_function_calling", provider="promptkit")
        settings = Settings.of(request.config)
        reply = self.transport.generate(chat_messages(request), settings,
                                        output_constraint(request, settings.max_tokens))
        self._count(reply)
        return _response(reply, self.model_name)

    def _count(self, reply: Reply) -> None:
        with self._lock:
            self._totals["calls"] += 1
            for key in ("prompt_tokens", "cached_tokens", "completion_tokens"):
                self._totals[key] += getattr(reply, key)

    @property
    def calls(self) -> int:
        """Requests this engine answered (every copy of its LM included)."""
        return self._totals["calls"]

    def totals(self) -> dict[str, int]:
        """Calls and tokens so far: ``calls``, ``prompt_tokens``, ``cached_tokens``, ``completion_tokens``."""
        with self._lock:
            return dict(self._totals)

    def stream(self, request: dspy.lm15.Request) -> Any:
        """The whole reply as stream events (decoded in one piece)."""
        return response_to_events(self.complete(request))

    def stats(self) -> dict[str, Any]:
        """The engine's counters (``tokens_prefilled``, ``tokens_cached``, ...; a server's ``/stats``)."""
        return self.transport.stats()

    def close(self) -> None:
        pass

    def dump_state(self) -> dict[str, Any]:
        """What :meth:`load_state` reconnects with (the model and the server's URL; never a key)."""
        return self.transport.state()

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> PromptkitEngine:
        return cls.connect(state.get("model"), base_url=state.get("base_url"))


class AsyncPromptkitEngine:
    """The async counterpart DSPy's ``acall`` uses: the same engine, called from a worker thread."""

    def __init__(self, engine: PromptkitEngine) -> None:
        self.engine = engine

    async def complete(self, request: dspy.lm15.Request) -> Response:
        return await asyncio.to_thread(self.engine.complete, request)

    async def stream(self, request: dspy.lm15.Request) -> Any:
        for event in response_to_events(await self.complete(request)):
            yield event

    async def aclose(self) -> None:
        pass

    def dump_state(self) -> dict[str, Any]:
        return self.engine.dump_state()

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> AsyncPromptkitEngine:
        return cls(PromptkitEngine.load_state(state))


def chat_messages(request: dspy.lm15.Request) -> list[dict[str, str]]:
    """A request's system text and messages as ``{role, content}`` dicts for a chat template."""
    out = []
    if request.system:
        system = request.system if isinstance(request.system, str) else "".join(
            p.text for p in request.system if isinstance(p, TextPart))
        out.append({"role": "system", "content": system})
    for m in request.messages:
        out.append({"role": "system" if m.role == "developer" else m.role, "content": _text(m)})
    return out


def _text(message: Message) -> str:
    return "".join(p.text for p in message.parts if isinstance(p, TextPart))


def _response(reply: Reply, model: str) -> Response:
    usage = Usage(input_tokens=reply.prompt_tokens, output_tokens=reply.completion_tokens,
                  cache_read_tokens=reply.cached_tokens, cache_write_tokens=reply.prompt_tokens - reply.cached_tokens)
    finish = reply.finish_reason if reply.finish_reason in ("stop", "length") else "stop"
    return Response(id=None, model=model, message=Message.assistant([TextPart(reply.text)]), finish_reason=finish,
                    usage=usage, logprobs=_token_logprobs(reply.logprobs))


def _token_logprobs(entries: list[dict[str, Any]] | None) -> tuple[TokenLogprob, ...] | None:
    if entries is None:
        return None

    def top(e: dict[str, Any]) -> TopLogprob:
        return TopLogprob(token=e["token"], logprob=float(e["logprob"]), bytes=tuple(text_bytes(e["token"])))

    return tuple(TokenLogprob(token=e["token"], logprob=float(e["logprob"]), bytes=tuple(text_bytes(e["token"])),
                              top=tuple(top(t) for t in e.get("top_logprobs") or ())) for e in entries)


# -- the LM -------------------------------------------------------------------------------------------
class PromptkitLM(dspy.LM):
    """A DSPy LM on promptkit's engine: in this process (``lm``: a promptkit LM or a model name;
    default the embedded model) or through ``promptkit serve`` (``base_url``, ending in ``/v1``).

    ``max_tokens`` and ``temperature`` are the defaults of every call (greedy by default);
    ``cache`` is DSPy's response cache, on by default as in ``dspy.LM`` (turn it off to time
    the engine). Other keyword arguments are ``dspy.LM``'s.
    """

    def __init__(self, lm: LM | str | None = None, *, base_url: str | None = None, api_key: str | None = None,
                 timeout: float = 600.0, max_tokens: int | None = DEFAULT_MAX_TOKENS, temperature: float = 0.0,
                 cache: bool = True, engine: PromptkitEngine | None = None, model: str | None = None,
                 **kwargs: Any) -> None:
        engine = engine or PromptkitEngine.connect(lm, base_url=base_url, api_key=api_key, timeout=timeout)
        kwargs.setdefault("async_engine", AsyncPromptkitEngine(engine))
        super().__init__(model or f"promptkit/{engine.model_name}", engine=engine, max_tokens=max_tokens,
                         temperature=temperature, cache=cache, **kwargs)

    def stats(self) -> dict[str, Any]:
        """The engine's counters: ``tokens_prefilled``, ``tokens_cached``, ``tokens_requested``, ``steps``, ..."""
        return self.engine.stats()

    @property
    def calls(self) -> int:
        """Requests the engine answered for this LM and its copies (DSPy's cache hits aside)."""
        return self.engine.calls
