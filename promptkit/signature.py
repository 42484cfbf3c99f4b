"""Typed signatures and output schemas for structured generation.

``"question -> answer: str, confidence: float"`` names a step's inputs and its typed
outputs, as DSPy writes it; :func:`output_model` compiles the outputs into a pydantic
model whose JSON schema constrains the generation, so the step's output always parses.
Types: ``str``, ``int``, ``float``, ``bool``, ``dict``, ``list[T]``, ``Literal['a', 'b']``,
``T | None``; an output without a type is a ``str``.
"""

from __future__ import annotations

import ast
import importlib
import json
import re
from typing import Any, Literal, Optional

from pydantic import BaseModel, create_model

_SCALARS: dict[str, Any] = {"str": str, "int": int, "float": float, "bool": bool, "dict": dict, "Any": Any}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SignatureError(ValueError):
    """A signature or schema that cannot be understood (the message says where)."""


class Signature(BaseModel):
    """Parsed ``inputs -> outputs``: input names, and output names with their type text."""

    inputs: list[str]
    outputs: dict[str, str]

    @classmethod
    def parse(cls, text: str) -> Signature:
        if text.count("->") != 1:
            raise SignatureError(f"a signature is 'inputs -> outputs' with one arrow; got {text!r}")
        left, right = (s.strip() for s in text.split("->"))
        inputs = [s.strip() for s in left.split(",") if s.strip()]
        outputs: dict[str, str] = {}
        for item in _split_top(right):
            name, _, kind = (s.strip() for s in item.partition(":"))
            outputs[name] = kind or "str"
        for n in [*inputs, *outputs]:
            if not _NAME.match(n):
                raise SignatureError(f"{n!r} in {text!r} is not a field name")
        if not outputs:
            raise SignatureError(f"signature {text!r} has no outputs")
        return cls(inputs=inputs, outputs=outputs)


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets (``a: list[int], b: Literal['x', 'y']``)."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[("
        depth -= ch in "])"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [p.strip() for p in [*parts, cur] if p.strip()]


def parse_type(text: str) -> Any:
    """A Python type from its text, without evaluating code."""
    text = text.strip()
    if "|" in text and not text.startswith("Literal["):
        options = [parse_type(t) for t in _split_union(text)]
        out = options[0]
        for o in options[1:]:
            out = out | o if o is not type(None) else Optional[out]  # noqa: UP007
        return out
    if text == "None":
        return type(None)
    if text in _SCALARS:
        return _SCALARS[text]
    m = re.fullmatch(r"(list|List|Optional|Literal)\[(.*)\]", text, re.S)
    if m is None:
        raise SignatureError(f"unknown type {text!r}; use str, int, float, bool, dict, list[T], Literal[...], T | None")
    head, inner = m.groups()
    if head in ("list", "List"):
        return list[parse_type(inner)]  # type: ignore[misc]
    if head == "Optional":
        return Optional[parse_type(inner)]  # noqa: UP007
    try:
        values = ast.literal_eval(f"({inner},)")
    except (ValueError, SyntaxError):
        raise SignatureError(f"Literal values must be literals: {text!r}") from None
    return Literal[values]  # type: ignore[valid-type]


def _split_union(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "|" and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [p.strip() for p in [*parts, cur]]


def output_model(signature: str | Signature, name: str = "Output") -> type[BaseModel]:
    """The pydantic model of a signature's outputs (every field required, in order)."""
    sig = Signature.parse(signature) if isinstance(signature, str) else signature
    fields = {k: (parse_type(v), ...) for k, v in sig.outputs.items()}
    return create_model(name, **fields)  # type: ignore[call-overload]


def resolve_schema(spec: Any) -> type[BaseModel] | dict[str, Any]:
    """A pydantic model class or a JSON-schema dict from: either of those, a JSON string, or a dotted
    import path to a model (``package.module:Model`` or ``package.module.Model``)."""
    if isinstance(spec, type) and issubclass(spec, BaseModel) or isinstance(spec, dict):
        return spec
    if not isinstance(spec, str):
        raise SignatureError(f"a schema is a pydantic model, a JSON schema or a dotted path, not {type(spec).__name__}")
    text = spec.strip()
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise SignatureError(f"schema is not valid JSON: {e}") from None
    module, sep, attr = text.partition(":") if ":" in text else text.rpartition(".")
    if not module or not attr:
        raise SignatureError(f"schema {spec!r} is neither JSON nor a dotted path like 'package.module:Model'")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise SignatureError(f"cannot import schema {spec!r}: {e}") from None
    if not (isinstance(obj, type) and issubclass(obj, BaseModel)) and not isinstance(obj, dict):
        raise SignatureError(f"{spec!r} is neither a pydantic model nor a JSON-schema dict")
    return obj


def schema_path(model: type[BaseModel]) -> str | None:
    """``module:QualName`` when ``model`` can be imported back by that path, else None."""
    path = f"{model.__module__}:{model.__qualname__}"
    try:
        return path if resolve_schema(path) is model else None
    except SignatureError:
        return None
