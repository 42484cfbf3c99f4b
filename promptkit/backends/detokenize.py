"""Text out of a generation a token at a time, in O(1) amortized work per token.

:class:`IncrementalDetokenizer` decodes only a small window of recent tokens (the scheme of
vLLM's and TGI's detokenizers); :class:`StreamText` adds what a stream may show (whole
characters, nothing that may be the start of a stop string, nothing past one), and
:class:`StopCheck` tells the engine when the text holds a stop string.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from .base import StopScanner

REPLACEMENT = "\ufffd"  # what decoding shows for a character whose last byte has not come yet


class IncrementalDetokenizer:
    """Decodes a growing list of token ids, returning each token's new text.

    Each step decodes the tokens not yet fully read plus those read at the last step (the
    prefix): decoding from a token before the new ones keeps the spacing a tokenizer gives a
    word inside a text (SentencePiece drops the leading space of a text's first token), and
    the new text is what the window adds to the prefix. A character split across tokens
    decodes as U+FFFD until its last byte arrives; until then the window grows by a token or
    two (at most three for valid UTF-8), and the text before that character is returned.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self.ids: list[int] = []
        self._prefix = self._read = 0  # the window starts at _prefix; tokens before _read are read
        self._prefix_text = ""  # the text of tokens _prefix:_read, decoded alone
        self._returned = 0  # characters of the unread tokens' text already returned

    def push(self, token: int) -> str:
        """Add ``token``; return the text that is now certain (possibly empty)."""
        self.ids.append(token)
        new = self._decode(self.ids[self._prefix :])[len(self._prefix_text) :]
        if new.endswith(REPLACEMENT):  # only the last character can still change: return what precedes it
            out = new[self._returned : -1]
            self._returned += len(out)
            return out
        out = new[self._returned :]
        self._prefix, self._read, self._returned = self._read, len(self.ids), 0
        self._prefix_text = self._decode(self.ids[self._prefix : self._read])
        return out


class StreamText:
    """What a stream may show of a generation, as its tokens come: whole characters, less a tail
    that may begin a stop string, and nothing from a stop string on.

    :meth:`push` returns the text released by a token and how many tokens the text released so
    far takes to spell (a token is counted once its first character is shown), so a stream's
    events carry exactly the tokens behind their text, as the whole generation's do.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str]) -> None:
        self._detok = IncrementalDetokenizer(decode)
        self._stops = StopScanner(stop)
        self._held = ""  # decoded text not released yet (at most a stop string's length, or a stop and after)
        self._ends: deque[tuple[int, int]] = deque()  # (tokens, characters decoded) for tokens not counted yet
        self._counted_end = 0  # characters spelled by the tokens counted so far
        self.released = 0  # characters released so far
        self.tokens = 0  # tokens behind the released text

    def push(self, token: int) -> tuple[str, int]:
        """Add the next generated token; return (the text it releases, the tokens counted so far)."""
        piece = self._detok.push(token)
        self._stops.feed(piece)
        self._held += piece
        self._ends.append((len(self._detok.ids), self._stops.seen))
        upto = self._stops.final()
        if upto <= self.released:
            return "", self.tokens
        out, self._held = self._held[: upto - self.released], self._held[upto - self.released :]
        self.released = upto
        while self._ends and self._counted_end < upto:  # every token whose text begins before `upto`
            self.tokens, self._counted_end = self._ends.popleft()
        return out, self.tokens


class StopCheck:
    """Whether a generation's text holds a stop string yet: called by the engine after each token
    with all the tokens generated so far, it reads only the new ones."""

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str]) -> None:
        self._decode, self._stop = decode, stop
        self._reset()

    def _reset(self) -> None:
        self._detok, self._stops = IncrementalDetokenizer(self._decode), StopScanner(self._stop)

    def __call__(self, generated: list[int]) -> bool:
        if len(generated) < len(self._detok.ids):  # not the generation read so far: read it afresh
            self._reset()
        for token in generated[len(self._detok.ids) :]:
            self._stops.feed(self._detok.push(token))
        return self._stops.found is not None
