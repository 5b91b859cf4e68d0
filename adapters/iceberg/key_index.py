"""Where each live key of an upsert table is: (data file, row position), in memory.

Data files and delete files never change once written, so the key column of every data file
is read once (the whole table's once at start, or after another writer's commit: a
compaction, a rollback) and kept; each commit then finds the rows a batch replaces with one
vectorised `is_in` per file (no table scan, no data read) and adds only its own new files.
Memory: the key column(s) of the table (8 bytes per row for a bigint key)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyiceberg.io.pyarrow import _read_deletes
from pyiceberg.table import Table
from pyiceberg.typedef import Record

from adapters.iceberg.row_delta import RowDeletes


def key_array(data: pa.Table | pa.RecordBatch, names: Sequence[str]) -> pa.Array:
    """The key of each row: the key column itself, or the key columns joined as text."""
    if len(names) == 1:
        col = data.column(names[0])
        return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    parts = []
    for name in names:
        col = data.column(name)
        col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        parts.append(pc.cast(col, pa.string()))
    return pc.binary_join_element_wise(*parts, "\x00")


@dataclass(slots=True)
class FileKeys:
    path: str
    spec_id: int
    partition: Record
    keys: pa.Array
    live: pa.Array  # bool per row: not deleted


@dataclass(frozen=True, slots=True)
class Located:
    """Rows of one data file that hold some of the looked-up keys."""

    file: FileKeys
    positions: pa.Array  # int64


class KeyIndex:
    def __init__(self, key_names: Sequence[str], snapshot_id: int | None) -> None:
        self.key_names = tuple(key_names)
        self.snapshot_id = snapshot_id
        self.files: dict[str, FileKeys] = {}

    @classmethod
    def build(cls, table: Table, key_names: Sequence[str]) -> KeyIndex:
        snapshot = table.current_snapshot()
        index = cls(key_names, snapshot.snapshot_id if snapshot else None)
        if snapshot is None:
            return index
        deletes_cache: dict[str, dict[str, pa.ChunkedArray]] = {}
        for task in table.scan(snapshot_id=snapshot.snapshot_id).plan_files():
            f = task.file
            keys = index.read_keys(table, f.file_path)
            live = pa.repeat(pa.scalar(True), len(keys))
            for d in task.delete_files:
                if d.file_path not in deletes_cache:
                    deletes_cache[d.file_path] = _read_deletes(table.io, d)
                gone = deletes_cache[d.file_path].get(f.file_path)
                if gone is not None and len(gone):
                    live = _clear(live, gone)
            index.files[f.file_path] = FileKeys(f.file_path, f.spec_id, f.partition, keys, live)
        return index

    def read_keys(self, table: Table, path: str) -> pa.Array:
        with table.io.new_input(path).open() as stream:
            data = pq.read_table(stream, columns=list(self.key_names))
        return key_array(data, self.key_names)

    def add_file(self, table: Table, path: str, spec_id: int, partition: Record) -> None:
        keys = self.read_keys(table, path)
        self.files[path] = FileKeys(
            path, spec_id, partition, keys, pa.repeat(pa.scalar(True), len(keys))
        )

    def locate(self, keys: pa.Array) -> list[Located]:
        """The live rows holding any of `keys`."""
        if not len(keys):
            return []
        wanted = pc.unique(keys)
        found: list[Located] = []
        for f in self.files.values():
            if not len(f.keys):
                continue
            hit = pc.and_(pc.is_in(f.keys, value_set=wanted), f.live)
            if pc.any(hit).as_py():
                positions = pc.indices_nonzero(hit).cast(pa.int64())
                found.append(Located(f, positions))
        return found

    def live_rows(self) -> list[Located]:
        """Every live row (a TRUNCATE deletes them all)."""
        return [
            Located(f, pc.indices_nonzero(f.live).cast(pa.int64()))
            for f in self.files.values()
            if len(f.keys) and pc.any(f.live).as_py()
        ]

    def mark_deleted(self, located: Sequence[Located]) -> None:
        for loc in located:
            loc.file.live = _clear(loc.file.live, loc.positions)

    @property
    def rows(self) -> int:
        return sum(int(pc.sum(f.live.cast(pa.int64())).as_py() or 0) for f in self.files.values())


def as_row_deletes(located: Sequence[Located]) -> list[RowDeletes]:
    return [RowDeletes(x.file.path, x.file.spec_id, x.file.partition, x.positions) for x in located]


_ARANGE: dict[int, pa.Array] = {}


def _arange(n: int) -> pa.Array:
    found = _ARANGE.get(n)
    if found is None:
        if len(_ARANGE) > 256:
            _ARANGE.clear()
        found = _ARANGE[n] = pa.array(range(n), pa.int64())
    return found


def _clear(live: pa.Array, positions: pa.Array | pa.ChunkedArray) -> pa.Array:
    mask = pc.is_in(_arange(len(live)), value_set=pc.cast(positions, pa.int64()))
    return pc.and_(live, pc.invert(mask))
