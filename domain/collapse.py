"""Collapse by key: the last change per primary key of a run of changes to one table.

A sink that upserts (PostgreSQL, Iceberg) needs, per key, only its last change: a delete,
or the row to write. Two forms of the same rule:

* `KeyCollapse` (row level, any change): also resolves unchanged TOASTed values against
  earlier changes of the run and follows primary key changes (the old key goes away, and
  the stored row under it supplies what the source did not send);
* `collapse_block` (columnar, whole columns in Arrow): the common case, a block without
  truncates, unchanged values or key changes; it answers None for anything else, which
  then takes the row-level form.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc

from domain.blocks import (
    BEFORE,
    IMAGE,
    IMAGE_AFTER,
    IMAGE_BEFORE,
    META_COLUMNS,
    OP,
    UNCHANGED_COL,
    ChangeBlock,
)
from domain.events import UNCHANGED, Operation, SourceEvent, TextRow

Key = tuple[str | None, ...]
# ("u", row, origin key) or DELETED; the origin is the key of the stored row that supplies
# unchanged values (the old key after a primary key change), None when it is the same key.
Pending = tuple[str, TextRow | None, Key | None]
DELETED: Pending = ("d", None, None)


class KeyCollapse:
    """The changes of one table (one schema), collapsed per key, in order of last change."""

    __slots__ = ("key_idx", "state")

    def __init__(self, key_idx: Sequence[int]) -> None:
        self.key_idx = tuple(key_idx)
        self.state: dict[Key, Pending] = {}

    def add(self, ev: SourceEvent) -> None:
        kidx = self.key_idx
        state = self.state
        if ev.operation is Operation.DELETE:
            row = ev.before if ev.before is not None else ev.after
            assert row is not None  # validated by the caller
            key = (row[kidx[0]],) if len(kidx) == 1 else tuple([row[i] for i in kidx])
            state.pop(key, None)
            state[key] = DELETED
            return
        after = ev.after
        assert after is not None  # validated by the caller
        key = (after[kidx[0]],) if len(kidx) == 1 else tuple([after[i] for i in kidx])
        origin: Key | None = None
        before = ev.before
        if before is not None and ev.operation is Operation.UPDATE:
            old = tuple([before[i] for i in kidx])
            if old != key:  # primary key change: the old key goes away
                origin = old
        if origin is not None:
            base = state.pop(origin, None)
            state[origin] = DELETED
            state.pop(key, None)
        else:
            base = state.pop(key, None)
        if UNCHANGED in after:
            if base is not None and base[0] == "u":
                _, base_row, base_origin = base
                assert base_row is not None
                after = tuple(
                    [b if v is UNCHANGED else v for v, b in zip(after, base_row, strict=True)]
                )
                if base_origin is not None:
                    origin = base_origin
            if UNCHANGED not in after:
                origin = None
        else:
            origin = None
        state[key] = ("u", after, origin)


def simple_block(block: ChangeBlock, key_idx: Sequence[int]) -> bool:
    """Whether `collapse_block` handles `block`: keys, no truncate, no unchanged value, no
    primary key change, no key without a value, every change with the row it needs."""
    rb = block.records
    m = rb.num_rows
    if not key_idx:
        return False
    if not m:
        return True
    ops = rb.column(OP)
    if rb.column(UNCHANGED_COL).null_count != m:
        return False
    if pc.any(pc.equal(ops, "t")).as_py():
        return False
    images = rb.column(IMAGE)
    deletes = pc.equal(ops, "d")
    has_after = pc.not_equal(pc.bit_wise_and(images, pa.scalar(IMAGE_AFTER, pa.uint8())), 0)
    has_before = pc.not_equal(pc.bit_wise_and(images, pa.scalar(IMAGE_BEFORE, pa.uint8())), 0)
    # Every change has the row it needs: a delete some row, the others a new row.
    needs = pc.if_else(deletes, pc.or_(has_after, has_before), has_after)
    if not pc.all(needs).as_py():
        return False
    keys = [rb.column(META_COLUMNS + i) for i in key_idx]
    if any(k.null_count for k in keys):
        return False
    before = rb.column(BEFORE)
    if before.null_count != m:
        updates = pc.and_(pc.equal(ops, "u"), before.is_valid())
        for i, k in zip(key_idx, keys, strict=True):
            same = pc.fill_null(pc.equal(before.field(i), k), False)
            if not pc.all(pc.or_(pc.invert(updates), same)).as_py():
                return False  # a primary key change
    return True


def collapse_block(
    block: ChangeBlock, key_idx: Sequence[int], checked: bool = False
) -> pa.RecordBatch | None:
    """The last change per key of `block`, as its rows (``@op`` "d": the key's last change
    is a delete; otherwise the row to upsert), in the order of those last changes; None
    when the block needs `KeyCollapse` (see `simple_block`; `checked`: already known)."""
    if not checked and not simple_block(block, key_idx):
        return None
    rb = block.records
    m = rb.num_rows
    if not m:
        return rb
    keys = [rb.column(META_COLUMNS + i) for i in key_idx]
    key = keys[0] if len(keys) == 1 else join_keys(keys)
    picked = last_per_key(key)
    return rb if picked is None else rb.take(picked)


def join_keys(columns: Sequence[pa.Array]) -> pa.Array:
    """A key of several columns as one array (their text joined by NUL)."""
    return pc.binary_join_element_wise(*[pc.cast(c, pa.string()) for c in columns], "\x00")


def last_per_key(keys: pa.Array) -> pa.Array | None:
    """The place of each key's last change among `keys` (one per change, in change order),
    in the order of those last changes; None when no key repeats (every change is its
    key's last). The columnar form of collapse-by-key, for any sink that upserts."""
    m = len(keys)
    if pc.count_distinct(keys).as_py() == m:
        return None
    table = pa.table({"k": keys, "i": pa.array(range(m), pa.int64())})
    last = table.group_by("k", use_threads=False).aggregate([("i", "max")])
    picked = last.column("i_max").combine_chunks()
    return pc.take(picked, pc.sort_indices(picked))
