"""Avro resolution rules behind the local registry's compatibility checks
(services/stack/avro_compat.py), on fastavro-parsed schemas."""

from __future__ import annotations

from typing import Any

import pytest

fastavro_schema = pytest.importorskip("fastavro.schema", reason="fastavro: kafka/stack/dev extras")

from services.stack.avro_compat import compatibility_errors, reader_errors  # noqa: E402


def _p(schema: Any) -> Any:
    return fastavro_schema.parse_schema(schema, _write_hint=False)


def _record(*fields: dict[str, Any], name: str = "R") -> dict[str, Any]:
    return {"type": "record", "name": name, "fields": list(fields)}


@pytest.mark.parametrize(
    ("reader", "writer", "ok"),
    [
        ("long", "int", True),
        ("int", "long", False),
        ("double", "float", True),
        ("bytes", "string", True),
        (["null", "string"], "string", True),
        ("string", ["null", "string"], False),  # the writer's null branch cannot be read
        (["null", "long"], ["null", "int"], True),
        (
            {"type": "enum", "name": "E", "symbols": ["A", "B"]},
            {"type": "enum", "name": "E", "symbols": ["A", "B", "C"]},
            False,
        ),
        (
            {"type": "enum", "name": "E", "symbols": ["A", "B"], "default": "A"},
            {"type": "enum", "name": "E", "symbols": ["A", "B", "C"]},
            True,
        ),
        ({"type": "array", "items": "long"}, {"type": "array", "items": "int"}, True),
        ({"type": "map", "values": "int"}, {"type": "map", "values": "long"}, False),
        (
            {"type": "fixed", "name": "F", "size": 4},
            {"type": "fixed", "name": "F", "size": 8},
            False,
        ),
        (_record({"name": "a", "type": "int"}), _record({"name": "a", "type": "int"}), True),
        (
            _record({"name": "a", "type": "int"}),
            _record({"name": "a", "type": "int"}, name="S"),
            False,
        ),
        # a removed writer field is ignored; an added reader field needs a default
        (
            _record({"name": "a", "type": "int"}),
            _record({"name": "a", "type": "int"}, {"name": "b", "type": "int"}),
            True,
        ),
        (
            _record({"name": "a", "type": "int"}, {"name": "b", "type": "int"}),
            _record({"name": "a", "type": "int"}),
            False,
        ),
        (
            _record({"name": "a", "type": "int"}, {"name": "b", "type": "int", "default": 1}),
            _record({"name": "a", "type": "int"}),
            True,
        ),
        # renamed field via alias
        (
            _record({"name": "b", "type": "int", "aliases": ["a"]}),
            _record({"name": "a", "type": "int"}),
            True,
        ),
    ],
)
def test_reader_can_read_writer(reader: Any, writer: Any, ok: bool) -> None:
    errors = reader_errors(_p(reader), _p(writer))
    assert (errors == []) is ok, errors


def test_recursive_records_terminate() -> None:
    node = _record(
        {"name": "v", "type": "int"}, {"name": "next", "type": ["null", "Node"]}, name="Node"
    )
    assert reader_errors(_p(node), _p(node)) == []


def test_levels() -> None:
    v1 = _p(_record({"name": "a", "type": "int"}))
    v2 = _p(_record({"name": "a", "type": "int"}, {"name": "b", "type": "int", "default": 0}))
    v3 = _p(_record({"name": "b", "type": "int", "default": 0}))  # drops a (no default in v1)
    assert compatibility_errors("BACKWARD", v2, [v1]) == []
    assert compatibility_errors("FORWARD", v2, [v1]) == []
    assert compatibility_errors("BACKWARD", v3, [v1, v2]) == []
    assert compatibility_errors("FORWARD", v3, [v2]) != []  # v2 readers need a
    assert compatibility_errors("FULL_TRANSITIVE", v3, [v1, v2]) != []
    assert compatibility_errors("NONE", v3, [v1]) == []
    with pytest.raises(ValueError, match="unknown compatibility level"):
        compatibility_errors("SIDEWAYS", v1, [v1])
