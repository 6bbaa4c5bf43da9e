"""Reading a dataset file (torch-free): a JSONL or CSV file beside the spec, streamed line by
line in binary under byte limits and parsed strictly, with the sha256 of its raw bytes.

Only a regular file is read: a folder, a FIFO, a device or a socket is refused from ``os.stat``
before anything is opened, and the file is opened without blocking, so a FIFO swapped in
meanwhile cannot hang the read. A file over its byte limit is refused before it is read, and a
line over its limit before it is decoded or parsed (no line is ever held whole past the limit).

A JSONL row is one JSON object of plain values (strings, numbers, true, false, null) with no
key given twice and no lone UTF-16 surrogate (``"\\ud800"``); a CSV file has a header of
distinct names, the same number of fields in every row, quotes that close and fields under
the character limit. Every problem is a :class:`DatasetFileError` that names the line.
Rows given inline in a spec get their digest (:func:`rows_sha256`) and the surrogate check
(:func:`lone_surrogate_in`) here too.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import stat
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

__all__ = [
    "SURROGATE_HINT",
    "DatasetFile",
    "DatasetFileError",
    "Limits",
    "lone_surrogate",
    "lone_surrogate_in",
    "read_dataset_file",
    "rows_sha256",
]

_BOM = b"\xef\xbb\xbf"
_SURROGATE = re.compile("[\ud800-\udfff]")
_PLAIN = (str, int, float, bool, type(None))
_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)
_LONG_HINT = "shorten the value; a quote left open makes the rest of the file one field"
SURROGATE_HINT = "write the character itself, or both halves of a pair such as \\ud83d\\ude00"
_QUOTE_HINT = 'quote a field that holds commas, quotes or line breaks: "a, ""b"""'


@dataclass(frozen=True)
class Limits:
    """What one dataset file may hold."""

    file_bytes: int
    line_bytes: int
    field_chars: int
    #: rows read at most: reading stops after one more (the caller reports it)
    rows: int


@dataclass(frozen=True)
class DatasetFile:
    """A dataset file's rows, the line each row starts on, and the sha256 of its bytes."""

    rows: list[dict[str, Any]]
    #: the line (from 1) each row starts on
    lines: array
    sha256: str


class DatasetFileError(Exception):
    """A file that cannot be read as a dataset: ``line`` (None: the whole file) and a message
    that follows the file's name (``"line 3: not valid JSON ..."``, ``"is a folder ..."``)."""

    def __init__(self, message: str, hint: str | None = None, line: int | None = None):
        super().__init__(message)
        self.message, self.hint, self.line = message, hint, line


def lone_surrogate(text: str) -> str | None:
    """The first lone UTF-16 surrogate in ``text``, as ``\\ud800`` (None: there is none)."""
    if text.isascii():
        return None
    found = _SURROGATE.search(text)
    return None if found is None else f"\\u{ord(found.group(0)):04x}"


def lone_surrogate_in(rows: list[dict[str, Any]]) -> tuple[int, str, str] | None:
    """The first lone surrogate in rows (inline in a spec): its row index, column, and the
    surrogate as ``\\ud800`` (None: there is none)."""
    for index, row in enumerate(rows):
        for key, value in row.items():
            found = lone_surrogate(key) or (
                lone_surrogate(value) if isinstance(value, str) else None
            )
            if found is not None:
                return index, key, found
    return None


def rows_sha256(rows: list[dict[str, Any]], chunk: int = 1000) -> str:
    """The sha256 of ``json.dumps(rows, sort_keys=True, ensure_ascii=False)`` in UTF-8 (inline
    rows), encoded ``chunk`` rows at a time (100k rows are never one string)."""
    digest = hashlib.sha256(b"[")
    for start in range(0, len(rows), chunk):
        text = json.dumps(rows[start : start + chunk], sort_keys=True, ensure_ascii=False)
        digest.update((", " if start else "").encode() + text[1:-1].encode("utf-8"))
    digest.update(b"]")
    return digest.hexdigest()


def read_dataset_file(path: str, limits: Limits) -> DatasetFile:
    """The rows of a JSONL file (a CSV file when ``path`` ends in ``.csv``). Raises OSError
    when the file cannot be opened and :class:`DatasetFileError` when it is no dataset."""
    with _open_regular(path, limits.file_bytes) as handle:
        lines = _Lines(handle, limits)
        reader = _read_csv if path.lower().endswith(".csv") else _read_jsonl
        rows, starts = reader(lines, limits)
        return DatasetFile(rows, starts, lines.digest.hexdigest())


def _open_regular(path: str, max_bytes: int) -> BinaryIO:
    """The file opened for reading, after checking (before and after opening) that it is a
    regular file within the size limit."""
    _check_regular(os.stat(path), max_bytes)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        _check_regular(os.fstat(fd), max_bytes)  # the path may name another file by now
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def _check_regular(info: os.stat_result, max_bytes: int) -> None:
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _KINDS if test(info.st_mode)), "not a file")
        raise DatasetFileError(
            f"is {kind}, not a regular file",
            "give a .jsonl or .csv file; save what a pipe or device gives to a file first",
        )
    if info.st_size > max_bytes:
        raise DatasetFileError(
            f"is {info.st_size:,} bytes; a dataset file may have at most {max_bytes:,}",
            "split the file, or keep only the rows the experiment uses",
        )


class _Lines:
    """The lines of a file as bytes (a BOM dropped from the first), each checked against the
    line limit before it is handed on; the sha256 of every byte read, and the line number."""

    def __init__(self, handle: BinaryIO, limits: Limits):
        self.handle, self.limits = handle, limits
        self.digest = hashlib.sha256()
        self.number = 0
        self.size = 0

    def __iter__(self) -> Iterator[bytes]:
        most = self.limits.line_bytes
        while line := self.handle.readline(most + 1):
            self.number += 1
            self.size += len(line)
            self.digest.update(line)
            if len(line) > most and not line.endswith(b"\n"):
                raise DatasetFileError(
                    f"line {self.number} is over {most:,} bytes, the most one line may have",
                    "one row a line: shorten its values, or check that this is a dataset file",
                    self.number,
                )
            if self.size > self.limits.file_bytes:  # it grew while read
                raise DatasetFileError(
                    f"is over {self.limits.file_bytes:,} bytes, the most a dataset file may have",
                    "split the file, or keep only the rows the experiment uses",
                )
            yield line[len(_BOM) :] if self.number == 1 and line.startswith(_BOM) else line

    def text(self, line: bytes) -> str:
        """A line decoded (a located error when it is not UTF-8)."""
        try:
            return line.decode("utf-8")
        except UnicodeDecodeError:
            raise DatasetFileError(
                f"line {self.number} is not UTF-8", "save it as UTF-8", self.number
            ) from None


# --------------------------------------------------------------------------- JSONL


def _read_jsonl(lines: _Lines, limits: Limits) -> tuple[list[dict[str, Any]], array]:
    rows: list[dict[str, Any]] = []
    starts = array("q")
    for line in lines:
        if not line.strip():
            continue
        rows.append(_json_row(lines.text(line), lines.number))
        starts.append(lines.number)
        if len(rows) > limits.rows:
            break
    return rows, starts


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    row = dict(pairs)
    if len(row) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return row


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _json_row(text: str, number: int) -> dict[str, Any]:
    """One JSONL line as a row of plain values."""
    plain = "one JSON object a line, of plain values: strings, numbers, true, false, null"
    try:
        row = json.loads(text, parse_constant=_no_constant, object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise DatasetFileError(
            f"line {number}: key '{exc.key}' appears twice in one object",
            "give each column once in a row",
            number,
        ) from None
    except RecursionError:
        message = f"line {number}: lists or objects nested too deeply"
        raise DatasetFileError(message, plain, number) from None
    except ValueError as exc:
        message = f"line {number}: not valid JSON ({exc})"
        raise DatasetFileError(message, "one JSON object a line", number) from None
    if not isinstance(row, dict):
        hint = 'one JSON object a line, {"col": ...}'
        raise DatasetFileError(f"line {number}: not a JSON object", hint, number)
    for key, value in row.items():
        if not isinstance(value, _PLAIN):
            message = f"line {number}: column '{key}' holds a list or object"
            raise DatasetFileError(message, "use plain values", number)
    if "\\u" in text:  # only an escape makes a surrogate
        _no_surrogates(row, number)
    return row


def _no_surrogates(row: dict[str, Any], number: int) -> None:
    for key, value in row.items():
        for text, what in ((key, "the name of a column"), (value, f"column '{key}'")):
            found = lone_surrogate(text) if isinstance(text, str) else None
            if found is not None:
                raise DatasetFileError(
                    f"line {number}: {what} holds a lone surrogate {found}; text must be "
                    "whole Unicode characters",
                    SURROGATE_HINT,
                    number,
                )


# --------------------------------------------------------------------------- CSV


def _read_csv(lines: _Lines, limits: Limits) -> tuple[list[dict[str, Any]], array]:
    reader = csv.reader((lines.text(line) for line in lines), strict=True)
    header = _csv_header(reader, lines, limits)
    rows: list[dict[str, Any]] = []
    starts = array("q")
    while True:
        start = lines.number + 1  # the reader reads no line ahead of the row it gives
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise _csv_error(exc, start, lines.number, limits) from None
        if not fields:  # a blank line
            continue
        _check_fields(fields, header, start, lines.number, limits)
        rows.append(dict(zip(header, fields)))
        starts.append(start)
        if len(rows) > limits.rows:
            break
    return rows, starts


def _csv_header(reader: Any, lines: _Lines, limits: Limits) -> list[str]:
    try:
        header = next(reader, [])
    except csv.Error as exc:
        raise _csv_error(exc, 1, lines.number, limits) from None
    if not header:
        hint = "start the file with the column names"
        raise DatasetFileError(f"line {max(lines.number, 1)}: no header line", hint, 1)
    _check_fields(header, header, 1, lines.number, limits)
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise DatasetFileError(
                f"line 1: the header names column '{name}' twice",
                "give each column a name of its own",
                1,
            )
        seen.add(name)
    return header


def _spans(start: int, end: int) -> str:
    """``" (the row runs from line 2 to line 9: is a quote not closed?)"`` for a row over
    several lines."""
    if end <= start:
        return ""
    return f" (the row runs from line {start} to line {end}: is a quote not closed?)"


def _check_fields(
    fields: list[str], header: list[str], start: int, end: int, limits: Limits
) -> None:
    for index, value in enumerate(fields):
        if len(value) > limits.field_chars:
            name = f"column '{header[index]}'" if index < len(header) else f"field {index + 1}"
            raise DatasetFileError(
                f"line {start}: {name} holds {len(value):,} characters; a field may have at "
                f"most {limits.field_chars:,}" + _spans(start, end),
                _LONG_HINT,
                start,
            )
    if len(fields) != len(header):
        more = "more" if len(fields) > len(header) else "fewer"
        raise DatasetFileError(
            f"line {start}: {more} fields than the header names ({len(fields)}; the header "
            f"has {len(header)})" + _spans(start, end),
            _QUOTE_HINT
            if more == "more"
            else "give every column a value; an empty one is written a,,c",
            start,
        )


def _csv_error(exc: csv.Error, start: int, end: int, limits: Limits) -> DatasetFileError:
    """A located error for what the csv module refused in the row that starts on ``start``."""
    text = str(exc)
    if text.startswith("field larger than field limit"):
        most = min(limits.field_chars, csv.field_size_limit())
        message = f"line {start}: a field is over {most:,} characters"
        return DatasetFileError(message + _spans(start, end), _LONG_HINT, start)
    if text.startswith("unexpected end of data"):
        return DatasetFileError(
            f"line {start}: a quote opened in this row is never closed: the rest of the file "
            "would be one field",
            'close the quote; write a quote inside a quoted field as two: ""',
            start,
        )
    if text.startswith("new-line character seen in unquoted field"):
        message = f"line {end}: a carriage return (\\r) ends a line or sits inside a field"
        hint = "save the file with \\n or \\r\\n line endings, and quote a field that holds one"
        return DatasetFileError(message, hint, end)
    return DatasetFileError(f"line {end}: {text}" + _spans(start, end), _QUOTE_HINT, end)
