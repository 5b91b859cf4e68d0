"""A small schema registry speaking the Confluent Schema Registry REST API (Avro schemas), for the
local stack and the tests. Production uses Confluent Schema Registry, Karapace or Apicurio
(none is installable on these machines); see docs/local-stack.md.

Endpoints: ``POST /subjects/{s}/versions`` (register, checked against the subject's
compatibility level), ``POST /subjects/{s}`` (look a schema up), ``GET /schemas/ids/{id}``
(+ ``/schema``, ``/versions``), ``GET /schemas/types``, ``GET /subjects``,
``GET /subjects/{s}/versions``, ``GET /subjects/{s}/versions/{v|latest}`` (+ ``/schema``),
``DELETE /subjects/{s}`` and ``DELETE /subjects/{s}/versions/{v}``,
``POST /compatibility/subjects/{s}/versions/{v|latest}`` (``?verbose=true`` adds messages),
``GET|PUT /config`` and ``GET|PUT|DELETE /config/{s}``; optional HTTP basic auth
(``$CDC_SCHEMA_REGISTRY_BASIC_AUTH=user:password``). Errors carry Confluent's
``error_code`` values. State is kept in one JSON file, rewritten atomically on every change.

Run it with ``python -m services.stack.schema_registry --host 127.0.0.1 --port N
[--data-file PATH]``; :func:`start` does that as a managed process.
"""

from __future__ import annotations

import argparse
import base64
import hmac
import json
import os
import re
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs, unquote, urlsplit

from services.net import find_free_port
from services.stack.avro_compat import COMPATIBILITY_LEVELS, compatibility_errors
from services.stack.process import HOST, ManagedProcess, launch

__all__ = ["RegistryError", "RegistryState", "SchemaRegistryServer", "make_server", "start"]

CONTENT_TYPE: Final = "application/vnd.schemaregistry.v1+json"
DEFAULT_COMPATIBILITY: Final = "BACKWARD"
#: ``USER:PASSWORD``: when set, the server requires HTTP basic auth with these credentials.
BASIC_AUTH_ENV: Final = "CDC_SCHEMA_REGISTRY_BASIC_AUTH"


class RegistryError(Exception):
    """An API error: HTTP status plus Confluent's error_code."""

    def __init__(self, status: int, error_code: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.message = message


def _parse_avro(text: str) -> Any:
    from fastavro.schema import parse_schema

    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise RegistryError(422, 42201, f"Invalid schema: not JSON: {exc}") from None
    try:
        return parse_schema(raw, _write_hint=False)
    except Exception as exc:  # fastavro raises several types for a bad schema
        raise RegistryError(422, 42201, f"Invalid schema: {exc}") from None


def _identity(text: str) -> str:
    """Two registrations are the same schema when their JSON is equal (key order and
    whitespace do not matter)."""
    return json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))


class RegistryState:
    """Schemas (global ids), subjects (versions -> id), compatibility config; thread-safe and
    persisted to ``path`` (None: in memory only)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._lock = threading.RLock()
        self.schemas: dict[int, str] = {}
        self.subjects: dict[str, dict[int, int]] = {}
        self.global_compatibility = DEFAULT_COMPATIBILITY
        self.subject_compatibility: dict[str, str] = {}
        if path is not None and path.exists():
            self._load(path)

    # ------------------------------------------------------------------ persistence

    def _load(self, path: Path) -> None:
        data = json.loads(path.read_text())
        self.schemas = {int(k): v for k, v in data.get("schemas", {}).items()}
        self.subjects = {
            s: {int(v): int(i) for v, i in versions.items()}
            for s, versions in data.get("subjects", {}).items()
        }
        self.global_compatibility = data.get("compatibility", DEFAULT_COMPATIBILITY)
        self.subject_compatibility = dict(data.get("subject_compatibility", {}))

    def _save(self) -> None:
        if self.path is None:
            return
        data = {
            "schemas": {str(k): v for k, v in self.schemas.items()},
            "subjects": {s: {str(v): i for v, i in vs.items()} for s, vs in self.subjects.items()},
            "compatibility": self.global_compatibility,
            "subject_compatibility": self.subject_compatibility,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".registry-")
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    # ------------------------------------------------------------------ lookups

    def _versions(self, subject: str) -> dict[int, int]:
        versions = self.subjects.get(subject)
        if not versions:
            raise RegistryError(404, 40401, f"Subject '{subject}' not found.")
        return versions

    def _version_number(self, subject: str, version: str) -> int:
        versions = self._versions(subject)
        if version in ("latest", "-1"):
            return max(versions)
        try:
            number = int(version)
        except ValueError:
            raise RegistryError(
                422, 42202, "The specified version is not a valid version id."
            ) from None
        if number not in versions:
            raise RegistryError(404, 40402, f"Version {version} not found.")
        return number

    def compatibility(self, subject: str | None = None) -> str:
        with self._lock:
            if subject is not None and subject in self.subject_compatibility:
                return self.subject_compatibility[subject]
            return self.global_compatibility

    def schema_by_id(self, schema_id: int) -> str:
        with self._lock:
            if schema_id not in self.schemas:
                raise RegistryError(404, 40403, "Schema not found")
            return self.schemas[schema_id]

    def subjects_of(self, schema_id: int) -> list[dict[str, Any]]:
        with self._lock:
            self.schema_by_id(schema_id)
            return [
                {"subject": s, "version": v}
                for s, versions in sorted(self.subjects.items())
                for v, i in sorted(versions.items())
                if i == schema_id
            ]

    def version(self, subject: str, version: str) -> dict[str, Any]:
        with self._lock:
            number = self._version_number(subject, version)
            schema_id = self.subjects[subject][number]
            return {
                "subject": subject,
                "version": number,
                "id": schema_id,
                "schema": self.schemas[schema_id],
            }

    def lookup(self, subject: str, schema: str) -> dict[str, Any]:
        _parse_avro(schema)
        key = _identity(schema)
        with self._lock:
            versions = self._versions(subject)
            for number, schema_id in sorted(versions.items()):
                if _identity(self.schemas[schema_id]) == key:
                    return self.version(subject, str(number))
        raise RegistryError(404, 40403, "Schema not found")

    # ------------------------------------------------------------------ changes

    def check(self, subject: str, schema: str, version: str | None) -> list[str]:
        """Compatibility errors of ``schema`` against the subject's versions (all of them for a
        transitive level, ``version`` only when given, else the latest)."""
        new = _parse_avro(schema)
        with self._lock:
            level = self.compatibility(subject)
            if subject not in self.subjects:
                if version is not None and version not in ("latest", "-1"):
                    raise RegistryError(404, 40401, f"Subject '{subject}' not found.")
                return []
            numbers = sorted(self.subjects[subject])
            if version is not None and not level.endswith("_TRANSITIVE"):
                numbers = [self._version_number(subject, version)]
            existing = [_parse_avro(self.schemas[self.subjects[subject][n]]) for n in numbers]
        return compatibility_errors(level, new, existing)

    def register(self, subject: str, schema: str) -> int:
        _parse_avro(schema)
        key = _identity(schema)
        with self._lock:
            versions = self.subjects.get(subject, {})
            for schema_id in versions.values():
                if _identity(self.schemas[schema_id]) == key:
                    return schema_id  # already registered under this subject
            errors = self.check(subject, schema, None)
            if errors:
                raise RegistryError(
                    409,
                    409,
                    "Schema being registered is incompatible with an earlier schema for subject"
                    f" '{subject}' ({self.compatibility(subject)}): " + "; ".join(errors),
                )
            schema_id = next(
                (i for i, text in self.schemas.items() if _identity(text) == key),
                max(self.schemas, default=0) + 1,
            )
            self.schemas[schema_id] = schema
            self.subjects.setdefault(subject, {})[max(versions, default=0) + 1] = schema_id
            self._save()
            return schema_id

    def delete_subject(self, subject: str) -> list[int]:
        with self._lock:
            numbers = sorted(self._versions(subject))
            del self.subjects[subject]
            self.subject_compatibility.pop(subject, None)
            self._save()
            return numbers

    def delete_version(self, subject: str, version: str) -> int:
        with self._lock:
            number = self._version_number(subject, version)
            del self.subjects[subject][number]
            if not self.subjects[subject]:
                del self.subjects[subject]
            self._save()
            return number

    def set_compatibility(self, subject: str | None, level: str) -> None:
        if level not in COMPATIBILITY_LEVELS:
            raise RegistryError(422, 42203, f"Invalid compatibility level {level!r}")
        with self._lock:
            if subject is None:
                self.global_compatibility = level
            else:
                self.subject_compatibility[subject] = level
            self._save()

    def delete_compatibility(self, subject: str) -> str:
        with self._lock:
            if subject not in self.subject_compatibility:
                raise RegistryError(
                    404,
                    40408,
                    f"Subject '{subject}' does not have subject-level compatibility configured",
                )
            level = self.subject_compatibility.pop(subject)
            self._save()
            return level


# ---------------------------------------------------------------------- HTTP

_Route = tuple[str, re.Pattern[str], Callable[..., Any]]


def _schema_body(body: dict[str, Any]) -> str:
    schema_type = body.get("schemaType", "AVRO")
    if schema_type != "AVRO":
        raise RegistryError(422, 42201, f"Only AVRO schemas are supported here, not {schema_type}")
    if body.get("references"):
        raise RegistryError(422, 42201, "Schema references are not supported by this registry")
    schema = body.get("schema")
    if not isinstance(schema, str):
        raise RegistryError(422, 42201, "Request body needs a 'schema' string")
    return schema


def _routes(state: RegistryState) -> list[_Route]:
    def register(subject: str, body: dict[str, Any], query: dict[str, str]) -> Any:
        return {"id": state.register(subject, _schema_body(body))}

    def lookup(subject: str, body: dict[str, Any], query: dict[str, str]) -> Any:
        return state.lookup(subject, _schema_body(body))

    def compatible(subject: str, version: str, body: dict[str, Any], query: dict[str, str]) -> Any:
        errors = state.check(subject, _schema_body(body), version)
        result: dict[str, Any] = {"is_compatible": not errors}
        if query.get("verbose") == "true":
            result["messages"] = errors
        return result

    def put_config(body: dict[str, Any], query: dict[str, str], subject: str | None = None) -> Any:
        level = str(body.get("compatibility", "")).upper()
        state.set_compatibility(subject, level)
        return {"compatibility": level}

    def get_subject_config(subject: str, body: dict[str, Any], query: dict[str, str]) -> Any:
        if subject not in state.subject_compatibility and query.get("defaultToGlobal") != "true":
            raise RegistryError(
                404,
                40408,
                f"Subject '{subject}' does not have subject-level compatibility configured",
            )
        return {"compatibilityLevel": state.compatibility(subject)}

    s = r"(?P<subject>[^/]+)"
    v = r"(?P<version>[^/]+)"
    i = r"(?P<schema_id>\d+)"
    return [
        ("GET", re.compile(r"/"), lambda body, query: {}),
        ("GET", re.compile(r"/schemas/types"), lambda body, query: ["AVRO"]),
        (
            "GET",
            re.compile(rf"/schemas/ids/{i}"),
            lambda schema_id, body, query: {"schema": state.schema_by_id(int(schema_id))},
        ),
        (
            "GET",
            re.compile(rf"/schemas/ids/{i}/schema"),
            lambda schema_id, body, query: json.loads(state.schema_by_id(int(schema_id))),
        ),
        (
            "GET",
            re.compile(rf"/schemas/ids/{i}/versions"),
            lambda schema_id, body, query: state.subjects_of(int(schema_id)),
        ),
        ("GET", re.compile(r"/subjects"), lambda body, query: sorted(state.subjects)),
        ("POST", re.compile(rf"/subjects/{s}/versions"), register),
        ("POST", re.compile(rf"/subjects/{s}"), lookup),
        (
            "GET",
            re.compile(rf"/subjects/{s}/versions"),
            lambda subject, body, query: sorted(state._versions(subject)),
        ),
        (
            "GET",
            re.compile(rf"/subjects/{s}/versions/{v}"),
            lambda subject, version, body, query: state.version(subject, version),
        ),
        (
            "GET",
            re.compile(rf"/subjects/{s}/versions/{v}/schema"),
            lambda subject, version, body, query: json.loads(
                state.version(subject, version)["schema"]
            ),
        ),
        (
            "DELETE",
            re.compile(rf"/subjects/{s}"),
            lambda subject, body, query: state.delete_subject(subject),
        ),
        (
            "DELETE",
            re.compile(rf"/subjects/{s}/versions/{v}"),
            lambda subject, version, body, query: state.delete_version(subject, version),
        ),
        ("POST", re.compile(rf"/compatibility/subjects/{s}/versions/{v}"), compatible),
        (
            "POST",
            re.compile(rf"/compatibility/subjects/{s}/versions"),
            lambda subject, body, query: compatible(subject, "latest", body, query),
        ),
        (
            "GET",
            re.compile(r"/config"),
            lambda body, query: {"compatibilityLevel": state.compatibility()},
        ),
        ("PUT", re.compile(r"/config"), put_config),
        ("GET", re.compile(rf"/config/{s}"), get_subject_config),
        (
            "PUT",
            re.compile(rf"/config/{s}"),
            lambda subject, body, query: put_config(body, query, subject),
        ),
        (
            "DELETE",
            re.compile(rf"/config/{s}"),
            lambda subject, body, query: {
                "compatibilityLevel": state.delete_compatibility(subject)
            },
        ),
    ]


class _Handler(BaseHTTPRequestHandler):
    server: _RegistryHTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"{self.address_string()} {format % args}\n")

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        path = parts.path.rstrip("/") or "/"
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        try:
            self._authenticate()
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body: Any = json.loads(raw) if raw.strip() else {}
            if not isinstance(body, dict):
                raise RegistryError(422, 42201, "Request body must be a JSON object")
            status, payload = HTTPStatus.OK, self._route(method, path, body, query)
        except RegistryError as exc:
            status, payload = (
                HTTPStatus(exc.status),
                {
                    "error_code": exc.error_code,
                    "message": exc.message,
                },
            )
        except ValueError as exc:
            status, payload = HTTPStatus.BAD_REQUEST, {"error_code": 400, "message": str(exc)}
        data = json.dumps(payload).encode()
        self.send_response(status)
        if status == HTTPStatus.UNAUTHORIZED:
            self.send_header("WWW-Authenticate", 'Basic realm="cdc-schema-registry"')
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authenticate(self) -> None:
        expected = self.server.basic_auth
        if expected is None:
            return
        header = self.headers.get("Authorization", "")
        scheme, _, encoded = header.partition(" ")
        try:
            given = base64.b64decode(encoded, validate=True) if scheme.lower() == "basic" else b""
        except ValueError:
            given = b""
        if not hmac.compare_digest(given, expected):
            raise RegistryError(401, 401, "Unauthorized")

    def _route(self, method: str, path: str, body: dict[str, Any], query: dict[str, str]) -> Any:
        path_matched = False
        for route_method, pattern, handler in self.server.routes:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            path_matched = True
            if route_method == method:
                args = {k: unquote(v) for k, v in match.groupdict().items()}
                return handler(**args, body=body, query=query)
        if path_matched:
            raise RegistryError(405, 405, f"{method} not allowed on {path}")
        raise RegistryError(404, 404, f"HTTP 404 Not Found: {path}")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")


class _RegistryHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    routes: list[_Route]
    state: RegistryState
    basic_auth: bytes | None


def make_server(
    host: str,
    port: int,
    data_file: Path | None = None,
    basic_auth: tuple[str, str] | None = None,
) -> _RegistryHTTPServer:
    """An HTTP server (not yet serving) for the registry; ``port`` 0 picks one. With
    ``basic_auth`` (user, password) every request needs those HTTP basic credentials."""
    server = _RegistryHTTPServer((host, port), _Handler)
    server.state = RegistryState(data_file)
    server.routes = _routes(server.state)
    server.basic_auth = f"{basic_auth[0]}:{basic_auth[1]}".encode() if basic_auth else None
    return server


# ---------------------------------------------------------------------- managed process


def registry_healthy(
    url: str, timeout: float = 1.0, basic_auth: tuple[str, str] | None = None
) -> bool:
    request = urllib.request.Request(f"{url}/subjects")
    if basic_auth is not None:
        token = base64.b64encode(f"{basic_auth[0]}:{basic_auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


@dataclass
class SchemaRegistryServer:
    """A running registry process; ``url`` is ``http://127.0.0.1:PORT``."""

    host: str
    port: int
    data_file: Path
    process: ManagedProcess
    basic_auth: tuple[str, str] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self.process.stop()


def start(
    workdir: Path,
    *,
    port: int | None = None,
    basic_auth: tuple[str, str] | None = None,
    timeout: float = 20.0,
) -> SchemaRegistryServer:
    """Run the registry as ``python -m services.stack.schema_registry`` on 127.0.0.1 with its
    state in ``workdir/schemas.json`` and its log in ``workdir/schema_registry.log``; with
    ``basic_auth`` (user, password) it requires those credentials (passed in the environment,
    not on the command line)."""
    port = port or find_free_port()
    data_file = workdir / "schemas.json"
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env.pop(BASIC_AUTH_ENV, None)
    if basic_auth is not None:
        env[BASIC_AUTH_ENV] = f"{basic_auth[0]}:{basic_auth[1]}"
    url = f"http://{HOST}:{port}"
    managed = launch(
        "schema_registry",
        [
            sys.executable,
            "-m",
            "services.stack.schema_registry",
            "--host",
            HOST,
            "--port",
            str(port),
            "--data-file",
            str(data_file),
        ],
        workdir=workdir,
        ports=[port],
        healthy=lambda: registry_healthy(url, basic_auth=basic_auth),
        timeout=timeout,
        env=env,
    )
    return SchemaRegistryServer(HOST, port, data_file, managed, basic_auth)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.stack.schema_registry",
        description="A small Confluent-API-compatible schema registry (Avro) for local use.",
    )
    parser.add_argument("--host", default=HOST)
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--data-file", type=Path, default=None, help="JSON state file")
    args = parser.parse_args(argv)
    user, sep, password = os.environ.get(BASIC_AUTH_ENV, "").partition(":")
    server = make_server(args.host, args.port, args.data_file, (user, password) if sep else None)
    print(f"schema registry listening on http://{args.host}:{server.server_port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, _interrupt)
    sys.exit(main())
