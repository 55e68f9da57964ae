"""Creating and dropping the run's databases, and reaping what a killed run left behind.

Every server, temporary directory, container and database a run creates is recorded as a small
JSON file in one registry directory, with the owning process (pid and start time, since pids are
reused, and its PID namespace). A later run reaps records whose owner is gone. psycopg is
imported only when a database is touched, so the plugin stays import-free without --leak-check.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

from . import ProvisionError, database_of, first_line, mask_password, with_database

DATABASE_RECORD_TTL = 7 * 24 * 3600  # seconds

# -- databases


def connect_admin(url: str, timeout: float = 5.0):
    """A sync autocommit connection (CREATE/DROP DATABASE refuse to run in a transaction)."""
    import psycopg

    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=max(1, int(timeout)))
    except psycopg.Error as error:
        raise ProvisionError(
            f"cannot connect to {mask_password(url)}: {first_line(error)}"
        ) from None


def server_facts(url: str) -> tuple[str, int]:
    """(server_version, max_connections) of the server at `url`."""
    with connect_admin(url) as conn:
        version = conn.execute("SHOW server_version").fetchone()[0].split()[0]
        max_connections = int(conn.execute("SHOW max_connections").fetchone()[0])
    return version, max_connections


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def create_database(admin_url: str, dbname: str, template: str | None = None) -> None:
    with connect_admin(admin_url) as conn:
        sql = f"CREATE DATABASE {_ident(dbname)}"
        if template:
            sql += f" TEMPLATE {_ident(template)}"
        import psycopg

        try:
            conn.execute(sql)
        except psycopg.errors.InsufficientPrivilege as error:
            # The url backend's usual stumble: a CI service's app role made without CREATEDB.
            role = conn.info.user
            raise ProvisionError(
                f"cannot create database {dbname}: {first_line(error)}; connguard creates a "
                f"database per run, so the role {role} needs CREATEDB "
                f"(ALTER ROLE {role} CREATEDB)"
            ) from None
        except psycopg.Error as error:
            raise ProvisionError(f"cannot create database {dbname}: {first_line(error)}") from None


def drop_databases(admin_url: str, dbnames: list[str]) -> None:
    """Drop these databases, disconnecting whoever still uses them. Missing ones are fine."""
    if not dbnames:
        return
    with connect_admin(admin_url) as conn:
        version = conn.info.server_version
        for dbname in dbnames:
            if version >= 130000:
                conn.execute(f"DROP DATABASE IF EXISTS {_ident(dbname)} WITH (FORCE)")
                continue
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (dbname,),
            )
            conn.execute(f"DROP DATABASE IF EXISTS {_ident(dbname)}")


# -- the registry of things a run created


def registry_dir() -> Path:
    path = Path(tempfile.gettempdir()) / f"connguard-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        if os.path.isdir("/proc/self"):
            return None
        # No procfs (macOS): liveness only, so a reused pid keeps a record until it exits.
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "alive"
    # The command name may hold spaces and parentheses; fields resume after the last ")".
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_namespace() -> str | None:
    """This process's PID namespace ("pid:[4026531836]"), where the kernel tells it."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def owner_alive(record: dict) -> bool:
    ours = _pid_namespace()
    if record.get("owner_pidns", ours) != ours:
        # Its pid means another process here, or none: from this namespace (a container's,
        # say, sharing the temporary directory) the owner cannot be told dead.
        return True
    start = process_start(int(record["owner_pid"]))
    return start is not None and start == record.get("owner_start")


def register(tag: str, **facts) -> Path:
    """Record something this process owns; returns the record's path (remove it when done)."""
    record = {
        "owner_pid": os.getpid(),
        "owner_start": process_start(os.getpid()),
        "owner_pidns": _pid_namespace(),
        **facts,
    }
    path = registry_dir() / f"{tag}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(path)
    return path


def unregister(path: Path | None) -> None:
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def stale_records() -> list[tuple[Path, dict]]:
    found = []
    for path in sorted(registry_dir().glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not owner_alive(record):
            found.append((path, record))
    return found


def reap_stale(*, admin_url: str | None = None) -> list[str]:
    """Remove what dead runs left: postgres processes, temp dirs, containers, databases.

    Databases on a server are dropped only when `admin_url` reaches that same host and port.
    Returns one line per thing reaped (for tests and debugging).
    """
    reaped: list[str] = []
    for path, record in stale_records():
        kind = record.get("kind")
        try:
            if kind == "local":
                reaped += _reap_local(record)
            elif kind == "container":
                reaped += _reap_container(record)
            elif kind == "database":
                if time.time() - path.stat().st_mtime > DATABASE_RECORD_TTL:
                    pass  # that server is long gone or never seen again; forget it
                elif admin_url is None or record.get("server") != server_identity(admin_url):
                    continue
                else:
                    drop_databases(admin_url, [record["dbname"]])
                    reaped.append(f"database {record['dbname']}")
        except (ProvisionError, OSError):
            continue  # keep the record; a later run with the engine or server up retries
        unregister(path)
    return reaped


def server_identity(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 5432}"


def _reap_local(record: dict) -> list[str]:
    reaped = []
    data_dir = Path(record["data_dir"])
    pid = _postmaster_pid(data_dir)
    if pid is not None and _is_postmaster_of(pid, data_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGQUIT)  # immediate shutdown: nothing in it is worth keeping
        deadline = time.monotonic() + 5
        while process_start(pid) is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        with contextlib.suppress(ProcessLookupError):
            if process_start(pid) is not None:
                os.kill(pid, signal.SIGKILL)
        reaped.append(f"postgres pid {pid}")
    root = Path(record["root"])
    if root.exists():
        shutil.rmtree(root, ignore_errors=True)
        reaped.append(f"directory {root}")
    return reaped


def _postmaster_pid(data_dir: Path) -> int | None:
    try:
        return int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def _is_postmaster_of(pid: int, data_dir: Path) -> bool:
    # The pid in a stale postmaster.pid may belong to an unrelated process by now.
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(arg == os.fsencode(str(data_dir)) for arg in cmdline) and any(
        arg.endswith(b"postgres") for arg in cmdline[:1]
    )


def _reap_container(record: dict) -> list[str]:
    from .container import remove_container

    remove_container(record["container_id"], docker_host=record.get("docker_host"))
    if record.get("log_dir"):
        shutil.rmtree(record["log_dir"], ignore_errors=True)
    return [f"container {record['container_id'][:12]}"]


def database_facts(url: str) -> tuple[str, str]:
    """(server identity, database name) for a database URL."""
    return server_identity(url), database_of(url)


__all__ = [
    "connect_admin",
    "create_database",
    "drop_databases",
    "reap_stale",
    "register",
    "registry_dir",
    "server_facts",
    "unregister",
    "with_database",
]
