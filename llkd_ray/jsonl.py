"""JSON Lines read line by line: a bad line is a rejected row, not a failed read.

Ray Data's JSON reader (pandas ``read_json(lines=True)``) decodes and parses a whole chunk at
once: one byte that is not UTF-8, or one line that is not JSON, anywhere in a file fails its read
task and, after the retries, the whole labeling job. :class:`JsonLinesDatasource` parses each line
alone; a line it cannot use still becomes a row, whose :data:`READ_ERROR` column says why
(``invalid_utf8``, ``invalid_json``), and the corpus reader rejects it with that reason. Blank lines
are skipped and not counted, as pandas did, so the row ids made from a file's positions are the
same as before.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pandas as pd
import pyarrow as pa

from llkd_ray.compat import PandasJSONDatasource

#: The column naming why a line could not be read (None for a good line); never a corpus column.
READ_ERROR = "_read_error"
#: The reasons :func:`parse_line` gives, in the order they are checked.
READ_ERRORS = ("invalid_utf8", "invalid_json")
#: Bytes of input per block the reader yields (the labeling stage repartitions them later).
_BLOCK_BYTES = 16 << 20
_CHUNK_BYTES = 1 << 20


def parse_line(line: bytes) -> tuple[dict[str, Any], str | None]:
    """One line's fields and its read error (None when good).

    A line that is not UTF-8 is decoded with replacement characters, so that its id (and a text to
    look at) survive into the rejected row; a line that is not a JSON object keeps no field.
    """
    error = None
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        text, error = line.decode("utf-8", errors="replace"), "invalid_utf8"
    try:
        value = json.loads(text)
    except ValueError:
        return {}, error or "invalid_json"
    if not isinstance(value, dict):
        return {}, error or "invalid_json"
    return value, error


def iter_lines(stream: Any, chunk_bytes: int = _CHUNK_BYTES) -> Iterator[bytes]:
    """The non-blank lines of a binary stream (without their line ends)."""
    rest = b""
    while chunk := stream.read(chunk_bytes):
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        yield from (line for line in lines if line.strip())
    if rest.strip():
        yield rest


def lines_to_frame(records: list[dict[str, Any]], errors: list[str | None]) -> pd.DataFrame:
    """A block of parsed lines: their fields as they came (object columns: no type guessing across
    rows) plus :data:`READ_ERROR`."""
    frame = pd.DataFrame.from_records(records, index=range(len(records))).astype(object)
    frame[READ_ERROR] = pd.Series(errors, dtype=object, index=frame.index)
    return frame


class JsonLinesDatasource(PandasJSONDatasource):
    """Ray Data's JSON datasource (its file opening and decompression) with a line-by-line parse."""

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pd.DataFrame]:
        records: list[dict[str, Any]] = []
        errors: list[str | None] = []
        size = 0
        for line in iter_lines(f):
            record, error = parse_line(line)
            records.append(record)
            errors.append(error)
            size += len(line)
            if size >= _BLOCK_BYTES:
                yield lines_to_frame(records, errors)
                records, errors, size = [], [], 0
        if records:
            yield lines_to_frame(records, errors)
