"""The Backend protocol: the small surface the LM facade needs from a model server.

Backends work on rendered text (chat templates already applied). The local
engine, plain transformers and any OpenAI-compatible server implement it.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, Field, field_validator

from ..structured import Constraint
from ..types import Generation, TokenLogprobs

PromptInput = str | list[int]  # rendered text, or token ids taken exactly as given


class ContextLengthError(ValueError):
    """A prompt (plus the tokens asked for) does not fit the model's context.

    ``prompt_tokens``, ``new_tokens`` and ``context`` say by how much (when known), so a
    caller such as the server can word its own advice.
    """

    def __init__(self, message: str, prompt_tokens: int | None = None, new_tokens: int | None = None,
                 context: int | None = None) -> None:
        super().__init__(message)
        self.prompt_tokens, self.new_tokens, self.context = prompt_tokens, new_tokens, context


class GenerationError(RuntimeError):
    """A generation failed inside the backend (not the request's fault)."""


class StreamEvent(BaseModel):
    """One step of a streamed generation: new text, and on the last event the whole Generation.

    ``token_ids`` are the generated tokens this event accounts for (text can wait for whole
    characters, so one event may cover several); ``logprobs`` and ``top_logprobs`` are theirs
    when the request asked for them.
    """

    text: str = ""
    token_ids: list[int] = Field(default_factory=list)
    logprobs: list[float] | None = None
    top_logprobs: list[dict[str, float]] | None = None
    generation: Generation | None = None


class SamplingParams(BaseModel):
    """Decoding settings shared by every backend. ``temperature == 0`` is greedy.

    ``max_tokens=None`` generates until EOS or the context limit. ``constraint`` forces the
    output to match a JSON schema, regex, grammar or choice list. ``presence_penalty``,
    ``frequency_penalty`` and ``logit_bias`` (token id -> added logit) work as OpenAI's do.
    """

    max_tokens: int | None = Field(default=64, ge=1)
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63, description="any 64-bit signed integer")
    logprobs: bool = False
    top_logprobs: int = Field(default=0, ge=0, le=20, description="also return this many most likely tokens per step")
    truncate: bool = False
    constraint: Constraint | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[int, float] = Field(default_factory=dict)

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, v: dict[int, float]) -> dict[int, float]:
        bad = {t: b for t, b in v.items() if not -100 <= b <= 100}
        if bad:
            raise ValueError(f"logit_bias values must lie in [-100, 100]; got {bad}")
        return v

    def tokens_for(self, prompt_len: int, context: int) -> int:
        """The new-token budget: ``max_tokens``, or all the context left after the prompt when it is None."""
        return self.max_tokens if self.max_tokens is not None else max(1, context - prompt_len)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v: Any) -> list[str]:
        if v is None:
            return []
        return [s for s in ([v] if isinstance(v, str) else list(v)) if s]  # "" would stop at once


@runtime_checkable
class Backend(Protocol):
    """What a model server offers the LM facade."""

    model_name: str
    max_context: int
    is_chat: bool

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        """Render chat messages into the model's prompt text, ending with the assistant turn."""
        ...

    def count_tokens(self, text: str) -> int: ...

    def generate(self, texts: list[PromptInput], params: SamplingParams) -> list[Generation]:
        """One generation per prompt; a list of ints is a prompt of token ids, used as is."""
        ...

    def score(self, texts: list[str], choices: list[list[str]]) -> list[list[float]]:
        """Total log-likelihood of each choice as a continuation of its text."""
        ...

    def token_logprobs(self, texts: list[PromptInput], top_logprobs: int = 0) -> list[TokenLogprobs]:
        """Log-probability of every token of each prompt; with ``top_logprobs=k``, the ``k`` most
        likely tokens at each position too."""
        ...

    def generate_stream(self, text: PromptInput, params: SamplingParams) -> Iterator[StreamEvent]:
        """Yield text as it is generated; the last event carries the Generation.

        Safe to call from many threads at once; closing the iterator early
        cancels the request.
        """
        ...

    def stats(self) -> dict[str, Any]: ...


def token_text(piece: bytes) -> str:
    """A token as logprobs name it: its text, or ``bytes:\\xe6\\x97`` when it holds only part of a
    character (byte-level tokenizers split characters), so distinct tokens keep distinct names."""
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{c:02x}" for c in piece)


def text_bytes(name: str) -> bytes:
    """The bytes of a token named by :func:`token_text`."""
    if name.startswith("bytes:\\x"):
        return bytes(int(h, 16) for h in name[len("bytes:\\x"):].split("\\x"))
    return name.encode("utf-8")


def kept_tokens(pieces: list[bytes], chars: int) -> int:
    """How many of the tokens whose bytes are ``pieces`` it takes to spell the first ``chars``
    characters of their text (the tokens of a generation cut at a stop string)."""
    decoder, done = codecs.getincrementaldecoder("utf-8")(errors="replace"), 0
    for k, piece in enumerate(pieces):
        if done >= chars:
            return k
        done += len(decoder.decode(piece))
    return len(pieces)


def truncate_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Cut ``text`` at the earliest stop string; return (text, whether one was found)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class StopScanner:
    """Finds stop strings in text that arrives piece by piece, with O(1) amortized work per character.

    A KMP automaton per stop string tracks the longest start of it that the text ends with, so
    neither a long generation nor a long stop string is ever rescanned.
    """

    def __init__(self, stop: list[str]) -> None:
        self.stop = [s for s in stop if s]
        self._fail = [_kmp_failure(s) for s in self.stop]
        self._state = [0] * len(self.stop)  # per stop string: how much of it the text ends with
        self.seen = 0  # characters fed so far
        self.found: int | None = None  # where the earliest stop string found begins

    def feed(self, text: str) -> None:
        """Scan ``text``, the next piece of the output."""
        for ch in text:
            self.seen += 1
            for k, s in enumerate(self.stop):
                q, fail = self._state[k], self._fail[k]
                while q and s[q] != ch:
                    q = fail[q - 1]
                if s[q] == ch:
                    q += 1
                if q == len(s):
                    start = self.seen - q
                    self.found = start if self.found is None else min(self.found, start)
                    q = fail[q - 1]
                self._state[k] = q

    def final(self) -> int:
        """How many characters of the text fed so far are certain to be output: all of them but a
        tail that may be the start of a stop string, and nothing from a stop string found on."""
        safe = self.seen - max(self._state, default=0)
        return safe if self.found is None else min(safe, self.found)


def _kmp_failure(s: str) -> list[int]:
    """KMP's failure function: for each prefix of ``s``, its longest proper prefix that is also its suffix."""
    fail, q = [0] * len(s), 0
    for i in range(1, len(s)):
        while q and s[i] != s[q]:
            q = fail[q - 1]
        if s[i] == s[q]:
            q += 1
        fail[i] = q
    return fail
