"""The sink side of PostgreSQL: a `SinkWriter` that upserts (or appends) rows, idempotent
by the applied position per lane, with schema evolution and dead letters."""
