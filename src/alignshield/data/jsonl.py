"""Read JSONL and CSV rows with errors that name the file, the line and the field."""

from __future__ import annotations

import csv
import json
from pathlib import Path


class DataError(ValueError):
    """Bad input data; the message says where (file:line) and what (field)."""


def read_rows(path: str | Path, required: tuple[str, ...] = ()) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such data file")
    rows = _read_csv(path) if path.suffix.lower() == ".csv" else _read_jsonl(path)
    return check_rows(rows, required, str(path), ":")


def check_rows(rows: list[tuple[int, dict]], required: tuple[str, ...], where: str, sep: str) -> list[dict]:
    """The rows, once every one has each ``required`` field as text; errors name ``where``, the line
    (or row) number and the field."""
    for line, row in rows:
        for field in required:
            if field not in row:
                raise DataError(f"{where}{sep}{line}: missing field {field!r} (has: {', '.join(row) or 'nothing'})")
            if not isinstance(row[field], (str, int, float)):
                raise DataError(f"{where}{sep}{line}: field {field!r} must be text, got {type(row[field]).__name__}")
    if not rows:
        raise DataError(f"{where}: the data file is empty")
    return [row for _, row in rows]


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    rows = []
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{line_no}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_no}: malformed JSON: {err.msg} (column {err.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
            rows.append((line_no, row))
    return rows


def _read_csv(path: Path) -> list[tuple[int, dict]]:
    try:
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            return [(reader.line_num, dict(row)) for row in reader]
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
    except csv.Error as err:
        raise DataError(f"{path}: malformed CSV: {err}") from None
