"""Decodes the pgoutput logical replication protocol (version 1) into SourceEvents.

Reference: PostgreSQL docs, "Logical Replication Message Formats". The decoder keeps the
relation cache and the current transaction; every change gets a replay-stable Position
(commit LSN of its transaction, index inside it), so positions are unique and increase in
stream order even when transactions interleave in the WAL.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from struct import Struct

from domain.events import Column, Operation, Position, SchemaChange, SourceEvent, TableSchema
from domain.rows import decode_row

_BEGIN = Struct("!QqI")
_COMMIT = Struct("!BQQq")
_I32 = Struct("!I")
_I16 = Struct("!h")
_REL_COL = Struct("!Ii")
_MESSAGE = Struct("!BQ")

# pgoutput timestamps count microseconds from 2000-01-01; ours from 1970-01-01.
PG_EPOCH_OFFSET_US = 946_684_800_000_000


class ProtocolError(RuntimeError):
    pass


@dataclass(slots=True)
class RelationInfo:
    oid: int
    schema: TableSchema
    replica_identity: str
    type_modifiers: tuple[int, ...]


@dataclass(slots=True)
class CommitMarker:
    commit_lsn: int
    end_lsn: int
    commit_time_us: int


@dataclass(slots=True)
class LogicalMessage:
    transactional: bool
    lsn: int
    prefix: str
    content: bytes


def _cstring(buf: bytes, pos: int) -> tuple[str, int]:
    end = buf.index(0, pos)
    return buf[pos:end].decode(), end + 1


class PgOutputDecoder:
    """Stateful decoder: feed it the payload of each XLogData message in stream order."""

    def __init__(
        self,
        source_database: str,
        describe: Callable[[int, list[tuple[bool, str, int, int]]], list[tuple[str, bool]]]
        | None = None,
    ) -> None:
        """`describe(relation oid, columns)` returns (type name, is primary key) per column;
        without it type names stay empty and the replica identity flags mark the key."""
        self.source_database = source_database
        self.relations: dict[int, RelationInfo] = {}
        self._describe = describe
        self.in_transaction = False
        self._xid = 0
        self._commit_lsn = 0
        self._commit_time_us = 0
        self._seq = 0
        # Tables whose columns were added, dropped or retyped since they were last seen, in
        # stream order; the reader drains this list into SourceChunk.schema_changes.
        self.schema_changes: list[SchemaChange] = []

    def decode(self, data: bytes, out: list[SourceEvent]) -> CommitMarker | LogicalMessage | None:
        """Append any change in `data` to `out`; return a marker for commits and messages."""
        kind = data[0]
        # New and old tuples stay in their TupleData bytes (the wire encoding of
        # domain.rows): they are decoded only if something reads them (a backfill window,
        # a sink), not to be passed on. A message ends with its last tuple.
        if kind == 73:  # 'I'
            rel = self._relation(data, 1)
            if data[5] != 78:  # 'N'
                raise ProtocolError("insert without new tuple")
            out.append(self._event(Operation.CREATE, rel, None, None, None, data[6:]))
        elif kind == 85:  # 'U'
            rel = self._relation(data, 1)
            pos = 5
            before = None
            if data[pos] in (75, 79):  # 'K' key only, 'O' whole old row
                before, pos = decode_row(data, pos + 1)
            if data[pos] != 78:
                raise ProtocolError("update without new tuple")
            out.append(self._event(Operation.UPDATE, rel, before, None, None, data[pos + 1 :]))
        elif kind == 68:  # 'D'
            rel = self._relation(data, 1)
            out.append(self._event(Operation.DELETE, rel, None, None, data[6:], None))
        elif kind == 66:  # 'B'
            final_lsn, ts, xid = _BEGIN.unpack_from(data, 1)
            self.in_transaction = True
            self._commit_lsn = final_lsn
            self._commit_time_us = ts + PG_EPOCH_OFFSET_US
            self._xid = xid
            self._seq = 0
        elif kind == 67:  # 'C'
            _flags, commit_lsn, end_lsn, ts = _COMMIT.unpack_from(data, 1)
            self.in_transaction = False
            return CommitMarker(commit_lsn, end_lsn, ts + PG_EPOCH_OFFSET_US)
        elif kind == 82:  # 'R'
            self._on_relation(data)
        elif kind == 84:  # 'T'
            (count,) = _I32.unpack_from(data, 1)
            for i in range(count):
                (oid,) = _I32.unpack_from(data, 6 + 4 * i)
                out.append(self._event(Operation.TRUNCATE, self._known(oid), None, None))
        elif kind == 77:  # 'M'
            flags, lsn = _MESSAGE.unpack_from(data, 1)
            prefix, pos = _cstring(data, 10)
            (length,) = _I32.unpack_from(data, pos)
            content = data[pos + 4 : pos + 4 + length]
            return LogicalMessage(bool(flags & 1), lsn, prefix, content)
        elif kind in (79, 89):  # 'O' origin, 'Y' type: nothing to do
            pass
        else:
            raise ProtocolError(f"unsupported pgoutput message {chr(kind)!r}")
        return None

    def _event(
        self,
        op: Operation,
        rel: RelationInfo,
        before: tuple[str | None, ...] | None,
        after: tuple[str | None, ...] | None,
        before_wire: bytes | None = None,
        after_wire: bytes | None = None,
    ) -> SourceEvent:
        seq = self._seq
        self._seq = seq + 1
        return SourceEvent(
            op,
            rel.schema,
            Position(self._commit_lsn, seq),
            before,
            after,
            self._commit_time_us,
            self._xid,
            self.source_database,
            before_wire=before_wire,
            after_wire=after_wire,
        )

    def _relation(self, data: bytes, pos: int) -> RelationInfo:
        (oid,) = _I32.unpack_from(data, pos)
        return self._known(oid)

    def _known(self, oid: int) -> RelationInfo:
        try:
            return self.relations[oid]
        except KeyError:
            raise ProtocolError(f"change for relation {oid} before its Relation message") from None

    @staticmethod
    def parse_relation(data: bytes) -> tuple[int, str, str, str, list[tuple[bool, str, int, int]]]:
        """(oid, namespace, name, replica identity, [(is_key, name, type oid, typmod)])."""
        (oid,) = _I32.unpack_from(data, 1)
        namespace, pos = _cstring(data, 5)
        name, pos = _cstring(data, pos)
        replica_identity = chr(data[pos])
        (ncols,) = _I16.unpack_from(data, pos + 1)
        pos += 3
        raw: list[tuple[bool, str, int, int]] = []
        for _ in range(ncols):
            flags = data[pos]
            col_name, pos = _cstring(data, pos + 1)
            type_oid, typmod = _REL_COL.unpack_from(data, pos)
            pos += 8
            raw.append((bool(flags & 1), col_name, type_oid, typmod))
        return oid, namespace, name, replica_identity, raw

    def _on_relation(self, data: bytes) -> None:
        oid, namespace, name, replica_identity, raw = self.parse_relation(data)
        described = self._describe(oid, raw) if self._describe else [("", k) for k, *_ in raw]
        schema = TableSchema(
            schema=namespace or "pg_catalog",
            table=name,
            columns=tuple(
                Column(col_name, type_oid, type_name, is_key)
                for (_, col_name, type_oid, _), (type_name, is_key) in zip(
                    raw, described, strict=True
                )
            ),
        )
        info = RelationInfo(oid, schema, replica_identity, tuple(m for *_, m in raw))
        previous = self.relations.get(oid)
        if previous == info:  # resent per session and after cache invalidations
            return
        self.relations[oid] = info
        if previous is None:  # the first sighting in this process is not a change
            return
        change = SchemaChange(previous.schema, schema)
        # A new typmod (varchar(10) -> varchar(20)), key or replica identity only refreshes
        # the cache: it is not a change of the columns' names or types.
        if change.is_change:
            self.schema_changes.append(change)
