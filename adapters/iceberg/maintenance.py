"""Table maintenance: snapshot expiry that also deletes the files no snapshot references any
more (pyiceberg's own expiry only edits metadata), compaction of small data files and of the
position delete files the upsert path writes (the content is kept), and the removal of files
a crashed commit left behind (orphans).

Each commit is planned on one snapshot and refused when another commit landed meanwhile
(adapters/iceberg/row_delta.py): it is then planned again, so a compaction never drops a
concurrent sink commit. Inside the sink (`maintenance.enabled`) it runs under the writer's
lock, so never at the same time as the sink's own commit."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import structlog
from pyiceberg.exceptions import CommitFailedException
from pyiceberg.expressions import AlwaysTrue
from pyiceberg.io.pyarrow import ArrowScan, _dataframe_to_data_files
from pyiceberg.manifest import (
    DataFile,
    DataFileContent,
    ManifestEntry,
    ManifestEntryStatus,
    ManifestFile,
)
from pyiceberg.table import Table
from pyiceberg.table.snapshots import Operation
from pyiceberg.table.update.snapshot import _SnapshotProducer

if TYPE_CHECKING:
    from adapters.iceberg.writer import IcebergSinkWriter

log = structlog.get_logger(__name__)
ATTEMPTS = 5


# ------------------------------------------------------------------ reachable files
def reachable_files(table: Table) -> set[str]:
    """Every file the table's metadata references: manifest lists, manifests, data and
    delete files of every snapshot still in the metadata."""
    out: set[str] = set()
    seen_manifests: set[str] = set()
    for snapshot in table.metadata.snapshots:
        out.add(snapshot.manifest_list)
        for manifest in snapshot.manifests(table.io):
            out.add(manifest.manifest_path)
            if manifest.manifest_path in seen_manifests:
                continue
            seen_manifests.add(manifest.manifest_path)
            for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=False):
                if entry.status != ManifestEntryStatus.DELETED:
                    out.add(entry.data_file.file_path)
    return out


@dataclass(frozen=True, slots=True)
class ExpiryResult:
    expired_snapshots: int
    deleted_files: int


def expire(table: Table, older_than_seconds: float, retain_last: int) -> ExpiryResult:
    """Expire snapshots older than `older_than_seconds` (keeping the newest `retain_last`
    and the current one) and delete the files only they referenced."""
    table.refresh()
    snapshots = sorted(table.metadata.snapshots, key=lambda s: s.timestamp_ms)
    keep = {s.snapshot_id for s in snapshots[-retain_last:]} if retain_last else set()
    current = table.current_snapshot()
    if current is not None:
        keep.add(current.snapshot_id)
    cutoff = (time.time() - older_than_seconds) * 1000
    expired = [
        s.snapshot_id for s in snapshots if s.timestamp_ms < cutoff and s.snapshot_id not in keep
    ]
    if not expired:
        return ExpiryResult(0, 0)
    before = reachable_files(table)
    table.maintenance.expire_snapshots().by_ids(expired).commit()
    table.refresh()
    after = reachable_files(table)
    gone = before - after
    for path in gone:
        with contextlib.suppress(FileNotFoundError):
            table.io.delete(path)
    log.info(
        "iceberg_maintenance.expired",
        table=str(table.name()),
        snapshots=len(expired),
        files=len(gone),
    )
    return ExpiryResult(len(expired), len(gone))


# ------------------------------------------------------------------ compaction
class _Replace(_SnapshotProducer["_Replace"]):
    """A snapshot that replaces some files (data and delete files) by new data files."""

    def __init__(self, *args: Any, removed: set[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._removed_paths = removed

    def _validate_concurrency(self) -> None:
        if self._commit_window is not None and not self._commit_window.is_empty():
            raise CommitFailedException("another commit landed since the compaction was planned")

    def _existing_manifests(self) -> list[ManifestFile]:
        kept: list[ManifestFile] = []
        if self._parent_snapshot_id is None:
            return kept
        parent = self._transaction.table_metadata.snapshot_by_id(self._parent_snapshot_id)
        assert parent is not None
        for manifest in parent.manifests(io=self._io):
            entries = manifest.fetch_manifest_entry(io=self._io, discard_deleted=True)
            if not any(e.data_file.file_path in self._removed_paths for e in entries):
                kept.append(manifest)
                continue
            rest = [e for e in entries if e.data_file.file_path not in self._removed_paths]
            if rest:
                from pyiceberg.manifest import ManifestContent, ManifestWriterV2

                from adapters.iceberg.row_delta import _DeleteManifestWriter

                cls = (
                    ManifestWriterV2
                    if manifest.content == ManifestContent.DATA
                    else _DeleteManifestWriter
                )
                writer = cls(
                    spec=self.spec(manifest.partition_spec_id),
                    schema=self.schema(),
                    output_file=self.new_manifest_output(),
                    snapshot_id=self._snapshot_id,
                    avro_compression=self._compression,
                )
                with writer:
                    for e in rest:
                        writer.add_entry(
                            ManifestEntry.from_args(
                                status=ManifestEntryStatus.EXISTING,
                                snapshot_id=e.snapshot_id,
                                sequence_number=e.sequence_number,
                                file_sequence_number=e.file_sequence_number,
                                data_file=e.data_file,
                            )
                        )
                kept.append(writer.to_manifest_file())
        return kept

    def _deleted_entries(self) -> list[ManifestEntry]:
        return []


@dataclass(frozen=True, slots=True)
class CompactionResult:
    files_before: int
    files_after: int
    rows: int


def file_counts(table: Table) -> tuple[int, int]:
    """(data files, delete files) of the current snapshot."""
    snapshot = table.current_snapshot()
    if snapshot is None:
        return 0, 0
    data = deletes = 0
    for manifest in snapshot.manifests(table.io):
        for e in manifest.fetch_manifest_entry(table.io, discard_deleted=True):
            if e.data_file.content == DataFileContent.DATA:
                data += 1
            else:
                deletes += 1
    return data, deletes


def compact(table: Table, min_files: int = 2) -> CompactionResult:
    """Rewrite each partition that has `min_files` or more data files, or any delete file,
    into as few data files as the target file size allows, in one snapshot that carries the
    sink's positions forward. Retried when a concurrent commit lands."""
    for attempt in range(ATTEMPTS):
        try:
            return _compact_once(table, min_files)
        except CommitFailedException:
            log.warning(
                "iceberg_maintenance.compaction_conflict",
                table=str(table.name()),
                attempt=attempt + 1,
            )
            time.sleep(0.2 * (attempt + 1))
    raise RuntimeError(f"compaction of {table.name()} kept conflicting with other commits")


def _compact_once(table: Table, min_files: int) -> CompactionResult:
    table.refresh()
    snapshot = table.current_snapshot()
    if snapshot is None:
        return CompactionResult(0, 0, 0)
    tasks = list(table.scan(snapshot_id=snapshot.snapshot_id).plan_files())
    groups: dict[tuple[int, Any], list[Any]] = {}
    for task in tasks:
        groups.setdefault((task.file.spec_id, task.file.partition), []).append(task)
    chosen = [
        t
        for group in groups.values()
        if len(group) >= min_files or any(t.delete_files for t in group)
        for t in group
    ]
    before = sum(file_counts(table))
    if not chosen:
        return CompactionResult(before, before, 0)
    removed_files: dict[str, DataFile] = {}
    for t in chosen:
        removed_files[t.file.file_path] = t.file
        for d in t.delete_files:
            removed_files[d.file_path] = d
    scan = ArrowScan(table.metadata, table.io, table.schema(), AlwaysTrue())
    data = scan.to_table(chosen)
    tx = table.transaction()
    summary = snapshot.summary
    carried = {
        k: v
        for k, v in (summary.additional_properties if summary else {}).items()
        if k.startswith("cdc.")
    }
    producer = _Replace(
        operation=Operation.OVERWRITE,
        transaction=tx,
        io=table.io,
        snapshot_properties={**carried, "cdc.maintenance": "compaction"},
        removed=set(removed_files),
    )
    for f in removed_files.values():
        producer.delete_data_file(f)
    if data.num_rows:
        for f in _dataframe_to_data_files(
            table_metadata=tx.table_metadata, df=data, io=table.io, write_uuid=uuid.uuid4()
        ):
            producer.append_data_file(f)
    producer.commit()
    tx.commit_transaction()
    table.refresh()
    after = sum(file_counts(table))
    log.info(
        "iceberg_maintenance.compacted",
        table=str(table.name()),
        files_before=before,
        files_after=after,
        rows=data.num_rows,
    )
    return CompactionResult(before, after, data.num_rows)


# ------------------------------------------------------------------ orphans
def remove_orphans(table: Table, older_than_seconds: float = 3600.0) -> int:
    """Delete files under the table's location that no snapshot references and that are
    older than `older_than_seconds` (a commit in progress is younger): what a crash between
    writing and committing left behind."""
    from pyarrow.fs import FileSelector, FileType

    table.refresh()
    location = table.metadata.location
    parsed = urlparse(location)
    fs = table.io.fs_by_scheme(parsed.scheme or "file", parsed.netloc)  # type: ignore[attr-defined]
    root = location.split("://", 1)[1] if "://" in location else location
    keep = reachable_files(table)
    keep_plain = {p.split("://", 1)[1] if "://" in p else p for p in keep}
    cutoff = time.time() - older_than_seconds
    removed = 0
    for sub in ("data",):
        try:
            infos = fs.get_file_info(
                FileSelector(f"{root}/{sub}", recursive=True, allow_not_found=True)
            )
        except FileNotFoundError:
            continue
        for info in infos:
            if info.type != FileType.File or info.path in keep_plain:
                continue
            mtime = info.mtime.timestamp() if info.mtime else 0
            if mtime and mtime > cutoff:
                continue
            fs.delete_file(info.path)
            removed += 1
    if removed:
        log.info("iceberg_maintenance.orphans_removed", table=str(table.name()), files=removed)
    return removed


# ------------------------------------------------------------------ schedule
async def run_scheduled(writer: IcebergSinkWriter) -> None:
    """Every `compaction_interval_seconds`: compact, expire and remove orphans on each table
    the sink writes (also those created since the start), under the writer's lock."""
    m = writer.settings.maintenance
    while True:
        await asyncio.sleep(m.compaction_interval_seconds)
        try:
            await maintain_all(writer)
        except Exception as exc:  # maintenance never stops the sink
            log.error("iceberg_maintenance.failed", error=str(exc))


async def maintain_all(writer: IcebergSinkWriter) -> None:
    m = writer.settings.maintenance
    async with writer._lock:
        for sink in list(writer.tables.values()):
            await writer._run(compact, sink.table)
            await writer._run(
                expire, sink.table, m.expire_snapshots_older_than_seconds, m.retain_last_snapshots
            )
            await writer._run(
                remove_orphans, sink.table, max(3600.0, writer.settings.flush_interval_seconds * 10)
            )
            sink.table = sink.catalog.load_table(sink.identifier)
            sink.index = None


def as_of(table: Table, when: datetime) -> int | None:
    """The snapshot current at `when` (None: before the first)."""
    ms = int(when.astimezone(UTC).timestamp() * 1000)
    current = None
    for entry in table.metadata.snapshot_log:
        if entry.timestamp_ms <= ms:
            current = entry.snapshot_id
    return current
