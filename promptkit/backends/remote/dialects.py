"""How each kind of server takes an output constraint, and what it cannot take.

:func:`constraint_fields` gives the request fields for a constraint on ``/v1/completions`` or
``/v1/chat/completions``, or raises :class:`UnsupportedByServer` before anything is sent.

* vLLM: ``structured_outputs`` (``json``/``regex``/``grammar``/``choice``) from 0.10.2 on
  (0.12 dropped the old fields, and ignores them silently); ``guided_*`` before.
* SGLang: ``json_schema`` (a JSON string) on completions, ``response_format`` on chat;
  ``regex``; ``ebnf`` (GBNF) for a GBNF grammar and for choices.
* llama.cpp's ``llama-server``: ``json_schema`` on completions, ``response_format`` on chat;
  ``grammar`` (GBNF) for a GBNF grammar, a regex and choices (converted here).
* llama-cpp-python's server: ``grammar`` (GBNF) on both endpoints, for a JSON schema on
  completions too (converted with llama.cpp's converter); ``response_format``
  ``{"type": "json_object", "schema": ...}`` on chat.
* ``promptkit serve``: ``response_format`` and vLLM's ``guided_*``.
* OpenAI: ``response_format`` json_schema on chat only.
* Any other server: ``response_format`` json_schema only (OpenAI's field), checked after.

A Lark grammar goes only to vLLM and ``promptkit serve``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal

from ...structured import Constraint
from .conformance import sent_schema
from .gbnf import NotConvertible, choices_to_gbnf, is_gbnf, json_schema_to_gbnf, regex_to_gbnf
from .kinds import ServerInfo, ServerKind

Endpoint = Literal["completions", "chat"]
Fields = dict[str, Any]

# llama.cpp samples with top_k 40, min_p 0.05 (and llama-cpp-python with repeat_penalty 1.1) unless
# told otherwise; these make its sampling OpenAI's (and the local engine's).
LLAMA_CPP_SAMPLING = {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0}


class UnsupportedByServer(NotImplementedError):
    """A request the server cannot honour, refused before it is sent (the message says why)."""


def kind_of(c: Constraint) -> str:
    """The constraint's kind in words: 'JSON schema', 'regex', 'Lark grammar', 'GBNF grammar', 'choices'."""
    if c.json_schema is not None:
        return "JSON schema"
    if c.regex is not None:
        return "regex"
    if c.grammar is not None:
        return "GBNF grammar" if is_gbnf(c.grammar) else "Lark grammar"
    return "choices"


def refuse(info: ServerInfo, c: Constraint, endpoint: Endpoint, why: str) -> UnsupportedByServer:
    return UnsupportedByServer(f"the {info.kind.value} server cannot take a {kind_of(c)} constraint on "
                               f"/v1/{endpoint.replace('chat', 'chat/completions')}: {why}")


def constraint_fields(info: ServerInfo, c: Constraint | None, endpoint: Endpoint) -> Fields:
    """The request fields carrying ``c`` to this server, or :class:`UnsupportedByServer`."""
    if c is None:
        return {}
    try:
        return _DIALECTS[info.kind](info, c, endpoint)
    except NotConvertible as e:
        raise refuse(info, c, endpoint, str(e)) from None


def sampling_fields(info: ServerInfo) -> Fields:
    """Fields that make the server sample as OpenAI's API defines (and the local engine does)."""
    return dict(LLAMA_CPP_SAMPLING) if info.kind in (ServerKind.LLAMA_CPP, ServerKind.LLAMA_CPP_PYTHON) else {}


def _response_format(schema: dict[str, Any], strict: bool = False) -> Fields:
    spec: dict[str, Any] = {"name": "output", "schema": schema}
    if strict:
        spec["strict"] = True
    return {"response_format": {"type": "json_schema", "json_schema": spec}}


def _vllm(info: ServerInfo, c: Constraint, endpoint: Endpoint) -> Fields:
    new_api = info.version_at_least(0, 10, 2) is not False  # an unknown version is taken as current
    value: Any
    key, value = (("json", sent_schema(c.json_schema)) if c.json_schema is not None else
                  ("regex", c.regex) if c.regex is not None else
                  ("grammar", c.grammar) if c.grammar is not None else ("choice", c.choices))
    return {"structured_outputs": {key: value}} if new_api else {f"guided_{key}": value}


def _sglang(info: ServerInfo, c: Constraint, endpoint: Endpoint) -> Fields:
    if c.json_schema is not None:
        schema = sent_schema(c.json_schema)
        return {"json_schema": json.dumps(schema)} if endpoint == "completions" else _response_format(schema)
    if c.regex is not None:
        return {"regex": c.regex}
    if c.grammar is not None:
        if not is_gbnf(c.grammar):
            raise refuse(info, c, endpoint, "its ebnf field takes GBNF (root ::= ...), and a Lark grammar has no "
                                            "general GBNF form; write the grammar in GBNF")
        return {"ebnf": c.grammar}
    return {"ebnf": choices_to_gbnf(c.choices or [])}


def _gbnf_of(info: ServerInfo, c: Constraint, endpoint: Endpoint) -> str:
    """A regex, GBNF grammar or choice list as GBNF (a Lark grammar is refused)."""
    if c.regex is not None:
        return regex_to_gbnf(c.regex)
    if c.grammar is not None:
        if not is_gbnf(c.grammar):
            raise refuse(info, c, endpoint, "llama.cpp takes GBNF grammars (root ::= ...), and a Lark grammar has "
                                            "no general GBNF form; write the grammar in GBNF")
        return c.grammar
    return choices_to_gbnf(c.choices or [])


def _llama_cpp(info: ServerInfo, c: Constraint, endpoint: Endpoint) -> Fields:
    if c.json_schema is not None:
        schema = sent_schema(c.json_schema)
        return {"json_schema": schema} if endpoint == "completions" else _response_format(schema)
    return {"grammar": _gbnf_of(info, c, endpoint)}


def _llama_cpp_python(info: ServerInfo, c: Constraint, endpoint: Endpoint) -> Fields:
    if c.json_schema is not None:
        schema = sent_schema(c.json_schema)
        if endpoint == "chat":
            return {"response_format": {"type": "json_object", "schema": schema}}
        return {"grammar": json_schema_to_gbnf(schema)}  # its completions take no schema field
    return {"grammar": _gbnf_of(info, c, endpoint)}


def _promptkit(info: ServerInfo, c: Constraint, endpoint: Endpoint) -> Fields:
    if c.json_schema is not None:
        return _response_format(sent_schema(c.json_schema))
    if c.regex is not None:
        return {"guided_regex": c.regex}
    if c.grammar is not None:
        return {"guided_grammar": c.grammar}
    return {"guided_choice": c.choices}


def _openai(info: ServerInfo, c: Constraint, endpoint: Endpoint) -> Fields:
    if c.json_schema is None:
        raise refuse(info, c, endpoint, "OpenAI's API constrains output only to a JSON schema (response_format)")
    if endpoint == "completions":
        raise refuse(info, c, endpoint, "response_format exists only on /v1/chat/completions; send a chat prompt")
    return _response_format(sent_schema(c.json_schema), strict=True)


def _generic(info: ServerInfo, c: Constraint, endpoint: Endpoint) -> Fields:
    if c.json_schema is None:
        raise refuse(info, c, endpoint, "an unidentified server is sent only OpenAI's response_format; name the "
                                        "server with server_kind= ('vllm', 'sglang', 'llama.cpp', ...)")
    return _response_format(sent_schema(c.json_schema))


_DIALECTS: dict[ServerKind, Callable[[ServerInfo, Constraint, Endpoint], Fields]] = {
    ServerKind.VLLM: _vllm, ServerKind.SGLANG: _sglang, ServerKind.LLAMA_CPP: _llama_cpp,
    ServerKind.LLAMA_CPP_PYTHON: _llama_cpp_python, ServerKind.PROMPTKIT: _promptkit,
    ServerKind.OPENAI: _openai, ServerKind.GENERIC: _generic,
}
