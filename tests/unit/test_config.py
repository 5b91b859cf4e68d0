"""adapters.config: loading, ${VAR} substitution and the error of every kind of bad file."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from pathlib import Path

import pytest

from adapters.config import (
    ConfigError,
    ConfigProblem,
    PipelineConfig,
    PlatformConfig,
    load_pipeline,
    load_platform,
    loads_pipeline,
)

MINIMAL = """\
pipeline_id: orders-cdc
source:
  database: shop
  tables: [public.orders]
"""


def write(tmp_path: Path, text: str, name: str = "pipeline.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def pipeline_error(tmp_path: Path, text: str, env: Mapping[str, str] | None = None) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_pipeline(path, env={} if env is None else env)
    return info.value


def platform_error(tmp_path: Path, text: str, env: Mapping[str, str] | None = None) -> ConfigError:
    path = write(tmp_path, text, "platform.yaml")
    with pytest.raises(ConfigError) as info:
        load_platform(path, env={} if env is None else env)
    return info.value


def only(err: ConfigError) -> ConfigProblem:
    assert len(err.problems) == 1, str(err)
    return err.problems[0]


def by_path(err: ConfigError, path: str) -> ConfigProblem:
    matches = [p for p in err.problems if p.path == path]
    assert matches, f"no problem at {path}:\n{err}"
    return matches[0]


# --------------------------------------------------------------------------- loading


def test_minimal_pipeline_loads(tmp_path: Path) -> None:
    config = load_pipeline(write(tmp_path, MINIMAL), env={})
    assert isinstance(config, PipelineConfig)
    assert config.pipeline_id == "orders-cdc"
    assert config.source.tables == ["public.orders"]
    assert config.sinks == []


def test_path_may_be_str(tmp_path: Path) -> None:
    assert load_pipeline(str(write(tmp_path, MINIMAL)), env={}).pipeline_id == "orders-cdc"


def test_platform_none_is_all_defaults() -> None:
    assert load_platform(None) == PlatformConfig()
    assert load_platform(None).transport_mode == "direct"


def test_env_defaults_to_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CFG_TEST_DB", "from_os_environ")
    path = write(tmp_path, MINIMAL.replace("database: shop", "database: ${CFG_TEST_DB}"))
    assert load_pipeline(path).source.database == "from_os_environ"
    monkeypatch.delenv("CFG_TEST_DB")
    with pytest.raises(ConfigError, match="CFG_TEST_DB"):
        load_pipeline(path)


# --------------------------------------------------------------------------- error classes


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    err = pipeline_error(
        tmp_path,
        """\
        pipeline_id: orders
        source:
          database: shop
          tables: [public.orders
        sinks: []
        """,
    )
    problem = only(err)
    assert problem.line is not None and problem.line >= 4
    assert problem.message.startswith("YAML syntax error")
    assert str(err).startswith(f"{err.file}:{problem.line}: YAML syntax error")
    assert err.file.endswith("pipeline.yaml")


def test_yaml_syntax_error_bad_indentation(tmp_path: Path) -> None:
    err = pipeline_error(tmp_path, "pipeline_id: x\nsource:\n  database: a\n bad: 1\n")
    assert only(err).line == 4


def test_two_documents_are_rejected(tmp_path: Path) -> None:
    err = pipeline_error(tmp_path, MINIMAL + "---\npipeline_id: other\n")
    assert "YAML syntax error" in only(err).message
    assert only(err).line == 5


def test_unknown_key_everywhere_with_suggestion(tmp_path: Path) -> None:
    err = pipeline_error(
        tmp_path,
        """\
        pipeline_id: orders-cdc
        topic_prefx: cdc
        source:
          database: shop
          tables: [public.orders]
          snapshotmode: never
        sinks:
          - sink_id: replica
            sink_type: postgres
            postgres:
              database: replica
              batchsize: 10
              maintenance: {}
        """,
    )
    assert by_path(err, "topic_prefx").line == 2
    assert by_path(err, "topic_prefx").message == (
        "unknown key 'topic_prefx' (did you mean 'topic_prefix'?)"
    )
    assert by_path(err, "source.snapshotmode").line == 6
    assert "did you mean 'snapshot_mode'?" in by_path(err, "source.snapshotmode").message
    assert by_path(err, "sinks[0].postgres.batchsize").line == 12
    assert "did you mean 'batch_size'?" in by_path(err, "sinks[0].postgres.batchsize").message
    unknown = by_path(err, "sinks[0].postgres.maintenance").message
    assert "did you mean" not in unknown
    assert "allowed keys: host, port, database" in unknown
    assert str(err).splitlines()[0] == (
        f"{err.file}:2: topic_prefx: unknown key 'topic_prefx' (did you mean 'topic_prefix'?)"
    )


def test_unknown_key_in_platform_sections(tmp_path: Path) -> None:
    err = platform_error(
        tmp_path,
        """\
        transport_mode: kafka
        kafka:
          bootstrap_server: k:9092
        ingest:
          grpcport: 1
        """,
    )
    assert "did you mean 'bootstrap_servers'?" in by_path(err, "kafka.bootstrap_server").message
    assert by_path(err, "kafka.bootstrap_server").line == 3
    assert "did you mean 'grpc_port'?" in by_path(err, "ingest.grpcport").message


def test_unknown_key_at_the_wrong_level_says_where_it_belongs(tmp_path: Path) -> None:
    err = pipeline_error(tmp_path, MINIMAL + "slot_name: my_slot\n")
    assert only(err).message == "unknown key 'slot_name' (it belongs under 'source:')"
    err = pipeline_error(
        tmp_path,
        MINIMAL
        + "sinks:\n  - sink_id: a\n    sink_type: webhook\n    webhook:\n"
        + "      url: http://x\n      enabled: false\n",
    )
    assert by_path(err, "sinks[0].webhook.enabled").message == (
        "unknown key 'enabled' (it belongs one level up)"
    )


def test_wrong_type_message_format(tmp_path: Path) -> None:
    err = pipeline_error(
        tmp_path,
        MINIMAL
        + """\
sinks:
  - sink_id: replica
    sink_type: postgres
    postgres:
      database: replica
      port: abc
""",
    )
    problem = only(err)
    assert (problem.path, problem.line) == ("sinks[0].postgres.port", 10)
    assert str(err) == (
        f"{err.file}:10: sinks[0].postgres.port: Input should be a valid integer, got 'abc'"
    )


@pytest.mark.parametrize(
    ("snippet", "path", "expected"),
    [
        ("  heartbeat_interval_seconds: soon\n", "source.heartbeat_interval_seconds", "number"),
        ("  tables: public.orders\n", "source.tables", "valid list, got 'public.orders'"),
        ("  host: {a: 1}\n", "source.host", "valid string, got a mapping"),
    ],
)
def test_wrong_types(tmp_path: Path, snippet: str, path: str, expected: str) -> None:
    base = "pipeline_id: p\nsource:\n  database: shop\n"
    if "tables" not in snippet:
        base += "  tables: [public.orders]\n"
    err = pipeline_error(tmp_path, base + snippet)
    assert expected in by_path(err, path).message


def test_wrong_type_boolean(tmp_path: Path) -> None:
    err = platform_error(tmp_path, "health_enabled: maybe\n")
    assert only(err).message == "Input should be a valid boolean (true or false), got 'maybe'"
    assert only(err).line == 1


def test_missing_required_fields(tmp_path: Path) -> None:
    err = pipeline_error(
        tmp_path,
        """\
        source:
          tables: [public.orders]
        sinks:
          - sink_id: lake
            sink_type: iceberg
            iceberg:
              catalog_uri: sqlite:///c.db
              table_name: t
        """,
    )
    root = by_path(err, "pipeline_id")
    assert root.line is None and root.message == "required field is missing"
    assert by_path(err, "source.database").line == 1  # the line of its section
    assert by_path(err, "sinks[0].iceberg.warehouse").line == 6
    # problems without a line come first, then by line
    assert [p.path for p in err.problems] == [
        "pipeline_id",
        "source.database",
        "sinks[0].iceberg.warehouse",
    ]
    assert str(err).splitlines()[0] == f"{err.file}: pipeline_id: required field is missing"


def test_invalid_enum_lists_allowed_values(tmp_path: Path) -> None:
    err = pipeline_error(tmp_path, MINIMAL.replace("source:\n", "source:\n  source_type: oracle\n"))
    assert only(err).path == "source.source_type"
    assert only(err).message == (
        "Input should be 'postgres', 'mysql', 'mongodb' or 'sqlserver', got 'oracle'"
    )
    err = platform_error(tmp_path, "transport_mode: kafak\n")
    assert only(err).message == (
        "Input should be 'direct', 'kafka', 'pubsub' or 'kinesis', got 'kafak'"
        " (did you mean 'kafka'?)"
    )


def test_missing_environment_variable_names_variable_path_and_line(tmp_path: Path) -> None:
    err = pipeline_error(
        tmp_path,
        """\
        pipeline_id: orders-cdc
        source:
          database: shop
          password: ${CDC_SOURCE_PASSWORD}
          tables: [public.orders]
        """,
    )
    problem = only(err)
    assert (problem.path, problem.line) == ("source.password", 4)
    assert "CDC_SOURCE_PASSWORD" in problem.message
    assert "not set" in problem.message
    assert str(err).startswith(f"{err.file}:4: source.password: environment variable")


def test_missing_variables_are_all_reported_with_other_problems(tmp_path: Path) -> None:
    err = pipeline_error(
        tmp_path,
        """\
        pipeline_id: orders-cdc
        source:
          host: ${DB_HOST}
          database: ${DB_NAME}
          port: nope
          tables: [public.orders]
        """,
    )
    assert [p.path for p in err.problems] == ["source.host", "source.database", "source.port"]
    assert "DB_HOST" in err.problems[0].message and "DB_NAME" in err.problems[1].message


def test_missing_variable_in_a_list_item(tmp_path: Path) -> None:
    text = MINIMAL.replace("[public.orders]", "\n    - public.orders\n    - ${T}")
    err = pipeline_error(tmp_path, text)
    assert (only(err).path, only(err).line) == ("source.tables[1]", 6)
    # inside [...] a reference must be quoted: '{' starts a YAML flow mapping there
    err = pipeline_error(tmp_path, MINIMAL.replace("[public.orders]", '[public.orders, "${T}"]'))
    assert (only(err).path, only(err).line) == ("source.tables[1]", 4)


def test_file_not_found(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    assert info.value.file == str(path)
    assert only(info.value) == ConfigProblem("", None, "file not found")
    assert str(info.value) == f"{path}: file not found"
    with pytest.raises(ConfigError, match="file not found"):
        load_platform(path)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_pipeline(tmp_path)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    err = pipeline_error(tmp_path, text)
    assert only(err).message.startswith("file is empty")
    err = platform_error(tmp_path, text)
    assert only(err).message.startswith("file is empty")


@pytest.mark.parametrize(
    ("text", "kind"),
    [("- a\n- b\n", "a list"), ("just text\n", "str 'just text'"), ("~\n", "nothing")],
)
def test_top_level_not_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    err = pipeline_error(tmp_path, text)
    assert only(err).message == f"top level must be a mapping of keys, got {kind}"
    assert only(err).line == 1


def test_duplicate_key(tmp_path: Path) -> None:
    err = pipeline_error(
        tmp_path, MINIMAL.replace("  database: shop\n", "  database: a\n  database: b\n")
    )
    assert only(err).path == "source.database"
    assert only(err).line == 4
    assert only(err).message == "duplicate key 'database' (first at line 3)"


def test_duplicate_sink_id(tmp_path: Path) -> None:
    sink = "  - sink_id: {id}\n    sink_type: webhook\n    webhook: {{url: 'http://h/{id}'}}\n"
    err = pipeline_error(
        tmp_path,
        MINIMAL + "sinks:\n" + sink.format(id="a") + sink.format(id="b") + sink.format(id="a"),
    )
    problem = only(err)
    assert problem.path == "sinks[2].sink_id"
    assert problem.line == 12
    assert problem.message == "duplicate sink_id 'a' (also sinks[0])"


def test_secret_values_are_not_echoed(tmp_path: Path) -> None:
    err = platform_error(
        tmp_path,
        """\
        transport_mode: kafka
        kafka:
          security_protocol: SASL_SSL
          auth_mechanism: sasl_plain
          sasl_username: u
          sasl_password: [hunter2]
        """,
    )
    assert "hunter2" not in str(err)
    err = pipeline_error(
        tmp_path,
        MINIMAL
        + "sinks:\n  - sink_id: h\n    sink_type: webhook\n    webhook:\n"
        + "      url: http://h\n      hmac_secret: {s3cr3t: 1}\n",
    )
    assert "s3cr3t" not in str(err)


def test_problem_lines_use_the_key_line_for_nested_sections(tmp_path: Path) -> None:
    err = pipeline_error(
        tmp_path,
        MINIMAL
        + """\
sinks:
  - sink_id: replica
    sink_type: postgres
""",
    )
    assert (only(err).path, only(err).line) == ("sinks[0].postgres", 6)
    assert only(err).message == "sink_type postgres requires a 'postgres:' section"


def test_config_error_is_an_exception_with_file_and_problems() -> None:
    err = ConfigError("p.yaml", [ConfigProblem("a.b", 3, "bad"), ConfigProblem("", None, "worse")])
    assert isinstance(err, Exception)
    assert str(err) == "p.yaml:3: a.b: bad\np.yaml: worse"
    assert err.problems[0].path == "a.b"


# --------------------------------------------------------------------------- substitution


def sub(tmp_path: Path, value: str, env: Mapping[str, str]) -> str:
    """The database name after substituting ``value``."""
    text = MINIMAL.replace("database: shop", f"database: {value}")
    return load_pipeline(write(tmp_path, text), env=env).source.database


def test_substitution_plain(tmp_path: Path) -> None:
    assert sub(tmp_path, "${DB}", {"DB": "orders"}) == "orders"


def test_substitution_default(tmp_path: Path) -> None:
    assert sub(tmp_path, "${DB:-fallback}", {}) == "fallback"
    assert sub(tmp_path, "${DB:-fallback}", {"DB": "set"}) == "set"
    assert sub(tmp_path, "${DB:-fallback}", {"DB": ""}) == "fallback"  # empty counts as unset


def test_substitution_default_may_contain_colons_and_slashes(tmp_path: Path) -> None:
    assert sub(tmp_path, '"${DB:-postgresql://u:p@h:5/d}"', {}) == "postgresql://u:p@h:5/d"


def test_substitution_several_in_one_string(tmp_path: Path) -> None:
    env = {"U": "alice", "P": "s3cret"}
    assert sub(tmp_path, "postgresql://${U}:${P}@h/db", env) == "postgresql://alice:s3cret@h/db"
    assert sub(tmp_path, "${U}${P}-${X:-x}", env) == "alices3cret-x"


def test_substitution_escape(tmp_path: Path) -> None:
    assert sub(tmp_path, "$${DB}", {"DB": "no"}) == "${DB}"
    assert sub(tmp_path, "a$${DB}b${DB}", {"DB": "yes"}) == "a${DB}byes"
    assert sub(tmp_path, "cost$$5", {}) == "cost$$5"  # only "$${" is an escape


def test_substituted_values_are_not_expanded_again(tmp_path: Path) -> None:
    assert sub(tmp_path, "${DB}", {"DB": "${OTHER}", "OTHER": "x"}) == "${OTHER}"


def test_substituted_values_cannot_inject_yaml(tmp_path: Path) -> None:
    value = "x\nsinks: [{sink_id: evil}]\ntables: [a]"
    path = write(tmp_path, MINIMAL.replace("database: shop", "database: ${DB}"))
    config = load_pipeline(path, env={"DB": value})
    assert config.source.database == value
    assert config.sinks == []


def test_substituted_values_are_coerced(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        transport_mode: ${MODE}
        health_port: ${PORT}
        health_enabled: ${HEALTH}
        retry:
          multiplier: ${MULT:-1.5}
        """,
        "platform.yaml",
    )
    config = load_platform(path, env={"MODE": "direct", "PORT": "9090", "HEALTH": "false"})
    assert config.health_port == 9090
    assert config.health_enabled is False
    assert config.retry.multiplier == 1.5


def test_substituted_value_of_the_wrong_type_names_the_field(tmp_path: Path) -> None:
    err = platform_error(tmp_path, "health_port: ${PORT}\n", env={"PORT": "http"})
    assert str(err) == f"{err.file}:1: health_port: Input should be a valid integer, got 'http'"


def test_empty_variable_in_an_optional_field_means_unset(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        MINIMAL.replace("  database: shop\n", "  database: shop\n  slot_name: ${SLOT:-}\n"),
    )
    assert load_pipeline(path, env={}).source.slot_name is None
    assert load_pipeline(path, env={"SLOT": "mine"}).source.slot_name == "mine"


def test_empty_variable_as_port_means_the_default(tmp_path: Path) -> None:
    path = write(
        tmp_path, MINIMAL.replace("  database: shop\n", "  database: shop\n  port: ${P:-}\n")
    )
    assert load_pipeline(path, env={}).source.port == 5432
    assert load_pipeline(path, env={"P": "6543"}).source.port == 6543


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("${1BAD}", "invalid variable reference '${1BAD}'"),
        ("${A-b}", "invalid variable reference '${A-b}'"),
        ("${}", "invalid variable reference '${}'"),
        ("${OPEN", "unterminated '${'"),
        ('"${A:-${B}}"', "nested reference"),
    ],
)
def test_malformed_references(tmp_path: Path, value: str, fragment: str) -> None:
    err = pipeline_error(tmp_path, MINIMAL.replace("database: shop", f"database: {value}"))
    assert only(err).path == "source.database"
    assert fragment in only(err).message


def test_keys_are_not_substituted(tmp_path: Path) -> None:
    err = pipeline_error(tmp_path, MINIMAL + "${KEY}: 1\n", env={"KEY": "topic_prefix"})
    assert only(err).message.startswith("unknown key '${KEY}'")


def test_substitution_in_lists_and_dict_values(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        pipeline_id: p
        source:
          database: shop
          tables: ["${SCHEMA}.orders", "${SCHEMA}.items"]
        sinks:
          - sink_id: hook
            sink_type: webhook
            webhook:
              url: https://${HOOK_HOST}/cdc
              headers: {Authorization: "Bearer ${TOKEN}"}
        """,
    )
    config = load_pipeline(path, env={"SCHEMA": "sales", "HOOK_HOST": "h.example", "TOKEN": "t"})
    assert config.source.tables == ["sales.orders", "sales.items"]
    hook = config.sinks[0].webhook
    assert hook is not None
    assert hook.url == "https://h.example/cdc"
    assert hook.headers == {"Authorization": "Bearer t"}


# --------------------------------------------------------------------------- YAML details


def test_scalars_stay_as_written_for_string_fields(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        pipeline_id: p
        source:
          database: 2024-01-01
          username: yes
          password: 0123
          tables: [public.orders]
        """,
    )
    source = load_pipeline(path, env={}).source
    assert (source.database, source.username, source.password) == ("2024-01-01", "yes", "0123")


def test_quoted_null_is_a_string(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("database: shop", 'database: "null"'))
    assert load_pipeline(path, env={}).source.database == "null"


def test_empty_section_means_defaults(tmp_path: Path) -> None:
    config = load_platform(write(tmp_path, "transport_mode: kafka\nkafka:\nretry:\n"), env={})
    assert config.kafka.bootstrap_servers == "localhost:9092"
    assert config.retry.max_attempts == 5


def test_aliases_share_a_mapping() -> None:
    text = textwrap.dedent(
        """\
        pipeline_id: p
        source:
          database: shop
          tables: [public.orders]
        sinks:
          - sink_id: a
            sink_type: postgres
            postgres: &pg
              host: db
              database: replica
          - sink_id: b
            sink_type: postgres
            postgres: *pg
        """
    )
    config = loads_pipeline(text, env={})
    assert config.sinks[0].postgres == config.sinks[1].postgres
    assert config.sinks[1].postgres is not None and config.sinks[1].postgres.host == "db"


def test_a_key_holding_only_an_anchor_is_still_unknown(tmp_path: Path) -> None:
    err = pipeline_error(tmp_path, "x-defaults: &d {host: db}\n" + MINIMAL)
    assert (only(err).path, only(err).line) == ("x-defaults", 1)
    assert only(err).message.startswith("unknown key 'x-defaults'")


def test_merge_keys_resolve(tmp_path: Path) -> None:
    text = textwrap.dedent(
        """\
        pipeline_id: p
        source: &src
          database: shop
          tables: [public.orders]
        sinks:
          - sink_id: a
            sink_type: postgres
            postgres:
              <<: [{host: db, database: one}, {database: two, port: 7}]
              port: 6000
        """
    )
    config = loads_pipeline(text, env={})
    pg = config.sinks[0].postgres
    assert pg is not None
    assert (pg.host, pg.database, pg.port) == ("db", "one", 6000)


def test_merge_key_error_lines_point_at_the_merging_mapping(tmp_path: Path) -> None:
    text = (
        "pipeline_id: p\nsource:\n  database: shop\n  tables: [public.orders]\nsinks:\n"
        "  - sink_id: a\n    sink_type: postgres\n    postgres:\n      <<: {port: x}\n"
        "      database: d\n"
    )
    err = pipeline_error(tmp_path, text)
    assert only(err).path == "sinks[0].postgres.port"
    assert only(err).line == 9


def test_unsupported_tag(tmp_path: Path) -> None:
    err = pipeline_error(tmp_path, MINIMAL.replace("database: shop", "database: !vault shop"))
    assert "unsupported YAML tag" in only(err).message
    assert only(err).line == 3


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + MINIMAL.encode())
    assert load_pipeline(path, env={}).pipeline_id == "orders-cdc"


def test_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_bytes(MINIMAL.encode() + b"# \xff\n")
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        load_pipeline(path, env={})


def test_reconnect_backoff_must_not_shrink(tmp_path: Path) -> None:
    err = platform_error(
        tmp_path,
        """\
        wal_reader:
          reconnect_initial_seconds: 5
          reconnect_max_seconds: 1
        """,
    )
    problem = only(err)
    assert problem.path == "wal_reader.reconnect_max_seconds"
    assert problem.line == 3
    assert "below reconnect_initial_seconds 5" in problem.message
