"""How the PostgreSQL sink classifies a failure: retry the batch later (connection trouble,
an operator's fix), or isolate and dead-letter the events the server rejects."""

from __future__ import annotations

from typing import Final

import psycopg

# Not about any one event, and fixed by an operator rather than by dropping data: retry the
# batch (with backoff) instead of dead-lettering everything it touches.
_RETRY_SERVER_ERRORS: Final = (
    psycopg.errors.InsufficientPrivilege,
    psycopg.errors.ReadOnlySqlTransaction,
)


def is_transient(exc: BaseException) -> bool:
    """Connection-level trouble (or a setup problem): worth retrying the whole batch later."""
    return isinstance(exc, (psycopg.OperationalError, OSError, TimeoutError, *_RETRY_SERVER_ERRORS))


def is_data_error(exc: BaseException) -> bool:
    """The server rejected what we sent (a value, a constraint, the target's shape)."""
    return isinstance(exc, psycopg.DatabaseError) and not is_transient(exc)


def describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    sqlstate = getattr(exc, "sqlstate", None)
    name = type(exc).__name__
    return f"{name} [{sqlstate}]: {text}" if sqlstate else f"{name}: {text}"
