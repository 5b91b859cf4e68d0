"""The row encoding shared by every stage: PostgreSQL text values in pgoutput's TupleData layout.

Layout: Int16 column count, then per column b"n" (NULL), b"u" (unchanged TOASTed value,
see events.UNCHANGED) or b"t" + Int32 length + UTF-8 text. It is what the WAL reader
receives, what crosses the wire, and what a sink decodes, so no stage invents another.
"""

from __future__ import annotations

from struct import Struct
from struct import error as StructError

from domain.events import UNCHANGED, TextRow

_I16 = Struct("!h")
_I32 = Struct("!i")
_U32 = Struct("!I")
_NULL = b"n"
_UNCHANGED = b"u"


class RowFormatError(ValueError):
    pass


def encode_row(row: TextRow) -> bytes:
    parts = [_I16.pack(len(row))]
    append = parts.append
    pack = _I32.pack
    for value in row:
        if value is None:
            append(_NULL)
        elif value is UNCHANGED:
            append(_UNCHANGED)
        else:
            data = value.encode()
            append(b"t" + pack(len(data)) + data)
    return b"".join(parts)


def decode_row(buf: bytes | memoryview, offset: int = 0) -> tuple[TextRow, int]:
    """Decode one row starting at `offset`; returns the row and the offset after it."""
    if type(buf) is not bytes:
        buf = bytes(buf)
    try:
        (count,) = _I16.unpack_from(buf, offset)
        if count < 0:
            raise RowFormatError(f"negative column count {count}")
        pos = offset + 2
        values: list[str | None] = []
        append = values.append
        unpack = _U32.unpack_from
        for _ in range(count):
            kind = buf[pos]
            if kind == 116:  # 't'
                # Unsigned: a negative length reads as > 2 GiB and runs past the end.
                start = pos + 5
                pos = start + unpack(buf, pos + 1)[0]
                append(buf[start:pos].decode())
            elif kind == 110:  # 'n'
                pos += 1
                append(None)
            elif kind == 117:  # 'u'
                pos += 1
                append(UNCHANGED)
            elif kind == 98:  # 'b' binary values are never requested
                raise RowFormatError("binary tuple values are not supported")
            else:
                raise RowFormatError(f"unknown column kind {kind!r} at byte {pos}")
        # Positions only grow, and a value cut short by the end of `buf` leaves `pos` past
        # it, so one check at the end catches every value that ran past the end.
        if pos > len(buf):
            raise RowFormatError("value runs past the end of the row")
        return tuple(values), pos
    except (IndexError, UnicodeDecodeError) as exc:
        raise RowFormatError(f"malformed row: {exc}") from exc
    except Exception as exc:
        if isinstance(exc, RowFormatError):
            raise
        raise RowFormatError(f"malformed row: {exc}") from exc


def decode_columns(
    rows: list[bytes], ncols: int
) -> tuple[list[list[str | None]], list[list[int] | None] | None]:
    """Decode many rows of `ncols` columns straight into columns (the bulk form of
    `decode_row`, for building blocks): per column a list of values (None for NULL and for
    an unchanged TOASTed value), and per row the columns that were unchanged (None when no
    row had one)."""
    columns: list[list[str | None]] = [[] for _ in range(ncols)]
    appends = [c.append for c in columns]
    unchanged: list[list[int] | None] | None = None
    unpack = _U32.unpack_from
    count_of = _I16.unpack_from
    for r, buf in enumerate(rows):
        try:
            if (buf[0] << 8 | buf[1]) != ncols:
                raise RowFormatError(
                    f"row has {count_of(buf, 0)[0]} values but the table has {ncols} columns"
                )
            pos = 2
            for append in appends:
                kind = buf[pos]
                if kind == 116:  # 't'
                    start = pos + 5
                    pos = start + unpack(buf, pos + 1)[0]
                    append(buf[start:pos].decode())
                elif kind == 110:  # 'n'
                    pos += 1
                    append(None)
                elif kind == 117:  # 'u'
                    pos += 1
                    append(None)
                    if unchanged is None:
                        unchanged = [None] * len(rows)
                    i = appends.index(append)
                    missing = unchanged[r]
                    if missing is None:
                        unchanged[r] = [i]
                    else:
                        missing.append(i)
                else:
                    raise RowFormatError(f"unsupported column kind {kind!r} at byte {pos}")
            if pos > len(buf):
                raise RowFormatError("value runs past the end of the row")
        except (IndexError, UnicodeDecodeError, StructError) as exc:
            raise RowFormatError(f"malformed row: {exc}") from exc
    return columns, unchanged
