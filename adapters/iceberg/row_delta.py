"""A snapshot that adds data files and position delete files in one commit (Iceberg's
"row delta"), which pyiceberg 0.12 reads (merge-on-read) but does not write.

Why: an upsert then costs what the batch costs (one data file, one delete file per touched
partition, one manifest each) instead of rewriting every data file that holds an updated key
(pyiceberg's `Table.upsert` / copy-on-write). Readers apply the delete files; compaction
(adapters/iceberg/maintenance.py) folds them back into data files.

Uses pyiceberg internals (`_SnapshotProducer`, manifest writers): the dependency is pinned
below 0.13 for that reason. A commit is refused (CommitFailedException) when another commit
landed since this one was planned: its position deletes name files and rows of the snapshot
it was planned on, so it is planned again instead of being retried blindly."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from pyiceberg.exceptions import CommitFailedException
from pyiceberg.manifest import (
    DataFile,
    DataFileContent,
    FileFormat,
    ManifestContent,
    ManifestEntry,
    ManifestEntryStatus,
    ManifestFile,
    ManifestWriterV2,
)
from pyiceberg.table import Table, Transaction
from pyiceberg.table.snapshots import Operation
from pyiceberg.table.update.snapshot import _FastAppendFiles
from pyiceberg.typedef import Record

PATH_FIELD_ID = 2147483546
POS_FIELD_ID = 2147483545
_DELETE_SCHEMA = pa.schema(
    [
        pa.field(
            "file_path",
            pa.string(),
            nullable=False,
            metadata={"PARQUET:field_id": str(PATH_FIELD_ID)},
        ),
        pa.field(
            "pos", pa.int64(), nullable=False, metadata={"PARQUET:field_id": str(POS_FIELD_ID)}
        ),
    ]
)


@dataclass(frozen=True, slots=True)
class RowDeletes:
    """Rows to delete from one data file: its path, partition, spec and row positions."""

    path: str
    spec_id: int
    partition: Record
    positions: pa.Array  # int64, ascending


class _DeleteManifestWriter(ManifestWriterV2):
    def content(self) -> ManifestContent:
        return ManifestContent.DELETES

    @property
    def _meta(self) -> dict[str, str]:
        return {**super()._meta, "content": "deletes"}


class _RowDelta(_FastAppendFiles):
    """A fast append that also adds position delete files (in their own manifests)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._added_delete_files: list[DataFile] = []

    def add_delete_file(self, delete_file: DataFile) -> None:
        self._added_delete_files.append(delete_file)
        self._added_data_files.append(delete_file)  # counted in the summary

    def _validate_concurrency(self) -> None:
        if self._commit_window is not None and not self._commit_window.is_empty():
            raise CommitFailedException("another commit landed since this one was planned")

    def _manifests(self) -> list[ManifestFile]:
        deletes = self._added_delete_files
        data = [f for f in self._added_data_files if f.content == DataFileContent.DATA]
        self._added_data_files = data
        try:
            manifests = super()._manifests()
        finally:
            self._added_data_files = data + deletes
        by_spec: dict[int, list[DataFile]] = {}
        for f in deletes:
            by_spec.setdefault(f.spec_id, []).append(f)
        for spec_id, files in by_spec.items():
            writer = _DeleteManifestWriter(
                spec=self.spec(spec_id),
                schema=self.schema(),
                output_file=self.new_manifest_output(),
                snapshot_id=self._snapshot_id,
                avro_compression=self._compression,
            )
            with writer:
                for f in files:
                    writer.add_entry(
                        ManifestEntry.from_args(
                            status=ManifestEntryStatus.ADDED,
                            snapshot_id=self._snapshot_id,
                            sequence_number=None,
                            file_sequence_number=None,
                            data_file=f,
                        )
                    )
            manifests.append(writer.to_manifest_file())
        return manifests


def write_delete_files(table: Table, deletes: Sequence[RowDeletes]) -> list[DataFile]:
    """One position delete file per partition (spec, partition value) for `deletes`."""
    groups: dict[tuple[int, Record], list[RowDeletes]] = {}
    for d in deletes:
        if len(d.positions):
            groups.setdefault((d.spec_id, d.partition), []).append(d)
    files: list[DataFile] = []
    for (spec_id, partition), items in groups.items():
        items.sort(key=lambda d: d.path)
        paths = pa.chunked_array(
            [pa.repeat(pa.scalar(d.path, pa.string()), len(d.positions)) for d in items],
            pa.string(),
        )
        positions = pa.chunked_array([d.positions.cast(pa.int64()) for d in items], pa.int64())
        data = pa.Table.from_arrays([paths, positions], schema=_DELETE_SCHEMA)
        location = table.location_provider().new_data_location(f"{uuid.uuid4()}-deletes.parquet")
        with table.io.new_output(location).create(overwrite=True) as out:
            pq.write_table(data, out)
        size = len(table.io.new_input(location))
        lower, upper = items[0].path.encode(), items[-1].path.encode()
        delete_file = DataFile.from_args(
            content=DataFileContent.POSITION_DELETES,
            file_path=location,
            file_format=FileFormat.PARQUET,
            partition=partition,
            record_count=data.num_rows,
            file_size_in_bytes=size,
            lower_bounds={PATH_FIELD_ID: lower},
            upper_bounds={PATH_FIELD_ID: upper},
            spec_id=spec_id,
        )
        delete_file.spec_id = spec_id
        files.append(delete_file)
    return files


def commit_row_delta(
    tx: Transaction,
    data_files: Sequence[DataFile],
    delete_files: Sequence[DataFile],
    properties: dict[str, str],
) -> int:
    """Stage one snapshot with `data_files` and `delete_files` on `tx` (committed with it);
    returns its snapshot id."""
    operation = Operation.OVERWRITE if delete_files else Operation.APPEND
    producer = _RowDelta(
        operation=operation,
        transaction=tx,
        io=tx._table.io,
        snapshot_properties=properties,
    )
    for f in data_files:
        producer.append_data_file(f)
    for f in delete_files:
        producer.add_delete_file(f)
    producer.commit()
    return int(producer._snapshot_id)
