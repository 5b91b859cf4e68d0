"""adapters.postgres.sink.copy_text: COPY text built from whole columns escapes like psycopg's
write_row and writes NULL as \\N."""

from __future__ import annotations

import pyarrow as pa

from adapters.postgres.sink.copy_text import copy_buffer, copy_escape


def test_copy_text_escapes_and_marks_null() -> None:
    values = pa.array(["plain", "tab\there", "back\\slash", "new\nline\r", None, ""])
    keys = pa.array(["1", "2", "3", "4", "5", "6"])
    text = bytes(copy_buffer([keys, copy_escape(values)]))
    assert text == (b"1\tplain\n2\ttab\\there\n3\tback\\\\slash\n4\tnew\\nline\\r\n5\t\\N\n6\t\n")


def test_copy_text_of_a_slice_and_of_nothing() -> None:
    column = pa.array(["a", "b", "c"]).slice(1)
    assert bytes(copy_buffer([column])) == b"b\nc\n"
    assert bytes(copy_buffer([pa.array([], pa.string())])) == b""
    assert bytes(copy_buffer([pa.nulls(2, pa.string())])) == b"\\N\n\\N\n"
