"""Tokenizer for lexical retrieval: lower-case word tokens, optional stop words and stemming."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from typing import Any

from pydantic import BaseModel, ConfigDict, PrivateAttr

# The English stop-word list of NLTK (as used by bm25s and Pyserini's defaults).
ENGLISH_STOPWORDS = frozenset("""
a about above after again against ain all am an and any are aren aren't as at be because been before being
below between both but by can couldn couldn't d did didn didn't do does doesn doesn't doing don don't down
during each few for from further had hadn hadn't has hasn hasn't have haven haven't having he her here hers
herself him himself his how i if in into is isn isn't it it's its itself just ll m ma me mightn mightn't more
most mustn mustn't my myself needn needn't no nor not now o of off on once only or other our ours ourselves
out over own re s same shan shan't she she's should should've shouldn shouldn't so some such t than that
that'll the their theirs them themselves then there these they this those through to too under until up ve
very was wasn wasn't we were weren weren't what when where which while who whom why will with won won't
wouldn wouldn't y you you'd you'll you're you've your yours yourself yourselves
""".split())


class Tokenizer(BaseModel):
    """Split text into lexical tokens.

    ``pattern`` picks the tokens (default: runs of word characters), they are
    lower-cased, stop words dropped (``stopwords="english"`` or an explicit
    list) and stemmed with PyStemmer when ``stemmer`` names a language.
    The settings are saved with an index so queries are tokenized the same way.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    pattern: str = r"\w+"
    lower: bool = True
    stopwords: str | list[str] | None = None
    stemmer: str | None = None
    _regex: re.Pattern = PrivateAttr()
    _stop: frozenset[str] = PrivateAttr()
    _stem: Any = PrivateAttr()

    def model_post_init(self, _: object) -> None:
        self._regex = re.compile(self.pattern)
        self._stop = self._stop_set()
        self._stem = self._make_stemmer()

    def _stop_set(self) -> frozenset[str]:
        if self.stopwords is None:
            return frozenset()
        if isinstance(self.stopwords, str):
            if self.stopwords != "english":
                raise ValueError(f"unknown stop-word list {self.stopwords!r}; use 'english' or give a list of words")
            return ENGLISH_STOPWORDS
        return frozenset(w.lower() if self.lower else w for w in self.stopwords)

    def _make_stemmer(self):
        if self.stemmer is None:
            return None
        import Stemmer

        if self.stemmer not in Stemmer.algorithms():
            raise ValueError(f"unknown stemmer {self.stemmer!r}; PyStemmer knows {Stemmer.algorithms()}")
        return Stemmer.Stemmer(self.stemmer)

    def __eq__(self, other: object) -> bool:  # settings decide equality, not the compiled helpers
        return isinstance(other, Tokenizer) and self.model_dump() == other.model_dump()

    def __hash__(self) -> int:
        return hash(repr(self.model_dump()))

    def __call__(self, text: str) -> list[str]:
        """Tokens of one text."""
        if self.lower:
            text = text.lower()
        toks = [t for t in self._regex.findall(text) if t not in self._stop]
        stem = self._stem
        return stem.stemWords(toks) if stem is not None and toks else toks

    def many(self, texts: Iterable[str]) -> list[list[str]]:
        """Tokens of many texts."""
        return [self(t) for t in texts]


def english(stem: bool = True) -> Tokenizer:
    """The usual English setup: stop words removed, Snowball stemming."""
    return Tokenizer(stopwords="english", stemmer="english" if stem else None)


def as_tokens(texts: Sequence[str] | Sequence[list[str]], tokenizer: Tokenizer) -> list[list[str]]:
    """Tokenize strings; pass pre-tokenized lists through."""
    return [t if isinstance(t, list) else tokenizer(t) for t in texts]
