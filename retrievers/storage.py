"""Index directories: a manifest with format, version and checksums, written atomically.

Every index directory holds ``manifest.json`` (kind, format version, settings
and the size and SHA-256 of every file) next to its data files. Loading checks
all of it, so a truncated or edited file is a clear error instead of garbage
results; saving writes to a temporary sibling and renames it into place, so a
failed save never leaves half an index behind and never overwrites one unless
asked to.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from promptkit.types import Document

from .errors import IndexFormatError

FORMAT = "promptkit-index"
VERSION = 1
MANIFEST = "manifest.json"
DOCS = "docs.jsonl"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_replaceable(out: str | Path, force: bool = False) -> None:
    """Refuse to write an index at ``out`` when that would lose anything but an older index.

    Without ``force`` ``out`` must not exist. With it, ``out`` may be missing, an empty
    directory or a promptkit index directory (a readable manifest); a file or a directory
    holding anything else is refused, since replacing it would delete it.
    """
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise FileExistsError(f"{out} already exists; pass force=True (--force) to replace it")
    if out.is_symlink() or not out.is_dir():
        raise IndexFormatError(f"{out} is not a directory; --force replaces only an index directory, so "
                               "remove it yourself or choose another output path")
    if not any(out.iterdir()):
        return
    try:
        read_manifest(out, verify=False)
    except IndexFormatError:
        raise IndexFormatError(f"{out} holds files but is not a promptkit index (no valid {MANIFEST}); --force "
                               "replaces only an index directory, so remove it yourself or choose another "
                               "output path") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_index_dir(out: str | Path, kind: str, settings: dict[str, Any],
                    write: Callable[[Path], None], force: bool = False) -> Path:
    """Create index directory ``out``: ``write(tmpdir)`` writes the data files, then the manifest is added.

    ``force`` replaces an existing index directory, and nothing else (see :func:`check_replaceable`).
    """
    out = Path(out)
    check_replaceable(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        files = {p.relative_to(tmp).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {"format": FORMAT, "version": VERSION, "kind": kind, "settings": settings, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        check_replaceable(out, force)  # again: ``out`` may have changed while the data was written
        if out.exists():
            shutil.rmtree(out)
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; an index is as shareable as any directory
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_manifest(path: str | Path, kind: str | None = None, verify: bool = True) -> dict[str, Any]:
    """The manifest of index directory ``path``, after checking format, version, kind and file checksums."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise IndexFormatError(f"{path}: not an index directory (no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IndexFormatError(f"{mpath}: corrupted manifest ({e})") from None
    if not isinstance(manifest, dict):
        raise IndexFormatError(f"{mpath}: not a promptkit index manifest (a JSON {type(manifest).__name__}, "
                               "not an object)")
    if manifest.get("format") != FORMAT:
        raise IndexFormatError(f"{path}: not a promptkit index (format {manifest.get('format')!r})")
    if manifest.get("version") != VERSION:
        raise IndexFormatError(f"{path}: index format version {manifest.get('version')} but this promptkit "
                               f"reads version {VERSION}; rebuild the index")
    if kind is not None and manifest.get("kind") != kind:
        raise IndexFormatError(f"{path}: a {manifest.get('kind')!r} index, expected {kind!r}")
    if not isinstance(manifest.get("settings"), dict):
        raise IndexFormatError(f"{mpath}: corrupted manifest (no 'settings' object); rebuild the index")
    files = manifest.get("files")
    # Without the file list nothing would be checked, so a manifest must have one.
    if not isinstance(files, dict) or not files or not all(
            isinstance(info, dict) and type(info.get("bytes")) is int and isinstance(info.get("sha256"), str)
            for info in files.values()):
        raise IndexFormatError(f"{mpath}: corrupted manifest ('files' must list each data file's bytes and "
                               "sha256); rebuild the index")
    if verify:
        for name, info in files.items():
            f = path / name
            if not f.is_file():
                raise IndexFormatError(f"{path}: missing index file {name}")
            size = f.stat().st_size
            if size != info["bytes"]:
                raise IndexFormatError(f"{f}: truncated or altered ({size} bytes, expected {info['bytes']}); "
                                       "rebuild the index")
            if _sha256(f) != info["sha256"]:
                raise IndexFormatError(f"{f}: corrupted (checksum mismatch); rebuild the index")
    return manifest


@contextmanager
def manifest_settings(path: str | Path) -> Iterator[None]:
    """Report a missing or wrongly typed manifest setting, met while an index is rebuilt from
    its settings, as an :class:`IndexFormatError` (the manifest is not checksummed, so it may
    have been edited)."""
    try:
        yield
    except IndexFormatError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        what = f"missing setting {e}" if isinstance(e, KeyError) else str(e).splitlines()[0]
        raise IndexFormatError(f"{Path(path) / MANIFEST}: invalid settings ({what}); rebuild the index") from None


def write_docs(path: Path, docs: Iterable[Document]) -> None:
    """Documents as JSONL (id, text, metadata)."""
    with path.open("w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"id": d.id, "text": d.text, "metadata": d.metadata}, ensure_ascii=False) + "\n")


def read_docs(path: Path) -> list[Document]:
    with path.open(encoding="utf-8") as f:
        return [Document(**json.loads(line)) for line in f if line.strip()]
