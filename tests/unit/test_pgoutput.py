"""adapters.postgres.source.pgoutput: pgoutput protocol v1 messages built by hand, byte by byte.

Layouts follow the PostgreSQL docs, "Logical Replication Message Formats" (protocol
version 1, no streaming). Tuple data is built here independently of domain.rows.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest

from adapters.postgres.source.pgoutput import (
    PG_EPOCH_OFFSET_US,
    CommitMarker,
    LogicalMessage,
    PgOutputDecoder,
    ProtocolError,
)
from domain.events import (
    UNCHANGED,
    Column,
    Operation,
    Position,
    SchemaChange,
    SourceEvent,
    TableSchema,
)

# --- message builders ------------------------------------------------------------------------

INT4, INT8, TEXT, VARCHAR, NUMERIC = 23, 20, 25, 1043, 1700
_U = object()  # "unchanged toasted value" in tuple specs below


def cstr(s: str) -> bytes:
    return s.encode() + b"\x00"


def tupledata(values: Sequence[object]) -> bytes:
    out = struct.pack("!h", len(values))
    for v in values:
        if v is None:
            out += b"n"
        elif v is _U:
            out += b"u"
        else:
            raw = str(v).encode()
            out += b"t" + struct.pack("!i", len(raw)) + raw
    return out


def begin(final_lsn: int, ts: int, xid: int) -> bytes:
    return b"B" + struct.pack("!QqI", final_lsn, ts, xid)


def commit(commit_lsn: int, end_lsn: int, ts: int, flags: int = 0) -> bytes:
    return b"C" + struct.pack("!BQQq", flags, commit_lsn, end_lsn, ts)


def relation(
    oid: int,
    namespace: str,
    name: str,
    columns: Sequence[tuple[int, str, int, int]],
    replica_identity: bytes = b"d",
) -> bytes:
    out = b"R" + struct.pack("!I", oid) + cstr(namespace) + cstr(name) + replica_identity
    out += struct.pack("!h", len(columns))
    for flags, col, type_oid, typmod in columns:
        out += struct.pack("!B", flags) + cstr(col) + struct.pack("!Ii", type_oid, typmod)
    return out


def insert(oid: int, new: Sequence[object]) -> bytes:
    return b"I" + struct.pack("!I", oid) + b"N" + tupledata(new)


def update(
    oid: int, new: Sequence[object], old: Sequence[object] | None = None, kind: bytes = b"K"
) -> bytes:
    out = b"U" + struct.pack("!I", oid)
    if old is not None:
        out += kind + tupledata(old)
    return out + b"N" + tupledata(new)


def delete(oid: int, old: Sequence[object], kind: bytes = b"K") -> bytes:
    return b"D" + struct.pack("!I", oid) + kind + tupledata(old)


def truncate(oids: Sequence[int], options: int = 0) -> bytes:
    return (
        b"T" + struct.pack("!IB", len(oids), options) + b"".join(struct.pack("!I", o) for o in oids)
    )


def message(prefix: str, content: bytes, lsn: int, transactional: bool) -> bytes:
    return (
        b"M"
        + struct.pack("!BQ", 1 if transactional else 0, lsn)
        + cstr(prefix)
        + struct.pack("!I", len(content))
        + content
    )


def origin(lsn: int, name: str) -> bytes:
    return b"O" + struct.pack("!Q", lsn) + cstr(name)


def type_msg(oid: int, namespace: str, name: str) -> bytes:
    return b"Y" + struct.pack("!I", oid) + cstr(namespace) + cstr(name)


ORDERS_OID = 16384
ITEMS_OID = 16390
ORDERS_COLS = [(1, "id", INT8, -1), (0, "note", TEXT, -1), (0, "total", NUMERIC, 655366)]
ITEMS_COLS = [(1, "order_id", INT8, -1), (1, "sku", VARCHAR, 36), (0, "qty", INT4, -1)]

# 2024-05-06 07:08:09.123456 UTC in pgoutput's microseconds since 2000-01-01.
TS_UNIX_US = int(datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC).timestamp()) * 1_000_000 + 123456
TS_PG_US = TS_UNIX_US - 946_684_800_000_000


def feed(decoder: PgOutputDecoder, *messages: bytes) -> tuple[list[SourceEvent], list[object]]:
    events: list[SourceEvent] = []
    markers: list[object] = []
    for m in messages:
        marker = decoder.decode(m, events)
        if marker is not None:
            markers.append(marker)
    return events, markers


def ready_decoder(**kwargs: object) -> PgOutputDecoder:
    decoder = PgOutputDecoder("shop", **kwargs)  # type: ignore[arg-type]
    feed(
        decoder,
        relation(ORDERS_OID, "public", "orders", ORDERS_COLS),
        relation(ITEMS_OID, "sales", "items", ITEMS_COLS, b"f"),
    )
    return decoder


# --- tests ---------------------------------------------------------------------------------


def test_epoch_offset_is_2000_01_01() -> None:
    assert datetime(2000, 1, 1, tzinfo=UTC).timestamp() * 1_000_000 == PG_EPOCH_OFFSET_US


def test_full_transaction() -> None:
    decoder = ready_decoder()
    lsn = 0x1_6B37_4D48
    events, markers = feed(
        decoder,
        begin(lsn, TS_PG_US, 777),
        insert(ORDERS_OID, [1, "first", "9.99"]),
        update(ORDERS_OID, [1, "second", "10.00"]),
        update(ORDERS_OID, [2, _U, "1"], old=[1, None, None], kind=b"K"),
        update(ITEMS_OID, [1, "A-1", 3], old=[1, "A-1", 2], kind=b"O"),
        delete(ORDERS_OID, [2, None, None], kind=b"K"),
        delete(ITEMS_OID, [1, "A-1", 3], kind=b"O"),
        truncate([ORDERS_OID, ITEMS_OID]),
        commit(lsn, lsn + 0x30, TS_PG_US + 5),
    )

    assert [e.operation for e in events] == [
        Operation.CREATE,
        Operation.UPDATE,
        Operation.UPDATE,
        Operation.UPDATE,
        Operation.DELETE,
        Operation.DELETE,
        Operation.TRUNCATE,
        Operation.TRUNCATE,
    ]
    assert [e.position for e in events] == [Position(lsn, i) for i in range(8)]
    assert [e.table.qualified_name for e in events] == [
        "public.orders",
        "public.orders",
        "public.orders",
        "sales.items",
        "public.orders",
        "sales.items",
        "public.orders",
        "sales.items",
    ]

    ins, upd, upd_key, upd_old, del_key, del_old, tr1, tr2 = events
    assert (ins.before, ins.after) == (None, ("1", "first", "9.99"))
    assert (upd.before, upd.after) == (None, ("1", "second", "10.00"))
    assert upd_key.before == ("1", None, None)
    assert upd_key.after == ("2", UNCHANGED, "1")
    assert upd_key.after is not None and upd_key.after[1] is UNCHANGED
    assert upd_key.key == {"id": "2"}
    assert (upd_old.before, upd_old.after) == (("1", "A-1", "2"), ("1", "A-1", "3"))
    assert (del_key.before, del_key.after) == (("2", None, None), None)
    assert del_key.key == {"id": "2"}
    assert (del_old.before, del_old.after) == (("1", "A-1", "3"), None)
    assert del_old.key == {"order_id": "1", "sku": "A-1"}
    assert (tr1.before, tr1.after, tr2.before, tr2.after) == (None, None, None, None)

    for e in events:
        assert e.commit_time_us == TS_UNIX_US
        assert e.transaction_id == 777
        assert e.source_database == "shop"

    assert markers == [CommitMarker(lsn, lsn + 0x30, TS_UNIX_US + 5)]


def test_in_transaction_flag() -> None:
    decoder = ready_decoder()
    assert decoder.in_transaction is False
    feed(decoder, begin(100, TS_PG_US, 1))
    assert decoder.in_transaction is True
    feed(decoder, insert(ORDERS_OID, [1, "a", "1"]))
    assert decoder.in_transaction is True
    _, markers = feed(decoder, commit(100, 120, TS_PG_US))
    assert decoder.in_transaction is False
    assert isinstance(markers[0], CommitMarker)


def test_positions_unique_and_increasing_across_transactions() -> None:
    decoder = ready_decoder()
    messages: list[bytes] = []
    lsn = 0x100
    for xid, size in enumerate([3, 1, 0, 5, 2], start=500):
        lsn += 0x1000
        messages.append(begin(lsn, TS_PG_US + xid, xid))
        messages.extend(insert(ORDERS_OID, [i, "n", "1"]) for i in range(size))
        messages.append(commit(lsn, lsn + 8, TS_PG_US + xid))
    events, markers = feed(decoder, *messages)

    positions = [e.position for e in events]
    assert len(positions) == 11
    assert len(set(positions)) == len(positions)
    assert all(a < b for a, b in itertools.pairwise(positions))
    # The minor index restarts at 0 in every transaction.
    assert [p.minor for p in positions] == [0, 1, 2, 0, 0, 1, 2, 3, 4, 0, 1]
    assert [p.major for p in positions] == [0x1100] * 3 + [0x2100] + [0x4100] * 5 + [0x5100] * 2
    assert [e.transaction_id for e in events] == [500] * 3 + [501] + [503] * 5 + [504] * 2
    assert len(markers) == 5


def test_commit_time_converted_from_2000_epoch() -> None:
    decoder = ready_decoder()
    events, markers = feed(
        decoder,
        begin(1, 0, 1),
        insert(ORDERS_OID, [1, "a", "1"]),
        commit(1, 2, -1_000_000),  # one second before 2000-01-01
    )
    assert events[0].commit_time_us == 946_684_800_000_000
    assert datetime.fromtimestamp(events[0].commit_time_us / 1e6, UTC) == datetime(
        2000, 1, 1, tzinfo=UTC
    )
    marker = markers[0]
    assert isinstance(marker, CommitMarker)
    assert marker.commit_time_us == 946_684_799_000_000


def test_relation_builds_schema_and_first_sighting_is_not_a_change() -> None:
    decoder = PgOutputDecoder("shop")
    feed(decoder, relation(ORDERS_OID, "public", "orders", ORDERS_COLS))
    expected = TableSchema(
        "public",
        "orders",
        (
            Column("id", INT8, "", True),
            Column("note", TEXT, "", False),
            Column("total", NUMERIC, "", False),
        ),
    )
    assert decoder.schema_changes == []
    info = decoder.relations[ORDERS_OID]
    assert info.schema == expected
    assert info.replica_identity == "d"
    assert info.type_modifiers == (-1, -1, 655366)

    # The same relation again (pgoutput resends it per session / after invalidation): no change.
    feed(decoder, relation(ORDERS_OID, "public", "orders", ORDERS_COLS))
    assert decoder.schema_changes == []
    assert decoder.relations[ORDERS_OID] is info


def test_added_column_is_a_schema_change_and_later_changes_use_the_new_shape() -> None:
    decoder = ready_decoder()
    old = decoder.relations[ORDERS_OID].schema
    altered = [*ORDERS_COLS, (0, "status", TEXT, -1)]
    events, _ = feed(
        decoder,
        relation(ORDERS_OID, "public", "orders", altered),
        begin(10, TS_PG_US, 2),
        insert(ORDERS_OID, [1, "n", "1", "new"]),
    )
    [change] = decoder.schema_changes
    assert isinstance(change, SchemaChange)
    assert change.previous == old
    assert change.current.column_names == ("id", "note", "total", "status")
    assert (change.added, change.dropped, change.retyped) == (("status",), (), ())
    assert change.is_change
    assert events[0].table == change.current
    assert events[0].table is decoder.relations[ORDERS_OID].schema


@pytest.mark.parametrize(
    ("columns", "added", "dropped", "retyped"),
    [
        ([(1, "id", INT8, -1), (0, "total", NUMERIC, 655366)], (), ("note",), ()),
        # ALTER COLUMN total TYPE bigint: same name, new type OID.
        ([(1, "id", INT8, -1), (0, "note", TEXT, -1), (0, "total", INT8, -1)], (), (), ("total",)),
        # int8 -> int4 on the key column.
        (
            [(1, "id", INT4, -1), (0, "note", TEXT, -1), (0, "total", NUMERIC, 655366)],
            (),
            (),
            ("id",),
        ),
        # A rename reads as one column dropped and one added.
        (
            [(1, "id", INT8, -1), (0, "remark", TEXT, -1), (0, "total", NUMERIC, 655366)],
            ("remark",),
            ("note",),
            (),
        ),
        # Everything at once.
        (
            [(1, "id", INT8, -1), (0, "total", TEXT, -1), (0, "a", INT4, -1), (0, "b", TEXT, -1)],
            ("a", "b"),
            ("note",),
            ("total",),
        ),
    ],
    ids=["drop", "retype", "retype-key", "rename", "all"],
)
def test_dropped_retyped_and_renamed_columns_are_schema_changes(
    columns: list[tuple[int, str, int, int]],
    added: tuple[str, ...],
    dropped: tuple[str, ...],
    retyped: tuple[str, ...],
) -> None:
    decoder = ready_decoder()
    old = decoder.relations[ORDERS_OID].schema
    events, _ = feed(
        decoder,
        relation(ORDERS_OID, "public", "orders", columns),
        begin(20, TS_PG_US, 3),
        insert(ORDERS_OID, ["1"] * len(columns)),
        commit(20, 30, TS_PG_US),
    )
    assert decoder.schema_changes == [SchemaChange(old, decoder.relations[ORDERS_OID].schema)]
    change = decoder.schema_changes[0]
    assert (change.added, change.dropped, change.retyped) == (added, dropped, retyped)
    assert events[0].table.column_names == tuple(name for _, name, _, _ in columns)


@pytest.mark.parametrize(
    ("columns", "identity"),
    [
        # varchar(36) -> varchar(68): a new typmod, same type.
        ([(1, "order_id", INT8, -1), (1, "sku", VARCHAR, 68), (0, "qty", INT4, -1)], b"f"),
        # REPLICA IDENTITY DEFAULT instead of FULL.
        (ITEMS_COLS, b"d"),
        # A different replica identity index: other key flags.
        ([(1, "order_id", INT8, -1), (0, "sku", VARCHAR, 36), (1, "qty", INT4, -1)], b"i"),
    ],
    ids=["typmod", "identity", "key-flags"],
)
def test_typmod_key_or_identity_only_refresh_the_cache_without_a_change(
    columns: list[tuple[int, str, int, int]], identity: bytes
) -> None:
    decoder = ready_decoder()
    before = decoder.relations[ITEMS_OID]
    feed(decoder, relation(ITEMS_OID, "sales", "items", columns, identity))
    after = decoder.relations[ITEMS_OID]
    assert after != before
    assert after.replica_identity == identity.decode()
    assert after.type_modifiers == tuple(m for *_, m in columns)
    assert decoder.schema_changes == []


def test_schema_changes_accumulate_in_stream_order_until_drained() -> None:
    decoder = ready_decoder()
    v1 = decoder.relations[ORDERS_OID].schema
    v2_cols = [*ORDERS_COLS, (0, "a", TEXT, -1)]
    v3_cols = [*v2_cols, (0, "b", TEXT, -1)]
    items_v2 = [(1, "order_id", INT8, -1), (1, "sku", VARCHAR, 36)]
    feed(
        decoder,
        relation(ORDERS_OID, "public", "orders", v2_cols),
        relation(ITEMS_OID, "sales", "items", items_v2, b"f"),
        relation(ORDERS_OID, "public", "orders", v3_cols),
        relation(ORDERS_OID, "public", "orders", v3_cols),  # resent: nothing new
    )
    changes = decoder.schema_changes
    assert [(c.current.qualified_name, c.added, c.dropped) for c in changes] == [
        ("public.orders", ("a",), ()),
        ("sales.items", (), ("qty",)),
        ("public.orders", ("b",), ()),
    ]
    assert changes[0].previous == v1
    assert changes[2].previous == changes[0].current
    # The reader takes the list and puts a new one in place (wal_reader._stream).
    decoder.schema_changes = []
    feed(decoder, relation(ORDERS_OID, "public", "orders", ORDERS_COLS))
    assert [c.dropped for c in decoder.schema_changes] == [("a", "b")]


def test_schema_change_uses_described_type_names() -> None:
    names = {INT4: "integer", INT8: "bigint", TEXT: "text", NUMERIC: "numeric(12,2)"}

    def describe(oid: int, columns: list[tuple[bool, str, int, int]]) -> list[tuple[str, bool]]:
        return [(names[type_oid], is_key) for is_key, _, type_oid, _ in columns]

    decoder = PgOutputDecoder("shop", describe=describe)
    cols = [(1, "id", INT4, -1), (0, "total", NUMERIC, 786438)]
    feed(decoder, relation(ORDERS_OID, "public", "orders", cols))
    feed(decoder, relation(ORDERS_OID, "public", "orders", [(1, "id", INT8, -1), cols[1]]))
    [change] = decoder.schema_changes
    assert change.retyped == ("id",)
    assert change.previous is not None
    assert [c.type_name for c in change.previous.columns] == ["integer", "numeric(12,2)"]
    assert [c.type_name for c in change.current.columns] == ["bigint", "numeric(12,2)"]


def test_relation_resent_with_new_identity_or_typmod_updates_cache() -> None:
    decoder = PgOutputDecoder("shop")
    feed(decoder, relation(ITEMS_OID, "sales", "items", ITEMS_COLS, b"d"))
    # ALTER TABLE ... REPLICA IDENTITY FULL and ALTER COLUMN sku TYPE varchar(64):
    wider = [(1, "order_id", INT8, -1), (1, "sku", VARCHAR, 68), (0, "qty", INT4, -1)]
    feed(decoder, relation(ITEMS_OID, "sales", "items", wider, b"f"))
    info = decoder.relations[ITEMS_OID]
    assert info.replica_identity == "f"
    assert info.type_modifiers == (-1, 68, -1)


def test_empty_namespace_means_pg_catalog() -> None:
    decoder = PgOutputDecoder("shop")
    feed(decoder, relation(1259, "", "pg_class", [(1, "oid", 26, -1)]))
    assert decoder.relations[1259].schema.qualified_name == "pg_catalog.pg_class"


def test_replica_identity_flags_mark_key_without_describe() -> None:
    decoder = ready_decoder()
    assert decoder.relations[ORDERS_OID].schema.key_columns == ("id",)
    assert decoder.relations[ITEMS_OID].schema.key_columns == ("order_id", "sku")
    assert all(c.type_name == "" for c in decoder.relations[ITEMS_OID].schema.columns)


def test_describe_callback_supplies_type_names_and_keys() -> None:
    calls: list[tuple[int, list[tuple[bool, str, int, int]]]] = []

    def describe(oid: int, columns: list[tuple[bool, str, int, int]]) -> list[tuple[str, bool]]:
        calls.append((oid, list(columns)))
        names = {INT8: "bigint", TEXT: "text", NUMERIC: "numeric(10,2)"}
        # The primary key is "note" here, whatever the replica identity flags say.
        return [(names[type_oid], name == "note") for _, name, type_oid, _ in columns]

    decoder = PgOutputDecoder("shop", describe=describe)
    events, _ = feed(
        decoder,
        relation(ORDERS_OID, "public", "orders", ORDERS_COLS),
        begin(5, TS_PG_US, 9),
        insert(ORDERS_OID, [1, "k", "2.50"]),
    )
    assert calls == [
        (
            ORDERS_OID,
            [(True, "id", INT8, -1), (False, "note", TEXT, -1), (False, "total", NUMERIC, 655366)],
        )
    ]
    schema = decoder.relations[ORDERS_OID].schema
    assert [c.type_name for c in schema.columns] == ["bigint", "text", "numeric(10,2)"]
    assert schema.key_columns == ("note",)
    assert events[0].key == {"note": "k"}


@pytest.mark.parametrize(
    "change",
    [
        insert(ORDERS_OID, [1, "a", "1"]),
        update(ORDERS_OID, [1, "a", "1"]),
        update(ORDERS_OID, [1, "a", "1"], old=[1, None, None]),
        delete(ORDERS_OID, [1, None, None]),
        truncate([ORDERS_OID]),
    ],
    ids=["insert", "update", "update-old", "delete", "truncate"],
)
def test_change_before_relation_raises(change: bytes) -> None:
    decoder = PgOutputDecoder("shop")
    decoder.decode(begin(1, 0, 1), [])
    out: list[SourceEvent] = []
    with pytest.raises(ProtocolError, match=str(ORDERS_OID)):
        decoder.decode(change, out)
    assert out == []


def test_truncate_of_known_and_unknown_relation_raises() -> None:
    decoder = ready_decoder()
    decoder.decode(begin(1, 0, 1), [])
    with pytest.raises(ProtocolError):
        decoder.decode(truncate([ORDERS_OID, 99999]), [])


@pytest.mark.parametrize(
    "data",
    [b"X", b"S" + struct.pack("!IB", 1, 1), b"E", b"c" + b"\x00" * 30, b"A" + b"\x00" * 30],
    ids=["X", "stream-start", "stream-stop", "stream-commit", "stream-abort"],
)
def test_unknown_message_kind_raises(data: bytes) -> None:
    with pytest.raises(ProtocolError, match="unsupported"):
        PgOutputDecoder("shop").decode(data, [])


def test_insert_without_new_tuple_raises() -> None:
    decoder = ready_decoder()
    bad = b"I" + struct.pack("!I", ORDERS_OID) + b"K" + tupledata([1, None, None])
    with pytest.raises(ProtocolError):
        decoder.decode(bad, [])


def test_update_without_new_tuple_raises() -> None:
    decoder = ready_decoder()
    bad = b"U" + struct.pack("!I", ORDERS_OID) + b"O" + tupledata([1, "a", "1"]) + b"X"
    with pytest.raises(ProtocolError):
        decoder.decode(bad, [])


def test_logical_message_returned_not_emitted() -> None:
    decoder = ready_decoder()
    events, markers = feed(
        decoder,
        message("cdc.heartbeat", b"\x00\x01payload", 0xABC, transactional=False),
        begin(0xB00, TS_PG_US, 3),
        message("app", b"", 0xAFF, transactional=True),
        insert(ORDERS_OID, [1, "a", "1"]),
        commit(0xB00, 0xB10, TS_PG_US),
    )
    assert markers[:2] == [
        LogicalMessage(False, 0xABC, "cdc.heartbeat", b"\x00\x01payload"),
        LogicalMessage(True, 0xAFF, "app", b""),
    ]
    assert len(events) == 1
    assert events[0].position == Position(0xB00, 0)  # a message does not use up an index


def test_origin_and_type_messages_are_ignored() -> None:
    decoder = ready_decoder()
    events, markers = feed(
        decoder,
        begin(0x500, TS_PG_US, 4),
        origin(0x4FF, "upstream-node"),
        type_msg(70000, "public", "mood"),
        insert(ORDERS_OID, [1, "a", "1"]),
        commit(0x500, 0x510, TS_PG_US),
    )
    assert [e.position for e in events] == [Position(0x500, 0)]
    assert markers == [CommitMarker(0x500, 0x510, TS_UNIX_US)]
    assert decoder.in_transaction is False


def test_relation_inside_transaction_does_not_disturb_positions() -> None:
    decoder = ready_decoder()
    events, _ = feed(
        decoder,
        begin(0x900, TS_PG_US, 8),
        insert(ORDERS_OID, [1, "a", "1"]),
        relation(ORDERS_OID, "public", "orders", [*ORDERS_COLS, (0, "extra", TEXT, -1)]),
        insert(ORDERS_OID, [2, "b", "2", "x"]),
        commit(0x900, 0x910, TS_PG_US),
    )
    assert [e.position for e in events] == [Position(0x900, 0), Position(0x900, 1)]
    assert len(events[0].table.columns) == 3
    assert len(events[1].table.columns) == 4


def test_truncate_with_options_emits_one_event_per_relation() -> None:
    decoder = ready_decoder()
    events, _ = feed(
        decoder,
        begin(0x700, TS_PG_US, 6),
        truncate([ITEMS_OID, ORDERS_OID], options=3),  # CASCADE | RESTART IDENTITY
        commit(0x700, 0x710, TS_PG_US),
    )
    assert [(e.operation, e.table.table, e.position.minor) for e in events] == [
        (Operation.TRUNCATE, "items", 0),
        (Operation.TRUNCATE, "orders", 1),
    ]
