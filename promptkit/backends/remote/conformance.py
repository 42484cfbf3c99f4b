"""Checking a server's constrained output against the constraint it was sent with.

A server may drop a constraint it does not understand and still answer 200, so every
constrained reply is checked here: a finished output must match in full (JSON against its
schema with any whitespace, a regex or grammar in full, a choice exactly); one cut short by
``max_tokens`` or a stop string must at least be a prefix of a match. The check walks the
output's bytes through llguidance (the grammar engine the local backends decode with), so it
applies the same semantics as local constrained decoding.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from ...structured import Constraint, closed_objects

log = logging.getLogger("promptkit.remote")
EOS_BYTE = 256


class NonConformingOutput(RuntimeError):
    """A server's reply that does not match the constraint the request carried."""


class _ByteTokens:
    """A tokenizer whose tokens are the 256 bytes (and an EOS): llguidance then checks text, not tokens."""

    eos_token_id = EOS_BYTE
    bos_token_id = None
    tokens: tuple[bytes, ...] = (*(bytes([i]) for i in range(256)), b"")
    special_token_ids: tuple[int, ...] = (EOS_BYTE,)

    def __call__(self, text: str | bytes) -> list[int]:
        return list(text if isinstance(text, bytes) else text.encode("utf-8"))


@functools.cache
def _byte_tokenizer() -> Any:
    from llguidance import LLTokenizer, TokenizerWrapper

    return LLTokenizer(TokenizerWrapper(_ByteTokens()))


def sent_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema as sent to servers: objects closed, as the local engine decodes them."""
    return closed_objects(schema)


@functools.lru_cache(maxsize=128)
def _matcher(key: str) -> Any:
    """A fresh-state llguidance matcher for a constraint (by its key), or None when it cannot compile."""
    from llguidance import LLMatcher

    c = Constraint.model_validate_json(key)
    if c.json_schema is not None:
        grammar = LLMatcher.grammar_from_json_schema(sent_schema(c.json_schema), defaults={"whitespace_flexible": True})
    else:
        grammar = c.to_llguidance()
    m = LLMatcher(_byte_tokenizer(), grammar, log_level=0)
    return None if m.is_error() else m


def check_output(constraint: Constraint | None, text: str, finished: bool, server: str) -> None:
    """Raise :class:`NonConformingOutput` unless ``text`` matches ``constraint`` (in full when ``finished``,
    else as a prefix). ``server`` names the server in the message."""
    if constraint is None:
        return
    subject = text.strip() if constraint.json_schema is not None else text
    try:
        proto = _matcher(constraint.model_dump_json(exclude_none=True))
    except ValueError as e:
        proto, why = None, str(e)
    else:
        why = "llguidance cannot compile it"
    if proto is None:
        log.warning("cannot check the %s server's output against its constraint (%s)", server, why)
        return
    m = proto.deep_copy()
    ok = m.consume_tokens(list(subject.encode("utf-8"))) and not m.is_error()
    if ok and (not finished or m.is_accepting()):
        return
    what = describe(constraint)
    how = "does not match" if not ok else "stops before it matches"
    raise NonConformingOutput(f"the {server} server's output {how} {what}: {text[:200]!r}")


def describe(c: Constraint) -> str:
    """The constraint in words, for messages: 'the JSON schema', 'the regex ...', ..."""
    if c.json_schema is not None:
        return "the JSON schema"
    if c.regex is not None:
        return f"the regex {c.regex!r}"
    if c.grammar is not None:
        return "the grammar"
    return f"the choices {c.choices}"
