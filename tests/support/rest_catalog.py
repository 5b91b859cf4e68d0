"""An Iceberg REST catalog for tests: the REST protocol's table and namespace endpoints over
HTTP, backed by a real pyiceberg SQL catalog (SQLite) and warehouse.

No Iceberg REST catalog server installs on this machine (the usual ones are JVM or Rust
services, not on PyPI), so the sink's REST path is tested against this: requests and
responses are pyiceberg's own REST models, and commits go through the SQL catalog's
`commit_table` (requirements checked, 409 on a conflict), like a real server's."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from pyiceberg.catalog.rest import CreateTableRequest
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.exceptions import (
    CommitFailedException,
    NamespaceAlreadyExistsError,
    NoSuchNamespaceError,
    NoSuchTableError,
    TableAlreadyExistsError,
)
from pyiceberg.table import CommitTableRequest

SEPARATOR = "\x1f"


def _metadata(table: Any) -> dict[str, Any]:
    return {
        "metadata-location": table.metadata_location,
        "metadata": json.loads(table.metadata.model_dump_json()),
        "config": {},
    }


class _Handler(BaseHTTPRequestHandler):
    catalog: SqlCatalog
    lock: threading.Lock

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _send(self, code: int, body: dict[str, Any] | None = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, code: int, kind: str, message: str) -> None:
        self._send(code, {"error": {"message": message, "type": kind, "code": code}})

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"{}")

    def _route(self) -> list[str]:
        path = urlparse(self.path).path
        parts = [unquote(p) for p in path.strip("/").split("/")]
        return parts[1:] if parts and parts[0] == "v1" else parts

    def _handle(self, method: str) -> None:
        parts = self._route()
        try:
            with self.lock:
                self._dispatch(method, parts)
        except (NoSuchTableError, NoSuchNamespaceError) as exc:
            self._error(404, type(exc).__name__, str(exc))
        except (TableAlreadyExistsError, NamespaceAlreadyExistsError) as exc:
            self._error(409, type(exc).__name__, str(exc))
        except CommitFailedException as exc:
            self._error(409, "CommitFailedException", str(exc))
        except Exception as exc:  # a bug here: say so to the client instead of hanging up
            self._error(500, type(exc).__name__, repr(exc))

    def _dispatch(self, method: str, parts: list[str]) -> None:
        c = self.catalog
        if parts == ["config"]:
            return self._send(200, {"defaults": {}, "overrides": {}})
        if parts[:1] != ["namespaces"]:
            return self._error(404, "NotFound", "/".join(parts))
        if len(parts) == 1:
            if method == "POST":
                body = self._body()
                c.create_namespace(tuple(body["namespace"]), body.get("properties") or {})
                return self._send(200, {"namespace": body["namespace"], "properties": {}})
            names = [list(n) for n in c.list_namespaces()]
            return self._send(200, {"namespaces": names})
        ns = tuple(parts[1].split(SEPARATOR))
        if len(parts) == 2:
            props = c.load_namespace_properties(ns)
            return self._send(
                200 if method == "GET" else 204,
                {"namespace": list(ns), "properties": props} if method == "GET" else None,
            )
        if parts[2] == "tables" and len(parts) == 3:
            if method == "POST":
                body = self._body()
                for optional in ("location", "partition-spec", "write-order"):
                    body.setdefault(optional, None)
                req = CreateTableRequest.model_validate(body)
                kwargs: dict[str, Any] = {"schema": req.table_schema, "properties": req.properties}
                if req.partition_spec is not None:
                    kwargs["partition_spec"] = req.partition_spec
                if req.write_order is not None:
                    kwargs["sort_order"] = req.write_order
                if req.location:
                    kwargs["location"] = req.location
                table = c.create_table((*ns, req.name), **kwargs)
                return self._send(200, _metadata(table))
            ids = [{"namespace": list(t[:-1]), "name": t[-1]} for t in c.list_tables(ns)]
            return self._send(200, {"identifiers": ids})
        if parts[2] == "tables" and len(parts) == 4:
            ident = (*ns, parts[3])
            if method in ("GET", "HEAD"):
                table = c.load_table(ident)
                return self._send(
                    200 if method == "GET" else 204, _metadata(table) if method == "GET" else None
                )
            if method == "DELETE":
                c.drop_table(ident)
                return self._send(204)
            request = CommitTableRequest.model_validate(self._body())
            table = c.load_table(ident)
            response = c.commit_table(table, request.requirements, request.updates)
            return self._send(
                200,
                {
                    "metadata-location": response.metadata_location,
                    "metadata": json.loads(response.metadata.model_dump_json()),
                },
            )
        return self._error(404, "NotFound", "/".join(parts))

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_DELETE(self) -> None:
        self._handle("DELETE")


@contextmanager
def rest_catalog(directory: Path) -> Iterator[str]:
    """Serve a REST catalog on 127.0.0.1; yields its URL."""
    directory.mkdir(parents=True, exist_ok=True)
    backing = SqlCatalog(
        "rest-backing",
        uri=f"sqlite:///{directory}/rest-catalog.db",
        warehouse=f"file://{directory}/warehouse",
    )
    handler = type("Handler", (_Handler,), {"catalog": backing, "lock": threading.Lock()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
