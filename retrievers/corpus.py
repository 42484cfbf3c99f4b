"""Reading corpora: a JSONL file of ``{"id", "text", ...}`` rows, or a folder of .txt/.md files."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from promptkit.data import DataError
from promptkit.data import read_jsonl as read_jsonl_rows
from promptkit.types import Document

from .errors import CorpusError

TEXT_SUFFIXES = (".txt", ".md")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: not valid UTF-8 (byte {e.start}); convert it to UTF-8 first") from None


def read_jsonl(path: str | Path) -> list[Document]:
    """Documents from a JSONL file; each line needs ``id`` and ``text``, other keys become metadata."""
    path = Path(path)
    try:
        rows = read_jsonl_rows(path)
    except DataError as e:
        raise CorpusError(str(e)) from None
    docs = []
    for n, row in rows:
        if "id" not in row or "text" not in row:
            raise CorpusError(f"{path}:{n}: each line needs 'id' and 'text' keys")
        if not isinstance(row["text"], str):
            raise CorpusError(f"{path}:{n}: 'text' must be a string")
        meta = {k: v for k, v in row.items() if k not in ("id", "text", "metadata")}
        meta.update(row.get("metadata") or {})
        docs.append(Document(id=str(row["id"]), text=row["text"], metadata=meta))
    return check_documents(docs, source=str(path))


def read_folder(path: str | Path) -> list[Document]:
    """One document per .txt/.md file under ``path`` (recursively); the id is the relative path."""
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    docs = [Document(id=p.relative_to(root).as_posix(), text=_read_text(p), metadata={"path": str(p)})
            for p in files]
    return check_documents(docs, source=str(root))


def load_corpus(path: str | Path) -> list[Document]:
    """Documents from a JSONL file or a folder of .txt/.md files."""
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"{path}: no such file or directory")
    if path.is_dir():
        return read_folder(path)
    if path.suffix.lower() not in (".jsonl", ".json", ".ndjson"):
        raise CorpusError(f"{path}: a corpus is a .jsonl file (id/text per line) or a folder of .txt/.md files")
    return read_jsonl(path)


def check_documents(docs: Iterable[Document], source: str = "corpus") -> list[Document]:
    """Refuse an empty corpus and duplicate ids (naming them)."""
    docs = list(docs)
    if not docs:
        raise CorpusError(f"{source}: empty corpus (no documents found)")
    seen: set[str] = set()
    dups = []
    for d in docs:
        if d.id in seen:
            dups.append(d.id)
        seen.add(d.id)
    if dups:
        raise CorpusError(f"{source}: duplicate document ids {sorted(set(dups))[:10]}")
    return docs
