"""What ``cdc stack up`` writes into its directory: ``stack.json`` (every endpoint),
``platform.yaml`` (a ready ``transport_mode: kafka`` platform file for this stack) and
``pipeline.yaml`` (a sample pipeline: the stack's ``cdc_demo.public.orders`` into its
``replica`` database)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import yaml

__all__ = ["pipeline_document", "platform_document", "write_outputs"]

SAMPLE_PIPELINE_ID: Final = "stack-demo"


def platform_document(sections: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "transport_mode": "kafka",
        "kafka": {
            "bootstrap_servers": sections["kafka"]["bootstrap_servers"],
            "schema_registry_url": sections["schema_registry"]["url"],
            "topic_num_partitions": 1,
            "topic_replication_factor": 1,
        },
        "connector": {"connect_url": sections["connect"]["url"]},
        "dlq": {"enabled": True, "topic_suffix": "dlq"},
    }


def pipeline_document(sections: Mapping[str, Any]) -> dict[str, Any]:
    pg = sections["postgres"]
    return {
        "pipeline_id": SAMPLE_PIPELINE_ID,
        "topic_prefix": "cdc",
        "source": {
            "source_type": "postgres",
            "host": pg["host"],
            "port": pg["port"],
            "database": pg["database"],
            "username": pg["username"],
            "password": pg["password"],
            "tables": ["public.orders"],
            "snapshot_mode": "initial",
        },
        "sinks": [
            {
                "sink_id": "replica",
                "sink_type": "postgres",
                "postgres": {
                    "host": pg["host"],
                    "port": pg["port"],
                    "database": pg["replica_database"],
                    "username": pg["username"],
                    "password": pg["password"],
                    "target_schema": "public",
                    "write_mode": "upsert",
                },
            }
        ],
    }


def _write(path: Path, text: str, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def write_outputs(directory: Path, sections: Mapping[str, Any]) -> None:
    """Write the three files; those holding the PostgreSQL password are readable by the owner
    only."""
    header = (
        f"# Written by `cdc stack up` for the local stack in {directory}.\n"
        "# Rewritten on every `cdc stack up`; copy it before editing.\n"
    )
    _write(
        directory / "platform.yaml",
        header + yaml.safe_dump(platform_document(sections), sort_keys=False),
        0o644,
    )
    _write(
        directory / "pipeline.yaml",
        header + yaml.safe_dump(pipeline_document(sections), sort_keys=False),
        0o600,
    )
    _write(directory / "stack.json", json.dumps(dict(sections), indent=2) + "\n", 0o600)
