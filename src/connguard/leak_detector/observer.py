"""The server-side view: client backends of this run's database, read from pg_stat_activity.

The observer holds its own synchronous psycopg connection. It never touches the event loop of
the code under test (an async observer would have to share that loop, or block inside it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

# Only client backends of our database; our own connection is excluded by pid. Other xdist
# workers use their own database, so the datname filter already keeps them out.
_QUERY = (
    "SELECT pid, state, backend_start, client_port, query, application_name "
    "FROM pg_stat_activity "
    "WHERE datname = %s AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
)


@dataclass(frozen=True)
class Backend:
    """One row of pg_stat_activity."""

    pid: int
    state: str | None
    backend_start: datetime | None
    client_port: int | None
    query: str | None
    application_name: str | None


class ObserverError(RuntimeError):
    """The observer could not connect or query; the message says why."""


class Observer:
    def __init__(self, url: str, dbname: str) -> None:
        import psycopg

        self.dbname = dbname
        try:
            # Autocommit is essential: inside a transaction PostgreSQL freezes the first
            # pg_stat_activity snapshot it hands out, so later reads would never see a
            # connection open or close.
            self._conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.Error as error:
            raise ObserverError(f"cannot connect the observer: {error}".strip()) from None
        self.pid = self._conn.info.backend_pid
        self.last: dict[int, Backend] | None = None
        self.broken: str | None = None

    def snapshot(self) -> dict[int, Backend]:
        """The client backends now; empty from the first failure on (see `broken`)."""
        if self.broken is not None:
            return {}
        try:
            rows = self._conn.execute(_QUERY, (self.dbname,), prepare=True).fetchall()
        except Exception as error:  # the server went away: the ledger still decides alone
            self.broken = f"{type(error).__name__}: {error}".strip()
            self.last = {}
            return {}
        self.last = {row[0]: Backend(*row) for row in rows}
        return self.last

    def wait_gone(self, pids: set[int], budget: float = 0.2) -> dict[int, Backend]:
        """Poll until none of `pids` is listed or `budget` seconds pass.

        A backend whose client just closed lingers for a few milliseconds while it exits;
        polling only while such pids remain keeps a clean test at one query.
        """
        deadline = time.monotonic() + budget
        current = self.snapshot()
        delay = 0.002
        while pids & current.keys() and time.monotonic() < deadline and not self.broken:
            time.sleep(delay)
            delay = min(delay * 2, 0.02)
            current = self.snapshot()
        return current

    def close(self) -> None:
        try:
            self._conn.close()
        except Exception:
            pass


def describe_state(backend: Any) -> str:
    return backend.state or "unknown"
