"""Loading datasets of examples from JSONL and CSV files."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from .types import Example


class DataError(ValueError):
    """A dataset file that cannot be read."""


def read_text(path: str | Path) -> str:
    """Read a UTF-8 file (less any byte-order mark) with an error that names the file and the offending byte."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8-sig")  # a leading byte-order mark is no part of the text
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


def read_csv(path: str | Path) -> list[tuple[int, dict[str, str]]]:
    """``(line number, row)`` for every non-blank row of a UTF-8 CSV file with a header row.

    Quoted fields may span lines (a row's number is the line it starts on); a row whose
    field count differs from the header's is an error, not a row padded or cut to fit.
    """
    path = Path(path)
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    rows: list[tuple[int, dict[str, str]]] = []
    try:
        header = next(reader, None)
        if header is None:
            return rows
        dup = sorted({h for h in header if header.count(h) > 1})
        if dup:
            raise DataError(f"{path}:1: duplicate column names {dup}")
        start = reader.line_num + 1
        for values in reader:
            if values:  # a blank line
                if len(values) != len(header):
                    raise DataError(f"{path}:{start}: {len(values)} fields but the header has {len(header)} "
                                    "(a stray comma, or a quote left open?)")
                rows.append((start, dict(zip(header, values))))
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
    return rows


def load_examples(path: str | Path, output_key: str = "answer") -> list[Example]:
    """Load examples from a ``.jsonl`` (one object a line) or ``.csv`` (header row) file.

    Every example must have the gold field ``output_key``: a row without it would be scored as wrong.
    """
    path = Path(path)
    rows = read_csv(path) if path.suffix == ".csv" else read_jsonl(path)
    if not rows:
        raise DataError(f"{path} holds no examples")
    missing = [n for n, r in rows if output_key not in r]
    if len(missing) == len(rows):
        raise DataError(f"{path}: no example has the output field {output_key!r}; fields: {sorted(rows[0][1])}")
    if missing:
        lines = ", ".join(map(str, missing[:10])) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise DataError(f"{path}: {len(missing)} of {len(rows)} examples have no output field {output_key!r} "
                        f"(line{'s' if len(missing) > 1 else ''} {lines}); give every example its gold output")
    return [Example(output_key=output_key, **r) for _, r in rows]
