"""Where retrieved passages go in the context (Jin et al., 2024, "Long-context LLMs meet RAG").

A model reads the ends of a long context best and is misled by strong-looking passages in the
middle, so the order of the retrieved passages matters as much as their number.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from promptkit.types import Document

PassageOrder = Literal["score", "best_last", "ends"]
PASSAGE_ORDERS: tuple[str, ...] = ("score", "best_last", "ends")


def order_passages(docs: Sequence[Document], order: PassageOrder = "score") -> list[Document]:
    """Documents ranked best first, placed as ``order`` says: ``score`` best first, ``best_last``
    best nearest the question, ``ends`` best at both ends (1st, 3rd, 5th... from the front,
    2nd, 4th... from the back, the weakest in the middle: the paper's reordering)."""
    if order == "score":
        return list(docs)
    if order == "best_last":
        return list(reversed(docs))
    if order == "ends":
        return list(docs[0::2]) + list(reversed(docs[1::2]))
    raise ValueError(f"unknown passage order {order!r}; choose one of {list(PASSAGE_ORDERS)}")
