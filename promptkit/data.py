"""Loading datasets of examples from JSONL and CSV files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .types import Example


class DataError(ValueError):
    """A dataset file that cannot be read."""


def read_text(path: str | Path) -> str:
    """Read a UTF-8 file with an error that names the file and the offending byte."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 (byte {e.object[e.start]:#x} at offset {e.start}); "
                        "convert it, e.g. with iconv -t utf-8") from None


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """``(line number, object)`` for every non-blank line of a UTF-8 JSONL file."""
    path = Path(path)
    rows = []
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n}: each line must be a JSON object")
        rows.append((n, row))
    return rows


def load_examples(path: str | Path, output_key: str = "answer") -> list[Example]:
    """Load examples from a ``.jsonl`` (one object a line) or ``.csv`` (header row) file."""
    path = Path(path)
    if path.suffix == ".csv":
        rows = list(csv.DictReader(read_text(path).splitlines()))
    else:
        rows = [row for _, row in read_jsonl(path)]
    if not rows:
        raise DataError(f"{path} holds no examples")
    missing = [i for i, r in enumerate(rows, 1) if output_key not in r]
    if len(missing) == len(rows):
        raise DataError(f"{path}: no example has the output field {output_key!r}; fields: {sorted(rows[0])}")
    return [Example(output_key=output_key, **r) for r in rows]
