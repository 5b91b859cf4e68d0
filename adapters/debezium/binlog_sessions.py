"""The MySQL / MariaDB half of the connector monitor: log in with the connector's credentials
and list the binlog dump sessions of its user.

Debezium's MySQL connector streams through one replication connection that the server
shows in ``information_schema.PROCESSLIST`` with the command ``Binlog Dump`` (or ``Binlog
Dump GTID`` on MySQL with GTIDs). Every user sees its own sessions there without the
PROCESS privilege, so the connector's login is enough. A session of another client logged
in as the same user (a second pipeline, a replica) counts as well: give each pipeline its
own user for the check to be exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import pymysql

_QUERY = """
SELECT ID, HOST, COMMAND, TIME
FROM information_schema.PROCESSLIST
WHERE USER = %s AND COMMAND IN ('Binlog Dump', 'Binlog Dump GTID')
ORDER BY ID
"""


@dataclass(frozen=True, slots=True)
class BinlogSession:
    id: int
    host: str  # the client's address and port
    command: str
    seconds: int  # in this state (the dump's idle wait between events included)


class LoginFailed(Exception):
    """The server refused the login or could not be reached; the message is the server's
    (or the driver's for a connection that failed before the server answered)."""


def read_binlog_sessions(
    host: str, port: int, user: str, password: str, *, timeout: float = 5.0
) -> list[BinlogSession]:
    """The binlog dump sessions of `user`, on a connection of its own. Blocking; raises
    LoginFailed."""
    try:
        conn = pymysql.connect(
            host=host,
            port=port,
            user=user,
            password=password,
            connect_timeout=timeout,
            read_timeout=timeout,
            write_timeout=timeout,
        )
    except pymysql.MySQLError as exc:
        raise LoginFailed(_describe(exc)) from exc
    try:
        with conn.cursor() as cursor:
            cursor.execute(_QUERY, (user,))
            rows = cursor.fetchall()
    except pymysql.MySQLError as exc:
        raise LoginFailed(_describe(exc)) from exc
    finally:
        conn.close()
    return [BinlogSession(int(r[0]), str(r[1]), str(r[2]), int(r[3] or 0)) for r in rows]


def _describe(exc: pymysql.MySQLError) -> str:
    """``Access denied for user 'cdc'@'localhost' (using password: YES) (MySQL error 1045)``
    rather than the driver's tuple."""
    if len(exc.args) == 2 and isinstance(exc.args[0], int):
        code, message = exc.args
        return f"{message} (MySQL error {code})"
    return str(exc) or type(exc).__name__
