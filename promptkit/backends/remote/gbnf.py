"""Constraints as GBNF, the grammar format of llama.cpp's servers (and of SGLang's ``ebnf``).

A regular expression converts exactly when it uses literals, character classes, groups,
alternation and repetition (Python's syntax, parsed by :mod:`re`'s own parser); back-references,
look-arounds, inline flags and anchors inside the pattern have no GBNF form and are refused.
``\\d``, ``\\w`` and ``\\s`` become their ASCII classes. A choice list is an alternation of
literals. A JSON schema converts with llama.cpp's own converter (shipped in llama-cpp-python).
A Lark grammar has no general GBNF form.
"""

from __future__ import annotations

import json
import re
from typing import Any

try:  # Python 3.11+ keeps the parser private; older versions expose it as sre_parse
    from re import _constants as sre_c
    from re import _parser as sre_parse
except ImportError:  # pragma: no cover
    import sre_constants as sre_c  # type: ignore[no-redef]
    import sre_parse  # type: ignore[no-redef]

_LITERAL_SAFE = set(" !#$%&'()*+,-./:;<=>?@^_`{|}~")
_CATEGORIES = {
    sre_c.CATEGORY_DIGIT: "0-9",
    sre_c.CATEGORY_WORD: "a-zA-Z0-9_",
    sre_c.CATEGORY_SPACE: " \\t\\n\\r\\x0B\\x0C",
}
_NEGATED = {
    sre_c.CATEGORY_NOT_DIGIT: sre_c.CATEGORY_DIGIT,
    sre_c.CATEGORY_NOT_WORD: sre_c.CATEGORY_WORD,
    sre_c.CATEGORY_NOT_SPACE: sre_c.CATEGORY_SPACE,
}
_REPEATS = {sre_c.MAX_REPEAT, sre_c.MIN_REPEAT, getattr(sre_c, "POSSESSIVE_REPEAT", sre_c.MAX_REPEAT)}
_STARTS = {sre_c.AT_BEGINNING, sre_c.AT_BEGINNING_STRING}
_ENDS = {sre_c.AT_END, sre_c.AT_END_STRING}


class NotConvertible(ValueError):
    """A constraint with no GBNF form (the message says which part)."""


def is_gbnf(grammar: str) -> bool:
    """Whether a grammar is GBNF (``root ::= ...``) rather than Lark (``start: ...``)."""
    return "::=" in grammar


def escape_char(ch: str, in_class: bool = False) -> str:
    """One character as GBNF writes it inside a string literal or a character class."""
    if ch.isascii() and (ch.isalnum() or (not in_class and ch in _LITERAL_SAFE)):
        return ch
    n = ord(ch)
    return f"\\x{n:02X}" if n < 0x100 else f"\\u{n:04X}" if n < 0x10000 else f"\\U{n:08X}"


def literal(text: str) -> str:
    """A GBNF string literal matching exactly ``text``."""
    return '"' + "".join(escape_char(c) for c in text) + '"'


def choices_to_gbnf(choices: list[str]) -> str:
    """A grammar matching exactly one of ``choices``."""
    return "root ::= " + " | ".join(literal(c) for c in choices)


def regex_to_gbnf(pattern: str) -> str:
    """A grammar matching the strings that ``pattern`` fully matches; :class:`NotConvertible` if it has no GBNF form."""
    try:
        parsed = sre_parse.parse(pattern)
    except re.error as e:
        raise NotConvertible(f"invalid regex {pattern!r}: {e}") from None
    flags = parsed.state.flags
    if flags & re.IGNORECASE:
        raise NotConvertible("a case-insensitive regex has no GBNF form")
    items = list(parsed)
    if items and items[0][0] is sre_c.AT and items[0][1] in _STARTS:
        items = items[1:]  # the grammar matches the whole output anyway
    if items and items[-1][0] is sre_c.AT and items[-1][1] in _ENDS:
        items = items[:-1]
    return "root ::= " + _sequence(items, bool(flags & re.DOTALL))


def _sequence(items: list[tuple[Any, Any]], dotall: bool) -> str:
    parts: list[str] = []
    run = ""
    for op, av in items:
        if op is sre_c.LITERAL:
            run += chr(av)
            continue
        if run:
            parts.append(literal(run))
            run = ""
        parts.append(_item(op, av, dotall))
    if run:
        parts.append(literal(run))
    return " ".join(parts) if parts else '""'


def _item(op: Any, av: Any, dotall: bool) -> str:
    if op is sre_c.NOT_LITERAL:
        return f"[^{escape_char(chr(av), True)}]"
    if op is sre_c.ANY:
        return "[\\x00-\\U0010FFFF]" if dotall else "[^\\n]"
    if op is sre_c.IN:
        return _char_class(av)
    if op is sre_c.BRANCH:
        return "(" + " | ".join(_sequence(list(alt), dotall) for alt in av[1]) + ")"
    if op is sre_c.SUBPATTERN:
        _, add_flags, del_flags, sub = av
        if add_flags or del_flags:
            raise NotConvertible("inline regex flags have no GBNF form")
        return "(" + _sequence(list(sub), dotall) + ")"
    if op in _REPEATS:
        lo, hi, sub = av
        return f"({_sequence(list(sub), dotall)}){_repeat(lo, hi)}"
    name = str(op).lower()
    raise NotConvertible(f"the regex feature {name!r} (back-references, look-arounds, anchors inside the "
                         "pattern) has no GBNF form")


def _repeat(lo: int, hi: int) -> str:
    unbounded = hi == sre_c.MAXREPEAT
    if (lo, unbounded) == (0, True):
        return "*"
    if (lo, unbounded) == (1, True):
        return "+"
    if (lo, hi) == (0, 1):
        return "?"
    if unbounded:
        return f"{{{lo},}}"
    return f"{{{lo}}}" if lo == hi else f"{{{lo},{hi}}}"


def _char_class(items: list[tuple[Any, Any]]) -> str:
    negate = bool(items) and items[0][0] is sre_c.NEGATE
    items = items[1:] if negate else items
    if len(items) == 1 and items[0][0] is sre_c.CATEGORY and items[0][1] in _NEGATED:
        # \D, [^\D]: the complement of a class is a class
        return f"[{'' if negate else '^'}{_CATEGORIES[_NEGATED[items[0][1]]]}]"
    body = []
    for op, av in items:
        if op is sre_c.LITERAL:
            body.append(escape_char(chr(av), True))
        elif op is sre_c.RANGE:
            body.append(f"{escape_char(chr(av[0]), True)}-{escape_char(chr(av[1]), True)}")
        elif op is sre_c.CATEGORY and av in _CATEGORIES:
            body.append(_CATEGORIES[av])
        else:
            raise NotConvertible("a character class mixing a negated class (\\D, \\W, \\S) with other "
                                 "characters has no GBNF form")
    return f"[{'^' if negate else ''}{''.join(body)}]"


def json_schema_to_gbnf(schema: dict[str, Any]) -> str:
    """llama.cpp's own conversion of a JSON schema to GBNF (needs llama-cpp-python installed here)."""
    try:
        from llama_cpp.llama_grammar import json_schema_to_gbnf as convert
    except ImportError:
        raise NotConvertible("converting a JSON schema to GBNF needs llama.cpp's converter: "
                             "pip install llama-cpp-python on this machine") from None
    try:
        return convert(json.dumps(schema))
    except Exception as e:  # the converter raises bare Exceptions for schema features it lacks
        raise NotConvertible(f"llama.cpp's converter cannot convert this JSON schema: {e}") from None
