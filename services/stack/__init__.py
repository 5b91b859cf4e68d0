"""Local stack launchers: real servers on 127.0.0.1 for tests and the demo (no Docker needed)."""

from services.stack.postgres import PostgresServer, find_postgres_bin_dir

__all__ = ["PostgresServer", "find_postgres_bin_dir"]
