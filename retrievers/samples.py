"""A small real corpus that ships with every Python: the Language Reference topics of ``pydoc``.

Useful for trying retrievers offline and for tests: 79 topics written by the
Python documentation team, each with a title line (a natural query with a
known answer: the topic itself).
"""

from __future__ import annotations

from promptkit.types import Document


def _title_and_body(text: str) -> tuple[str, str]:
    lines = text.strip().splitlines()
    body_start = 2 if len(lines) > 1 and set(lines[1].strip()) <= {"*", "="} else 1
    return lines[0].strip(), "\n".join(lines[body_start:]).strip()


def python_reference(max_chars: int | None = 2000) -> tuple[list[Document], dict[str, str]]:
    """Documents (id = topic, title removed, text cut to ``max_chars``) and queries (topic -> its title)."""
    from pydoc_data.topics import topics

    docs, queries = [], {}
    for topic in sorted(topics):
        title, body = _title_and_body(topics[topic])
        docs.append(Document(id=topic, text=body[:max_chars] if max_chars else body,
                             metadata={"section": topic.split("-")[0]}))
        queries[topic] = title.replace('"', "")
    return docs, queries


def python_reference_paragraphs(min_chars: int = 80) -> list[Document]:
    """The topics split into paragraphs (a few thousand short documents), id ``topic/n``."""
    from pydoc_data.topics import topics

    out = []
    for topic in sorted(topics):
        paras = [p.strip() for p in _title_and_body(topics[topic])[1].split("\n\n")]
        out += [Document(id=f"{topic}/{n}", text=p, metadata={"topic": topic})
                for n, p in enumerate(x for x in paras if len(x) >= min_chars)]
    return out
