"""Replication slot, publication and consumer-group names of a pipeline.

The pipeline's own name always wins. Otherwise the name is derived from the pipeline_id, so
two pipelines sharing one platform.yaml never share a replication slot (a shared slot makes
two readers consume - and confirm - one change stream, each losing what the other read).
"""

from __future__ import annotations

import hashlib

from .base import PG_NAME_MAX


def pg_safe_name(name: str) -> str:
    """``name`` if it fits in a PostgreSQL name (63 bytes), else its first 54 characters, '_'
    and 8 hex digits of its SHA-256, so different long names stay different."""
    if len(name) <= PG_NAME_MAX:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: PG_NAME_MAX - 9]}_{digest}"


def _pipeline_part(pipeline_id: str) -> str:
    return pipeline_id.replace("-", "_")


def derive_slot_name(pipeline_id: str, own: str | None, prefix: str | None) -> str:
    """own slot_name, else ``<prefix>_<pipeline_id>`` (platform wal_reader.slot_name as prefix),
    else ``cdc_<pipeline_id>``; '-' becomes '_'."""
    if own:
        return own
    return pg_safe_name(f"{prefix or 'cdc'}_{_pipeline_part(pipeline_id)}")


def derive_publication_name(pipeline_id: str, own: str | None, prefix: str | None) -> str:
    """own publication_name, else ``<prefix>_<pipeline_id>`` (platform
    wal_reader.publication_name as prefix), else ``cdc_<pipeline_id>_pub``."""
    if own:
        return own
    if prefix:
        return pg_safe_name(f"{prefix}_{_pipeline_part(pipeline_id)}")
    return pg_safe_name(f"cdc_{_pipeline_part(pipeline_id)}_pub")
