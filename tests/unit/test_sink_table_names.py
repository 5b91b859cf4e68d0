"""sinks[].postgres.table_name_template: target table names, and pipelines whose tables
would share one target table are refused when they are loaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters.config import ConfigError, PostgresSinkConfig, loads_pipeline
from services.cli.main import main


def pipeline_text(tables: list[str], postgres: str = "", sink_tables: str = "") -> str:
    return (
        "pipeline_id: p\n"
        f"source: {{database: d, tables: [{', '.join(tables)}]}}\n"
        "sinks:\n"
        "  - sink_id: replica\n"
        "    sink_type: postgres\n"
        f"{sink_tables}"
        "    postgres:\n"
        "      database: x\n"
        f"{postgres}"
    )


def test_default_template_is_the_table_name() -> None:
    config = PostgresSinkConfig(database="x")
    assert config.table_name_template == "{table}"
    assert config.target_table("shop", "orders") == "orders"
    assert config.target_table("shop", "orders", change_log=True) == "orders_changes"


def test_template_with_schema_and_long_names_cut_as_postgres_does() -> None:
    config = PostgresSinkConfig(database="x", table_name_template="{schema}__{table}")
    assert config.target_table("shop", "orders") == "shop__orders"
    long = "x" * 70
    assert config.target_table("s", long) == ("s__" + long)[:63]
    assert len(config.target_table("s", "é" * 40).encode()) <= 63


def test_same_table_in_two_schemas_is_refused_naming_the_field_and_both_tables() -> None:
    with pytest.raises(ConfigError) as err:
        loads_pipeline(pipeline_text(["a.t", "b.t", "a.u"]))
    [problem] = err.value.problems
    assert problem.path == "sinks[0].postgres.table_name_template"
    assert "a.t and b.t" in problem.message and "public.t" in problem.message
    assert "{schema}_{table}" in problem.message


def test_a_template_that_tells_them_apart_is_accepted() -> None:
    config = loads_pipeline(
        pipeline_text(["a.t", "b.t"], postgres="      table_name_template: '{schema}_{table}'\n")
    )
    settings = config.sinks[0].postgres
    assert settings is not None
    assert [settings.target_table(*t.split(".")) for t in config.source.tables] == ["a_t", "b_t"]


def test_only_the_tables_a_sink_receives_can_collide() -> None:
    loads_pipeline(pipeline_text(["a.t", "b.t"], sink_tables="    tables: [a.*]\n"))


def test_names_equal_only_after_the_63_byte_cut_collide() -> None:
    stem = "t" * 55  # archive_ + 55 bytes: the last 5 of each table name are cut
    template = "      table_name_template: '{schema}_{table}'\n"
    with pytest.raises(ConfigError, match="would both be written to"):
        loads_pipeline(
            pipeline_text([f"archive.{stem}aaaaa", f"archive.{stem}bbbbb"], postgres=template)
        )
    loads_pipeline(pipeline_text([f"archive.{stem}aaaaa", f"archive.{stem}bbbbb"]))


@pytest.mark.parametrize(
    ("template", "needle"),
    [
        ("'{tablename}'", "unknown placeholder {tablename}"),
        ("'{}'", "unknown placeholder {}"),
        ("'{table!r}'", "no format spec or conversion"),
        ("'{table:>9}'", "no format spec or conversion"),
        ("'cdc_{table'", "not a valid template"),
    ],
)
def test_bad_templates_are_refused(template: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        loads_pipeline(pipeline_text(["a.t"], postgres=f"      table_name_template: {template}\n"))
    [problem] = err.value.problems
    assert problem.path == "sinks[0].postgres.table_name_template"
    assert needle in problem.message


def test_cdc_validate_exits_2_on_a_collision(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text(pipeline_text(["a.t", "b.t"]))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "sinks[0].postgres.table_name_template" in err and "a.t and b.t" in err
