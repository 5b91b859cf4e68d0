"""domain.block_ops: cutting, joining and reading change blocks as whole columns."""

from __future__ import annotations

import pytest

from domain.block_ops import (
    changes_per_table,
    in_lane,
    joined_per_table,
    last_positions_by_lane,
    newest_commit_time_us,
    split_changes,
)
from domain.blocks import BlockError, ChangeBlock
from domain.events import Column, Operation, Position, TableSchema
from tests.support.arrow_chunks import Change, block_of, blocks_of, changes_in_order

A = TableSchema("s", "a", (Column("id", 0, "int8", True, "int64"),))
B = TableSchema("s", "b", (Column("id", 0, "int8", True, "int64"),))


def change(table: TableSchema, major: int, minor: int = 0, commit_us: int = 0) -> Change:
    return Change(table, Operation.CREATE, Position(major, minor), (major,), commit_us=commit_us)


def keys(blocks: list[ChangeBlock]) -> list[tuple[int, str, int]]:
    return [(i, t, p.major) for i, _, t, p in changes_in_order(blocks)]


def test_a_chunk_is_cut_in_change_order_across_its_blocks() -> None:
    blocks = blocks_of([change(A, 1), change(B, 2), change(B, 3), change(A, 4), change(A, 5)])
    parts = split_changes(blocks, 2)
    assert [keys(p) for p in parts] == [
        [(0, "s.a", 1), (1, "s.b", 2)],
        [(0, "s.b", 3), (1, "s.a", 4)],
        [(0, "s.a", 5)],
    ]
    # block a's rows are in change order: its parts are slices sharing its buffers
    first_a = parts[0][0].records.column(1)
    assert first_a.buffers()[1].address == blocks[0].records.column(1).buffers()[1].address


def test_rows_out_of_change_order_in_a_block_are_still_cut_right() -> None:
    block = block_of([change(A, 3), change(A, 1), change(A, 2), change(A, 0)], [3, 1, 2, 0])
    parts = split_changes([block], 2)
    assert [sorted(keys(p)) for p in parts] == [
        [(0, "s.a", 0), (1, "s.a", 1)],
        [(0, "s.a", 2), (1, "s.a", 3)],
    ]


def test_a_change_numbered_past_its_chunk_is_refused() -> None:
    block = block_of([change(A, 1), change(A, 2)], [0, 5])
    with pytest.raises(BlockError, match="@index 5 in a chunk of 2"):
        split_changes([block], 1)


def test_a_lane_joining_a_batch_gets_its_index_and_follows_the_lanes_before_it() -> None:
    blocks = blocks_of([change(A, 1), change(B, 2)])
    joined = in_lane(blocks, 2, 10)
    assert changes_in_order(joined) == [
        (10, 2, "s.a", Position(1)),
        (11, 2, "s.b", Position(2)),
    ]
    assert in_lane(blocks, 0, 0) == blocks
    assert changes_in_order(blocks)[0][:2] == (0, 0)  # the chunk's blocks are left as they were


def test_counts_commit_times_and_positions_come_off_the_columns() -> None:
    lane_0 = blocks_of([change(A, 5, 1, 700), change(B, 5, 2, 900), change(A, 5, 0, 800)])
    lane_1 = in_lane(blocks_of([change(A, 2, 0, 100), change(A, 9, 4, 50)]), 1, 3)
    blocks = lane_0 + lane_1
    assert changes_per_table(blocks) == {"s.a": 4, "s.b": 1}
    assert newest_commit_time_us(blocks) == 900
    assert newest_commit_time_us([]) == 0
    assert last_positions_by_lane(blocks) == {0: Position(5, 2), 1: Position(9, 4)}


def test_the_lanes_blocks_of_one_table_shape_are_joined_in_order_of_first_block() -> None:
    a2 = TableSchema("s", "a", (*A.columns, Column("n", 0, "int8", False, "int64")))
    lane_0 = blocks_of([change(A, 1), change(B, 2)])
    lane_1 = in_lane(blocks_of([change(B, 3), change(A, 4)]), 1, 2)
    lane_2 = in_lane([block_of([Change(a2, Operation.CREATE, Position(5), (5, 0))], [0])], 2, 4)
    joined = joined_per_table(lane_0 + lane_1 + lane_2)
    assert [(b.schema.table, len(b)) for b in joined] == [("a", 2), ("b", 2), ("a", 1)]
    assert changes_in_order(joined) == changes_in_order(lane_0 + lane_1 + lane_2)
    assert joined_per_table(lane_0) == lane_0  # nothing to join: the blocks themselves
