"""Pure parts of chunked snapshots and watermarked backfills: queries, progress, windows."""

from __future__ import annotations

from psycopg import sql

from adapters.postgres.source.snapshot import TableProgress, chunk_query, key_indexes
from adapters.postgres.source.watermark import WatermarkChunker, Window
from domain.events import Column, Operation, Position, SourceEvent, TableSchema

ACCOUNTS = TableSchema(
    "public",
    "accounts",
    (
        Column("tenant", 23, "integer", True),
        Column("id", 23, "integer", True),
        Column("balance", 1700, "numeric(14,2)"),
    ),
)
LOG = TableSchema("public", "log", (Column("line", 25, "text"),))


def _text(query: sql.Composed) -> str:
    # Render without a connection: literals are simple enough to check by shape.
    return query.as_string(None)


def test_first_chunk_is_ordered_by_the_whole_key_and_limited() -> None:
    text = _text(chunk_query(ACCOUNTS, None, 500))
    assert text == (
        'COPY (SELECT "tenant", "id", "balance" FROM "public"."accounts"'
        ' ORDER BY "tenant", "id" LIMIT 500) TO STDOUT'
    )


def test_next_chunk_starts_after_the_last_key_with_typed_bounds() -> None:
    text = _text(chunk_query(ACCOUNTS, ("3", "1000"), 500))
    assert "WHERE (\"tenant\", \"id\") > (CAST('3' AS integer), CAST('1000' AS integer))" in text
    assert text.endswith('ORDER BY "tenant", "id" LIMIT 500) TO STDOUT')


def test_a_key_value_is_quoted_not_spliced() -> None:
    schema = TableSchema("public", "t", (Column("k", 25, "text", True),))
    text = _text(chunk_query(schema, ("x') TO STDOUT; DROP TABLE t; --",), 10))
    assert "'x'') TO STDOUT; DROP TABLE t; --'" in text


def test_a_table_without_key_is_read_whole() -> None:
    assert (
        _text(chunk_query(LOG, None, 500)) == 'COPY (SELECT "line" FROM "public"."log") TO STDOUT'
    )


def test_progress_advances_to_the_last_key_and_ends_on_a_short_chunk() -> None:
    idx = key_indexes(ACCOUNTS)
    assert idx == (0, 1)
    start = TableProgress("public.accounts")
    full = start.advanced([("1", "1", "0"), ("1", "2", "5")], idx, chunk_size=2)
    assert (full.last_key, full.rows, full.done) == (("1", "2"), 2, False)
    short = full.advanced([("2", "1", "0")], idx, chunk_size=2)
    assert (short.last_key, short.rows, short.done) == (("2", "1"), 3, True)
    empty = full.advanced([], idx, chunk_size=2)
    assert (empty.last_key, empty.rows, empty.done) == (("1", "2"), 2, True)


def _event(op: Operation, before: tuple | None, after: tuple | None, table=ACCOUNTS) -> SourceEvent:
    return SourceEvent(op, table, Position(1), before=before, after=after)


def test_a_window_drops_rows_whose_key_changed_inside_it() -> None:
    window = Window("w1", ACCOUNTS, TableProgress("public.accounts"), key_indexes(ACCOUNTS))
    window.rows = [("1", "1", "10"), ("1", "2", "20"), ("1", "3", "30"), ("2", "1", "40")]
    window.observe(
        [
            _event(Operation.UPDATE, None, ("1", "2", "21")),
            _event(Operation.DELETE, ("1", "3", None), None),
            # a key change: both the old and the new key are newer in the stream
            _event(Operation.UPDATE, ("2", "1", None), ("2", "9", "40")),
            # another table with the same key values is not ours
            _event(Operation.UPDATE, None, ("1", "1"), table=LOG),
        ]
    )
    assert window.surviving_rows() == [("1", "1", "10")]


def test_only_this_slots_current_window_matches_a_watermark() -> None:
    chunker = WatermarkChunker("dsn", "slot_a", 100, flush_arg=False)
    assert chunker.on_message("slot_a:abc:low") is None  # no window open
    window = Window("abc", ACCOUNTS, TableProgress("public.accounts"), (0, 1))
    chunker.window = window
    assert chunker.on_message("slot_a:abc:low") == (window, "low")
    assert chunker.on_message("slot_a:abc:high") == (window, "high")
    assert chunker.on_message("slot_b:abc:high") is None  # another pipeline's slot
    assert chunker.on_message("slot_a:old:high") is None  # a window of an earlier process
    assert chunker.on_message("garbage") is None
