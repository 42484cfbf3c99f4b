"""The OpenAI wire format as clients send it: request bodies, messages, and the fields that
become constraints (``response_format``, ``tools``/``tool_choice``, vLLM's ``guided_*``).

Everything a body may hold is declared here; anything else is refused by name. Tool calls
are generated as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` under a grammar
that holds the arguments to the tool's parameter schema, then returned as OpenAI
``tool_calls``; a tool-call history is rendered back in the same form.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .structured import Constraint, lark_json

# Request fields a served pipeline cannot honour (its recipe decides them); given, they are refused.
PIPELINE_REFUSED = ("logprobs", "top_logprobs", "echo", "logit_bias", "presence_penalty", "frequency_penalty",
                    "guided_json", "guided_regex", "guided_choice", "guided_grammar", "tools", "tool_choice")
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's name; usage rides on the final chunk either way


class JSONSchemaFormat(_Strict):
    name: str = "response"
    schema_: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a json_schema object")
        return self


# -- the fields both endpoints share ----------------------------------------------------------
class Body(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)  # a 64-bit signed integer, as OpenAI's
    n: int = Field(default=1, ge=1)  # bounded by the server (--max-n), as the stop strings are (--max-stop)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored, as OpenAI clients often send it
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[int, float] | None = None
    response_format: ResponseFormat | None = None
    # vLLM's names for the same constraints
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[int, float] | None) -> dict[int, float] | None:
        if v and any(not -100 <= b <= 100 for b in v.values()):
            raise ValueError("logit_bias values must lie in [-100, 100]")
        return v

    def choice_seed(self, k: int) -> int | None:
        """The seed of the ``k``-th choice: ``seed + k``, wrapped to stay a 64-bit signed integer."""
        return None if self.seed is None else (self.seed + k + 2**63) % 2**64 - 2**63

    def pipeline_settings(self, limit: int | None) -> dict[str, Any]:
        """For a served pipeline: the sampling fields its generate stages take from this request
        (``limit`` is the request's token limit). Fields a pipeline cannot honour raise ValueError."""
        refused = [f for f in PIPELINE_REFUSED if getattr(self, f, None) not in (None, False, 0, {}, [])]
        if self.response_format is not None and self.response_format.type != "text":
            refused.append("response_format")
        if self.n != 1:
            refused.append("n")
        if refused:
            raise ValueError(f"a pipeline model does not take {', '.join(sorted(refused))}: its recipe sets how it "
                             "generates; send the input alone, with at most max_tokens, temperature, top_p, stop "
                             "and seed")
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        given = {"max_tokens": limit, "temperature": self.temperature, "top_p": self.top_p, "stop": stop,
                 "seed": self.seed}
        return {k: v for k, v in given.items() if v is not None}

    def constraint_fields(self) -> dict[str, Any]:
        """The fields that ask for an output constraint, by name."""
        given = {k: getattr(self, k) for k in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
                 if getattr(self, k) is not None}
        rf = self.response_format
        if rf is not None and rf.type != "text":
            given["response_format"] = rf
        return given

    def constraint(self) -> Constraint | None:
        """The output constraint from ``response_format`` or a ``guided_*`` field (at most one)."""
        given, rf = self.constraint_fields(), self.response_format
        if len(given) > 1:
            raise ValueError(f"give at most one output constraint; got {sorted(given)}")
        if rf is not None and "response_format" in given:
            schema = rf.json_schema.schema_ if rf.type == "json_schema" and rf.json_schema else {"type": "object"}
            return Constraint(json_schema=schema)
        return Constraint.of(json_schema=self.guided_json, regex=self.guided_regex, grammar=self.guided_grammar,
                             choices=self.guided_choice)


# -- completions ----------------------------------------------------------------------------
PromptInput = str | list[int]


class CompletionBody(Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        items = v if isinstance(v, list) and v and not isinstance(v[0], int) else [v]
        if isinstance(v, list) and not v:
            raise ValueError("prompt is empty")
        for p in items:
            if isinstance(p, str) and not p.strip() or isinstance(p, list) and not p:
                raise ValueError("prompt is empty")
        return v

    @model_validator(mode="after")
    def _zero_needs_echo(self) -> CompletionBody:
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens=0 is only allowed with echo=true (prompt logprobs)")
        if self.echo and self.stream:
            raise ValueError("echo cannot be streamed; send stream=false")
        return self

    def prompts(self) -> list[PromptInput]:
        """One entry per prompt: text, or a list of token ids used exactly as given."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


# -- chat -------------------------------------------------------------------------------------
class FunctionCall(_Strict):
    name: str
    arguments: str = "{}"


class ToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None  # echoed back by some clients in the history; ignored

    @field_validator("content")
    @classmethod
    def _text_parts(cls, v: Any) -> Any:
        if isinstance(v, list):
            for part in v:
                kind = part.get("type")
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"content part of type {kind!r} is not supported; send text parts "
                                     "({'type': 'text', 'text': ...})")
        return v

    @model_validator(mode="after")
    def _has_content(self) -> Message:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        return self

    def text(self) -> str:
        """The content as one string (text parts joined by newlines)."""
        if isinstance(self.content, list):
            return "\n".join(p["text"] for p in self.content)
        return self.content or ""


class FunctionDef(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedToolChoice(_Strict):
    type: Literal["function"] = "function"
    function: dict[str, str]

    @field_validator("function")
    @classmethod
    def _named(cls, v: dict[str, str]) -> dict[str, str]:
        if "name" not in v:
            raise ValueError("tool_choice.function needs a name")
        return v


class ChatBody(Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _checks(self) -> ChatBody:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        if self.max_tokens == 0:
            raise ValueError("max_tokens must be at least 1")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = [t.function.name for t in self.tools or []]
            if self.tool_choice.function["name"] not in names:
                raise ValueError(f"tool_choice names {self.tool_choice.function['name']!r}, which is not in "
                                 f"tools ({names})")
        elif self.tool_choice in ("auto", "required") and not self.tools:
            raise ValueError(f"tool_choice={self.tool_choice!r} needs tools")
        return self

    def token_limit(self) -> int | None:
        """``max_completion_tokens`` (OpenAI's current name) or ``max_tokens``; None: until EOS or the context ends."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def active_tools(self) -> list[Tool]:
        """The tools the model may call (none when ``tool_choice`` is "none")."""
        if not self.tools or self.tool_choice == "none":
            return []
        if isinstance(self.tool_choice, NamedToolChoice):
            return [t for t in self.tools if t.function.name == self.tool_choice.function["name"]]
        return list(self.tools)

    def tool_mode(self) -> str:
        """"" (no tools), "auto" (text or calls) or "required" (calls only; a named choice too)."""
        if not self.active_tools():
            return ""
        return "auto" if self.tool_choice in (None, "auto") else "required"


# -- rendering messages and tools ---------------------------------------------------------
def tools_system_text(tools: list[Tool]) -> str:
    """What the model is told about the tools it may call."""
    lines = ["You can call these tools:"]
    for t in tools:
        f = t.function
        lines.append(json.dumps({"name": f.name, "description": f.description or "", "parameters": f.parameters}))
    lines.append(f'To call a tool, answer with {TOOL_OPEN}{{"name": <tool name>, "arguments": {{...}}}}{TOOL_CLOSE}')
    return "\n".join(lines)


def chat_messages(body: ChatBody) -> list[dict[str, str]]:
    """Plain ``{role, content}`` messages for a chat template: ``developer`` becomes ``system``,
    text parts are joined, the tools are described in the system message, and a tool-call
    history is written the way the model is asked to call tools."""
    out: list[dict[str, str]] = []
    for m in body.messages:
        role = "system" if m.role == "developer" else m.role
        text = m.text()
        if m.tool_calls:
            calls = [TOOL_OPEN + json.dumps({"name": c.function.name, "arguments": _args(c.function.arguments)})
                     + TOOL_CLOSE for c in m.tool_calls]
            text = "\n".join(([text] if text else []) + calls)
        out.append({"role": role, "content": text})
    tools = body.active_tools()
    if tools:
        note = tools_system_text(tools)
        if out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + note}
        else:
            out.insert(0, {"role": "system", "content": note})
    return out


def _args(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


def tool_grammar(body: ChatBody, text_constraint: Constraint | None = None) -> str:
    """A Lark grammar for the reply: one tool call (several with parallel_tool_calls), each
    call's arguments held to its tool's parameter schema; in "auto" mode free text (or the
    response_format's JSON) is allowed instead."""
    calls = {"anyOf": [{"type": "object", "properties": {"name": {"const": t.function.name},
                                                        "arguments": t.function.parameters},
                        "required": ["name", "arguments"]} for t in body.active_tools()]}
    repeat = "+" if body.parallel_tool_calls else ""
    lines = [f"calls: call{repeat}", f"call: {json.dumps(TOOL_OPEN)} {lark_json(calls)} {json.dumps(TOOL_CLOSE)}"]
    if body.tool_mode() == "required":
        return "\n".join(["start: calls", *lines])
    if text_constraint is not None and text_constraint.json_schema is not None:
        text_rule = "text: " + lark_json(text_constraint.json_schema)
    else:
        text_rule = "text: TEXT\nTEXT: /(?s:.+)/"
    return "\n".join(["start: text | calls", text_rule, *lines])


def parse_tool_calls(text: str) -> list[dict[str, Any]] | None:
    """OpenAI ``tool_calls`` from generated text, or None when the text is not tool calls."""
    rest, calls = text.strip(), []
    while rest.startswith(TOOL_OPEN):
        end = rest.find(TOOL_CLOSE)
        if end < 0:
            return None
        try:
            call = json.loads(rest[len(TOOL_OPEN):end])
        except json.JSONDecodeError:
            return None
        if not isinstance(call, dict) or "name" not in call:
            return None
        calls.append({"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                      "function": {"name": call["name"], "arguments": json.dumps(call.get("arguments", {}))}})
        rest = rest[end + len(TOOL_CLOSE):].strip()
    return calls if calls and not rest else None
