"""What the PostgreSQL sink knows about a target table, and the statements it writes a
table's changes with (built once per table shape, reused every batch): the staging table,
COPY, the set-based delete / upsert / fill of unchanged values, the change-log COPY."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from psycopg import sql

from domain.events import TableSchema

# Leading columns of a change-log table (append mode), before the row's own columns.
APPEND_META: Final[tuple[tuple[str, str], ...]] = (
    ("_op", "text"),
    ("_partition", "text"),
    ("_position_major", "numeric(20,0)"),
    ("_position_minor", "bigint"),
    ("_commit_time", "timestamp with time zone"),
    ("_unchanged", "text[]"),
    ("_before", "jsonb"),
)


@dataclass(frozen=True, slots=True)
class Target:
    """A target table as the catalog describes it."""

    relname: str
    casts: dict[str, str]  # column -> its base type, qualified and quoted (no typmod)
    key: frozenset[str]  # primary key columns (empty: no primary key)
    types: dict[str, tuple[int, int]] = field(default_factory=dict)  # (type oid, typmod)
    declared: dict[str, str] = field(default_factory=dict)  # format_type() for messages
    followed: dict[str, str] = field(default_factory=dict)  # column -> recorded source type


@dataclass(frozen=True, slots=True)
class SinkType:
    """How a source type name is stored in this database: the DDL to declare a column of it
    (the name itself, or text when the database does not know it), the type and typmod a
    column declared so has, and the base type to cast to (qualified, quoted, no typmod)."""

    ddl: str
    oid: int
    typmod: int
    base: str


TEXT_TYPE: Final = SinkType("text", 25, -1, "pg_catalog.text")


@dataclass(slots=True)
class Plan:
    """How the events of one TableSchema are written (built once, reused every batch)."""

    schema: TableSchema
    append: bool
    relname: str
    target: sql.Identifier
    ncols: int
    key_idx: tuple[int, ...] = ()
    error: str | None = None  # set: every event of this schema is dead-lettered with it
    stage: str = ""
    create_stage: sql.Composed | None = None
    truncate_stage: sql.Composed | None = None
    copy_stage: sql.Composed | None = None
    delete_sql: sql.Composed | None = None
    insert_sql: sql.Composed | None = None
    insert_distinct_sql: sql.Composed | None = None  # staging rows are one per key
    truncate_target: sql.Composed | None = None
    copy_append: sql.Composed | None = None
    fill_template: tuple[sql.Composed, ...] = ()  # per column: its SET clause
    fill_where: sql.Composed | None = None
    fill_cache: dict[frozenset[int], sql.Composed] = field(default_factory=dict)

    def fill_sql(self, columns: frozenset[int]) -> sql.Composed:
        """UPDATE of the staging rows: stored values for the columns the source omitted."""
        query = self.fill_cache.get(columns)
        if query is None:
            assert self.fill_where is not None
            sets = sql.SQL(", ").join(self.fill_template[i] for i in sorted(columns))
            query = sql.SQL("UPDATE {} s SET {} FROM {} o WHERE {}").format(
                sql.Identifier("pg_temp", self.stage), sets, self.target, self.fill_where
            )
            self.fill_cache[columns] = query
        return query


Plans = dict[int, Plan]  # by id() of the TableSchema objects of the batch at hand


def plan_upsert(plan: Plan, target: Target) -> None:
    """The statements of an upserted table: staging, delete, insert, fill."""
    schema = plan.schema
    n = plan.ncols
    key_idx = tuple(i for i, c in enumerate(schema.columns) if c.is_key)
    plan.key_idx = key_idx
    plan.stage = f"_cdc_stage_{n}_{len(key_idx)}"
    stage = sql.Identifier("pg_temp", plan.stage)
    c = [sql.Identifier(f"c{i + 1}") for i in range(n)]
    o = [sql.Identifier(f"o{j + 1}") for j in range(len(key_idx))]
    names = [sql.Identifier(col.name) for col in schema.columns]
    casts = [sql.SQL(target.casts[col.name]) for col in schema.columns]
    comma = sql.SQL(", ")

    stage_columns: list[sql.Composable] = [sql.SQL("_seq bigint, _op text, _unchanged int[]")]
    stage_columns += [sql.SQL("{} text").format(x) for x in (*c, *o)]
    plan.create_stage = sql.SQL(
        "CREATE TEMP TABLE IF NOT EXISTS {} ({}) ON COMMIT DELETE ROWS"
    ).format(sql.Identifier(plan.stage), comma.join(stage_columns))
    plan.truncate_stage = sql.SQL("TRUNCATE {}").format(stage)
    plan.copy_stage = sql.SQL("COPY {} (_seq, _op, _unchanged, {}) FROM STDIN").format(
        stage, comma.join([*c, *o])
    )
    plan.truncate_target = sql.SQL("TRUNCATE {}").format(plan.target)

    # Casting to the base type (no typmod) leaves the typmod to the assignment into the
    # column: a too long varchar fails instead of being cut, as an explicit cast would.
    plan.delete_sql = sql.SQL("DELETE FROM {} t USING {} s WHERE s._op = 'd' AND {}").format(
        plan.target,
        stage,
        sql.SQL(" AND ").join(
            sql.SQL("t.{} = s.{}::{}").format(names[i], c[i], casts[i]) for i in key_idx
        ),
    )
    key_exprs = comma.join(sql.SQL("{}::{}").format(c[i], casts[i]) for i in key_idx)
    non_key = [i for i in range(n) if i not in key_idx]
    on_conflict: sql.Composable
    if non_key:
        on_conflict = sql.SQL("DO UPDATE SET {}").format(
            comma.join(sql.SQL("{} = EXCLUDED.{}").format(names[i], names[i]) for i in non_key)
        )
    else:
        on_conflict = sql.SQL("DO NOTHING")
    # Rows collapsed column-wise have one row per key already: no DISTINCT ON (a sort).
    plan.insert_distinct_sql = sql.SQL(
        "INSERT INTO {target} ({columns}) SELECT {values} FROM {stage} s WHERE _op = 'u'"
        " ON CONFLICT ({key_names}) {on_conflict}"
    ).format(
        target=plan.target,
        columns=comma.join(names),
        values=comma.join(sql.SQL("s.{}::{}").format(c[i], casts[i]) for i in range(n)),
        stage=stage,
        key_names=comma.join(names[i] for i in key_idx),
        on_conflict=on_conflict,
    )
    plan.insert_sql = sql.SQL(
        "INSERT INTO {target} ({columns}) SELECT {values} FROM"
        " (SELECT DISTINCT ON ({keys}) * FROM {stage} WHERE _op = 'u'"
        " ORDER BY {keys}, _seq DESC) s"
        " ON CONFLICT ({key_names}) {on_conflict}"
    ).format(
        target=plan.target,
        columns=comma.join(names),
        values=comma.join(sql.SQL("s.{}::{}").format(c[i], casts[i]) for i in range(n)),
        keys=key_exprs,
        stage=stage,
        key_names=comma.join(names[i] for i in key_idx),
        on_conflict=on_conflict,
    )
    plan.fill_template = tuple(
        sql.SQL(
            "{c} = CASE WHEN {pos} = ANY(s._unchanged) THEN o.{col}::text ELSE s.{c} END"
        ).format(c=c[i], pos=sql.Literal(i + 1), col=names[i])
        for i in range(n)
    )
    plan.fill_where = sql.SQL("s._op = 'u' AND s._unchanged IS NOT NULL AND {}").format(
        sql.SQL(" AND ").join(
            sql.SQL("o.{} = coalesce(s.{}, s.{})::{}").format(names[i], o[j], c[i], casts[i])
            for j, i in enumerate(key_idx)
        )
    )


def plan_append(plan: Plan) -> None:
    """The COPY into a change-log table."""
    columns = [sql.Identifier(name) for name, _ in APPEND_META]
    columns += [sql.Identifier(col.name) for col in plan.schema.columns]
    plan.copy_append = sql.SQL("COPY {} ({}) FROM STDIN").format(
        plan.target, sql.SQL(", ").join(columns)
    )
