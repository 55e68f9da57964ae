"""Helpers for the provisioning tests: run pytest in a subprocess, look for what a run left."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REGISTRY = Path(tempfile.gettempdir()) / f"connguard-{os.getuid()}"
TEST_IMAGE = os.environ.get("CONNGUARD_TEST_IMAGE", "connguard/postgres-local:15")

# A project's conftest that records what the environment held when conftests were imported.
CONFTEST_RECORDING_URL = """
import os
URL_AT_IMPORT = os.environ.get("DATABASE_URL")
"""

# Real queries through both drivers and both SQLAlchemy forms.
TEST_FIXTURES_WORK = """
import asyncio, os
import conftest

def test_psycopg(connguard_database, connguard_server):
    import psycopg
    with psycopg.connect(connguard_database.url) as conn:
        db, app = conn.execute(
            "select current_database(), current_setting('application_name')").fetchone()
    assert db == connguard_database.dbname
    assert app == connguard_database.application_name
    assert connguard_server.version.split(".")[0].isdigit()
    print("BACKEND", connguard_server.backend, "DB", db)
    print("CONTAINER", connguard_server.details.get("container_id"))

def test_asyncpg(connguard_database):
    import asyncpg
    async def main():
        conn = await asyncpg.connect(connguard_database.url)
        try:
            return await conn.fetchval("select current_database()")
        finally:
            await conn.close()
    assert asyncio.run(main()) == connguard_database.dbname

def test_sqlalchemy(connguard_database):
    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import create_async_engine
    engine = sa.create_engine(connguard_database.sqlalchemy_url("psycopg"))
    with engine.connect() as conn:
        assert conn.scalar(sa.text("select current_database()")) == connguard_database.dbname
    engine.dispose()
    async def main():
        engine = create_async_engine(connguard_database.sqlalchemy_url("asyncpg"))
        async with engine.connect() as conn:
            name = await conn.scalar(sa.text("select current_database()"))
        await engine.dispose()
        return name
    assert asyncio.run(main()) == connguard_database.dbname

def test_url_env_set_before_conftest(connguard_database):
    assert conftest.URL_AT_IMPORT == connguard_database.plain_url
    assert os.environ["DATABASE_URL"] == connguard_database.plain_url
"""

# The test announces where its server lives, then waits to be interrupted.
TEST_WAITS = """
import json, os, time
from pathlib import Path

def test_wait(connguard_server, connguard_database):
    details = connguard_server.details
    Path(os.environ["STARTED_FILE"]).write_text(json.dumps({
        "pid": os.getpid(), "root": details.get("socket_dir"), "dbname": connguard_database.dbname,
        "container_id": details.get("container_id")}))
    time.sleep(60)
"""


def run_pytest(project: Path, *args: str, env: dict | None = None, timeout: float = 120):
    """Run pytest on `project` in a fresh interpreter; returns the CompletedProcess."""
    full_env = dict(os.environ)
    for name in list(full_env):
        if name.startswith(("CONNGUARD_LEAK_CHECK", "PYTEST_XDIST", "PYTEST_ADDOPTS")):
            del full_env[name]
    full_env.pop("CONNGUARD_DATABASE_URL", None)
    full_env.pop("DATABASE_URL", None)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:randomly", *args],
        cwd=project,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def records() -> list[dict]:
    found = []
    for path in REGISTRY.glob("*.json"):
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return found


def records_of(pid: int) -> list[dict]:
    return [record for record in records() if int(record.get("owner_pid", 0)) == pid]


def postgres_processes_under(root: str) -> list[int]:
    """Pids of running postgres processes whose command line names a path under `root`."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            argv
            and argv[0].endswith(b"postgres")
            and any(arg.startswith(root.encode()) for arg in argv)
        ):
            pids.append(int(proc.name))
    return pids


def connguard_temp_dirs() -> set[str]:
    from connguard.leak_detector.provision.local import scratch_root

    roots = {scratch_root(), tempfile.gettempdir()}
    return {str(path) for root in roots for path in Path(root).glob("connguard-pg-*")}


def databases(admin_url: str) -> set[str]:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        return {row[0] for row in conn.execute("select datname from pg_database")}


def start_waiting_run(project: Path, started: Path, *args: str, extra: dict | None = None):
    """Start pytest --leak-check on a project whose test writes `started` and then sleeps."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONNGUARD_")}
    env = {**env, **(extra or {})}
    env["STARTED_FILE"] = str(started)
    process = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--leak-check", "-q", *args],
        cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not started.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail("the inner run did not reach its test:\n" + process.communicate()[0])
        time.sleep(0.05)
    time.sleep(0.05)  # the file is written before the write returns; let it land
    return process


class LoopbackProxy:
    """A TCP forwarder on 127.0.0.1 to a server's port, as a connection pooler or a container's
    published port would stand between the client and PostgreSQL: the server's backends then
    name the proxy's ports, not the client's. A context manager; `url` is the server's URL
    rewritten to go through it."""

    def __init__(self, server_url: str) -> None:
        import socket
        from urllib.parse import urlsplit

        port = urlsplit(server_url).port
        self._target = ("127.0.0.1", port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = server_url.replace(f":{port}/", f":{self._listener.getsockname()[1]}/")
        self._sockets: list = []

    def __enter__(self) -> LoopbackProxy:
        import threading

        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._listener.close()
        for sock in self._sockets:
            sock.close()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            server = socket.create_connection(self._target)
            self._sockets += (client, server)
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source, sink) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(2)  # SHUT_RDWR: the other side sees the end too
                except OSError:
                    pass
