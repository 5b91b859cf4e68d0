"""Avro schema-resolution compatibility (can a reader schema read what a writer schema wrote?),
per the Avro specification's resolution rules, on schemas parsed by fastavro.

Used by the local schema registry for BACKWARD / FORWARD / FULL (and their _TRANSITIVE forms)
checks. Logical types are checked through their underlying types, as Confluent's registry does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

__all__ = ["COMPATIBILITY_LEVELS", "compatibility_errors", "reader_errors"]

COMPATIBILITY_LEVELS: Final = frozenset(
    {
        "NONE",
        "BACKWARD",
        "BACKWARD_TRANSITIVE",
        "FORWARD",
        "FORWARD_TRANSITIVE",
        "FULL",
        "FULL_TRANSITIVE",
    }
)

_PRIMITIVES: Final = frozenset(
    {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}
)
# writer type -> reader types that can read it (besides itself)
_PROMOTIONS: Final[Mapping[str, frozenset[str]]] = {
    "int": frozenset({"long", "float", "double"}),
    "long": frozenset({"float", "double"}),
    "float": frozenset({"double"}),
    "string": frozenset({"bytes"}),
    "bytes": frozenset({"string"}),
}


def _collect_names(schema: Any, names: dict[str, Any], namespace: str = "") -> None:
    if isinstance(schema, list):
        for branch in schema:
            _collect_names(branch, names, namespace)
        return
    if not isinstance(schema, dict):
        return
    kind = schema.get("type")
    if kind in ("record", "error", "enum", "fixed"):
        full = _full_name(schema, namespace)
        names[full] = schema
        names.setdefault(full.rsplit(".", 1)[-1], schema)
        inner_ns = full.rpartition(".")[0]
        for field in schema.get("fields", []):
            _collect_names(field["type"], names, inner_ns)
    elif kind == "array":
        _collect_names(schema["items"], names, namespace)
    elif kind == "map":
        _collect_names(schema["values"], names, namespace)
    elif isinstance(kind, dict | list):
        _collect_names(kind, names, namespace)


def _full_name(schema: Mapping[str, Any], namespace: str) -> str:
    name = str(schema["name"])
    if "." in name:
        return name
    ns = schema.get("namespace", namespace) or ""
    return f"{ns}.{name}" if ns else name


def _resolve(schema: Any, names: Mapping[str, Any]) -> Any:
    """Named references become their definitions; {"type": X} wrappers of non-named types
    become X."""
    while True:
        if isinstance(schema, str):
            if schema in _PRIMITIVES:
                return schema
            if schema not in names:
                raise ValueError(f"unknown type name {schema!r}")
            schema = names[schema]
            continue
        if isinstance(schema, dict) and schema.get("type") not in (
            "record",
            "error",
            "enum",
            "fixed",
            "array",
            "map",
        ):
            schema = schema["type"]
            continue
        return schema


def _kind(schema: Any) -> str:
    if isinstance(schema, str):
        return schema
    if isinstance(schema, list):
        return "union"
    kind = str(schema["type"])
    return "record" if kind == "error" else kind


def _short(schema: Mapping[str, Any]) -> str:
    return str(schema["name"]).rsplit(".", 1)[-1]


class _Checker:
    def __init__(self, reader: Any, writer: Any) -> None:
        self.reader_names: dict[str, Any] = {}
        self.writer_names: dict[str, Any] = {}
        _collect_names(reader, self.reader_names)
        _collect_names(writer, self.writer_names)
        self.in_progress: set[tuple[int, int]] = set()

    def check(self, reader: Any, writer: Any, path: str) -> list[str]:
        reader = _resolve(reader, self.reader_names)
        writer = _resolve(writer, self.writer_names)
        r_kind, w_kind = _kind(reader), _kind(writer)
        if w_kind == "union":
            errors: list[str] = []
            for index, branch in enumerate(writer):
                errors += self.check(reader, branch, f"{path}[union branch {index}]")
            return errors
        if r_kind == "union":
            for branch in reader:
                if not self.check(branch, writer, path):
                    return []
            return [f"{path}: reader union has no branch that reads writer type {w_kind}"]
        if r_kind != w_kind:
            if r_kind in _PROMOTIONS.get(w_kind, frozenset()):
                return []
            return [f"{path}: reader type {r_kind} cannot read writer type {w_kind}"]
        if r_kind in _PRIMITIVES:
            return []
        if r_kind == "array":
            return self.check(reader["items"], writer["items"], f"{path}.items")
        if r_kind == "map":
            return self.check(reader["values"], writer["values"], f"{path}.values")
        if _short(reader) != _short(writer) and _short(writer) not in [
            str(a).rsplit(".", 1)[-1] for a in reader.get("aliases", [])
        ]:
            return [f"{path}: reader name {reader['name']} differs from writer {writer['name']}"]
        if r_kind == "fixed":
            if reader["size"] != writer["size"]:
                return [f"{path}: fixed size {writer['size']} became {reader['size']}"]
            return []
        if r_kind == "enum":
            missing = [s for s in writer["symbols"] if s not in reader["symbols"]]
            if missing and "default" not in reader:
                return [f"{path}: reader enum lacks symbols {missing} and has no default"]
            return []
        return self._record(reader, writer, path)

    def _record(self, reader: Mapping[str, Any], writer: Mapping[str, Any], path: str) -> list[str]:
        key = (id(reader), id(writer))
        if key in self.in_progress:  # recursive type: assume it holds while checking it
            return []
        self.in_progress.add(key)
        try:
            writer_fields = {f["name"]: f for f in writer.get("fields", [])}
            errors: list[str] = []
            for field in reader.get("fields", []):
                names = [field["name"], *field.get("aliases", [])]
                match = next((writer_fields[n] for n in names if n in writer_fields), None)
                where = f"{path}.{field['name']}"
                if match is None:
                    if "default" not in field:
                        errors.append(
                            f"{where}: reader field has no default and the writer lacks it"
                        )
                    continue
                errors += self.check(field["type"], match["type"], where)
            return errors
        finally:
            self.in_progress.discard(key)


def reader_errors(reader: Any, writer: Any) -> list[str]:
    """Why ``reader`` cannot read data written with ``writer`` (empty: it can)."""
    return _Checker(reader, writer).check(reader, writer, "$")


def compatibility_errors(level: str, new: Any, existing: list[Any]) -> list[str]:
    """Why ``new`` breaks ``level`` against ``existing`` (oldest first; empty: compatible).

    Non-transitive levels check against the latest existing schema only.
    """
    if level not in COMPATIBILITY_LEVELS:
        raise ValueError(f"unknown compatibility level {level!r}")
    if level == "NONE" or not existing:
        return []
    against = existing if level.endswith("_TRANSITIVE") else existing[-1:]
    base = level.removesuffix("_TRANSITIVE")
    errors: list[str] = []
    for old in against:
        if base in ("BACKWARD", "FULL"):
            errors += [f"BACKWARD: {e}" for e in reader_errors(new, old)]
        if base in ("FORWARD", "FULL"):
            errors += [f"FORWARD: {e}" for e in reader_errors(old, new)]
    return errors
