"""COPY text format built from whole Arrow columns: the PostgreSQL sink's columnar path.

Escaping and joining run in Arrow (pyarrow.compute), one buffer per block, instead of a
`write_row` per row in Python.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc

_COPY_SPECIAL = r"[\\\t\n\r]"


def copy_escape(column: pa.Array) -> pa.Array:
    """A text column in COPY text format (backslash, tab, newline, carriage return escaped;
    NULL is written by `copy_buffer`)."""
    if column.type != pa.string():
        column = pc.cast(column, pa.string())
    if not pc.any(pc.match_substring_regex(column, _COPY_SPECIAL)).as_py():
        return column
    for char, escaped in (("\\", "\\\\"), ("\t", "\\t"), ("\n", "\\n"), ("\r", "\\r")):
        column = pc.replace_substring(column, char, escaped)
    return column


def copy_buffer(columns: Sequence[pa.Array]) -> memoryview:
    """The COPY text of rows given as escaped text columns: one buffer, built in Arrow."""
    lines = pc.binary_join_element_wise(
        *columns, "\t", null_handling="replace", null_replacement="\\N"
    )
    lines = pc.binary_join_element_wise(lines, "", "\n")
    offsets = lines.buffers()[1]
    data = lines.buffers()[2]
    if data is None:
        return memoryview(b"")
    ends = memoryview(offsets).cast("i")
    start, end = ends[lines.offset], ends[lines.offset + len(lines)]
    return memoryview(data)[start:end]
