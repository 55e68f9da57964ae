"""The url backend against a server this test session starts, and auto's choice and failure."""

from __future__ import annotations

import json
import os
import time

import pytest
from provision_helpers import (
    CONFTEST_RECORDING_URL,
    TEST_FIXTURES_WORK,
    TEST_WAITS,
    databases,
    run_pytest,
    start_waiting_run,
)

from connguard.leak_detector.provision import make_url
from connguard.leak_detector.provision.local import LocalProvider, find_bindir

PASSWORD = "s3cret-pw"


@pytest.fixture(scope="module")
def server_url():
    """An existing server with a password and a database of someone else's."""
    if find_bindir()[0] is None:
        pytest.skip("no PostgreSQL server binaries on this machine")
    import psycopg

    provider = LocalProvider()
    server = provider.start()
    try:
        with psycopg.connect(server.url, autocommit=True) as conn:
            conn.execute(f"ALTER ROLE postgres PASSWORD '{PASSWORD}'")
            conn.execute("CREATE DATABASE someone_elses")
        port = int(server.url.rsplit(":", 1)[1].split("/")[0])
        yield make_url("postgres", PASSWORD, "127.0.0.1", port, "postgres")
    finally:
        provider.stop()


def test_url_backend_creates_and_drops_only_its_own_database(pytester, server_url):
    pytester.makeconftest(CONFTEST_RECORDING_URL)
    pytester.makepyfile(test_fixtures=TEST_FIXTURES_WORK)
    before = databases(server_url)
    result = run_pytest(
        pytester.path, "--leak-check", "--leak-check-db=url", "--leak-check-url-env=DATABASE_URL",
        "-v", "-s", env={"CONNGUARD_DATABASE_URL": server_url},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 passed" in result.stdout
    assert "BACKEND url DB connguard_" in result.stdout
    assert databases(server_url) == before
    assert "someone_elses" in before


def test_password_never_printed(pytester, server_url):
    pytester.makepyfile("def test_fail(connguard_database):\n    assert False\n")
    result = run_pytest(
        pytester.path, "--leak-check", "-v", env={"CONNGUARD_DATABASE_URL": server_url}
    )
    assert result.returncode == 1
    header = [line for line in result.stdout.splitlines() if line.startswith("connguard:")]
    assert header and "backend url" in header[0]
    assert "postgres:***@127.0.0.1" in header[0]
    assert PASSWORD not in result.stdout + result.stderr


def test_auto_prefers_the_url(pytester, server_url):
    pytester.makepyfile("def test_ok(connguard_database):\n    pass\n")
    result = run_pytest(pytester.path, env={
        "CONNGUARD_LEAK_CHECK": "1", "CONNGUARD_DATABASE_URL": server_url
    })  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "backend url" in result.stdout


def test_unreachable_url_is_one_line_without_the_password(pytester):
    pytester.makepyfile("def test_ok(connguard_database):\n    pass\n")
    url = "postgresql://someone:hunter2@127.0.0.1:1/postgres"
    result = run_pytest(pytester.path, "--leak-check", "--leak-check-db=url",
                        f"--leak-check-db-url={url}")  # fmt: skip
    assert result.returncode == 4
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1
    assert "the url backend failed: cannot connect to postgresql://someone:***@" in errors[0]
    assert "hunter2" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_auto_fails_with_one_message_naming_every_backend(pytester):
    pytester.makepyfile("def test_ok(connguard_database):\n    pass\n")
    started = time.monotonic()
    result = run_pytest(
        pytester.path, "--leak-check", "--leak-check-pg-bindir=/nonexistent/bin",
        env={"DOCKER_HOST": "unix:///nonexistent/docker.sock"},
    )  # fmt: skip
    assert time.monotonic() - started < 30  # a missing engine must not hang the run
    assert result.returncode == 4, result.stdout + result.stderr
    message = result.stderr[result.stderr.index("ERROR: connguard: no PostgreSQL") :]
    assert "url: no URL given (--leak-check-db-url or CONNGUARD_DATABASE_URL)" in message
    assert "container: " in message
    assert "local: no postgres and initdb in /nonexistent/bin" in message
    assert "Traceback" not in result.stderr


def test_container_backend_without_engine_fails_fast(pytester):
    pytester.makepyfile("def test_ok(connguard_database):\n    pass\n")
    started = time.monotonic()
    result = run_pytest(
        pytester.path, "--leak-check", "--leak-check-db=container",
        env={"DOCKER_HOST": "unix:///nonexistent/docker.sock"},
    )  # fmt: skip
    assert time.monotonic() - started < 30
    assert result.returncode == 4
    assert "the container backend failed: no Docker engine answers" in result.stderr


def test_kill_9_leaves_a_database_the_next_run_drops(pytester, server_url):
    pytester.makepyfile(test_waits=TEST_WAITS)
    started = pytester.path / "started.json"
    process = start_waiting_run(
        pytester.path, started, "--leak-check-db=url", extra={"CONNGUARD_DATABASE_URL": server_url}
    )
    facts = json.loads(started.read_text())
    process.kill()
    process.communicate(timeout=30)
    assert facts["dbname"] in databases(server_url)  # nobody dropped it

    (pytester.path / "test_waits.py").unlink()
    pytester.makepyfile(test_next="def test_next(connguard_database):\n    pass\n")
    result = run_pytest(pytester.path, "--leak-check", env={"CONNGUARD_DATABASE_URL": server_url})
    assert result.returncode == 0, result.stdout + result.stderr
    assert facts["dbname"] not in databases(server_url)
    assert "someone_elses" in databases(server_url)


def test_xdist_workers_get_a_database_each_on_the_url_server(pytester, server_url, tmp_path):
    pytester.makepyfile(
        """
        import os
        from pathlib import Path
        import pytest

        @pytest.mark.parametrize("n", range(4))
        def test_where(n, connguard_database):
            out = Path(os.environ["OUT_DIR"]) / os.environ["PYTEST_XDIST_WORKER"]
            out.write_text(connguard_database.dbname)
        """
    )
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    before = databases(server_url)
    result = run_pytest(
        pytester.path, "-n", "2", "--leak-check", "--leak-check-db=url",
        env={"CONNGUARD_DATABASE_URL": server_url, "OUT_DIR": str(out_dir)},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    names = {path.read_text() for path in out_dir.iterdir()}
    assert len(names) == 2 and all(name.startswith("connguard_") for name in names)
    assert databases(server_url) == before


def test_a_role_without_createdb_is_one_line_naming_what_it_needs(pytester, server_url):
    import psycopg

    role = f"no_createdb_{os.getpid()}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw' NOCREATEDB")
    try:
        pytester.makepyfile("def test_ok(connguard_database):\n    pass\n")
        url = server_url.replace(f"postgres:{PASSWORD}@", f"{role}:pw@")
        result = run_pytest(pytester.path, "--leak-check", "--leak-check-db=url",
                            f"--leak-check-db-url={url}")  # fmt: skip
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f"DROP ROLE {role}")
    assert result.returncode == 4, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1
    assert "the url backend failed: cannot create database connguard_" in errors[0]
    assert "permission denied to create database" in errors[0]
    assert f"ALTER ROLE {role} CREATEDB" in errors[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("given", ["option", "env"])
def test_auto_does_not_replace_a_url_it_was_given(pytester, given):
    pytester.makepyfile("def test_ok(connguard_database):\n    pass\n")
    url = "postgresql://someone:hunter2@127.0.0.1:1/postgres"
    args, env = ("--leak-check",), {}
    if given == "option":
        args += (f"--leak-check-db-url={url}",)
    else:
        env["CONNGUARD_DATABASE_URL"] = url
    result = run_pytest(pytester.path, *args, env=env)
    explicit = run_pytest(pytester.path, "--leak-check", "--leak-check-db=url",
                          f"--leak-check-db-url={url}")  # fmt: skip
    assert result.returncode == 4, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR:")]
    assert errors == [line for line in explicit.stderr.splitlines() if line.startswith("ERROR:")]
    assert "the url backend failed: cannot connect to postgresql://someone:***@" in errors[0]
    assert "hunter2" not in result.stdout + result.stderr
    assert "backend local" not in result.stdout
