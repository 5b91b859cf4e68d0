"""Catalog and storage from the sink's settings: SQL catalogs (SQLite, PostgreSQL) or REST by
`catalog_uri`, the warehouse on local files or S3 (`s3_endpoint`, keys, region), and the
table name for a source table (`table_namespace`, `table_name` with placeholders)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pyiceberg.catalog import Catalog

from adapters.config.pipeline import IcebergSinkConfig

PLACEHOLDER = re.compile(r"\{(schema|table)\}")


def catalog_properties(settings: IcebergSinkConfig) -> dict[str, str]:
    uri = settings.catalog_uri
    props: dict[str, str] = {"warehouse": _warehouse(settings.warehouse)}
    if uri.startswith(("http://", "https://")):
        props.update(type="rest", uri=uri)
    else:
        if uri.startswith("postgresql://") or uri.startswith("postgres://"):
            uri = "postgresql+psycopg://" + uri.split("://", 1)[1]
        props.update(type="sql", uri=uri, init_catalog_tables="true")
    if settings.s3_endpoint:
        props["s3.endpoint"] = settings.s3_endpoint
        props["s3.path-style-access"] = "true"
    if settings.s3_access_key_id:
        props["s3.access-key-id"] = settings.s3_access_key_id
    if settings.s3_secret_access_key:
        props["s3.secret-access-key"] = settings.s3_secret_access_key
    if settings.s3_region:
        props["s3.region"] = settings.s3_region
    elif settings.s3_endpoint:
        props["s3.region"] = "us-east-1"
    return props


def _warehouse(warehouse: str) -> str:
    if "://" in warehouse:
        return warehouse
    path = Path(warehouse).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"file://{path}"


def shown_uri(uri: str) -> str:
    """`catalog_uri` for messages: without a password (postgresql://user:***@host/db)."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", uri)


def load_catalog(settings: IcebergSinkConfig) -> Catalog:
    from pyiceberg.catalog import load_catalog as _load

    props: dict[str, Any] = catalog_properties(settings)
    return _load(settings.catalog_name, **props)


def table_identifier(settings: IcebergSinkConfig, schema: str, table: str) -> tuple[str, str]:
    """(namespace, table) of the Iceberg table a source table `schema.table` goes to."""
    name = PLACEHOLDER.sub(lambda m: schema if m[1] == "schema" else table, settings.table_name)
    return settings.table_namespace, name


def has_placeholders(name: str) -> bool:
    return PLACEHOLDER.search(name) is not None
