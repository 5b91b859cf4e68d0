"""The source side of PostgreSQL: logical replication (pgoutput) read as an `EventSource`,
the initial snapshot and backfills, the slot and publication lifecycle, the slot monitor."""
