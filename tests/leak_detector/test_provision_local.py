"""The local backend: an ephemeral cluster from this machine's PostgreSQL binaries."""

from __future__ import annotations

import json
import os

import pytest
from provision_helpers import (
    CONFTEST_RECORDING_URL,
    TEST_FIXTURES_WORK,
    connguard_temp_dirs,
    postgres_processes_under,
    records_of,
    run_pytest,
)

from connguard.leak_detector.provision.local import find_bindir

pytestmark = pytest.mark.skipif(
    find_bindir()[0] is None, reason="no PostgreSQL server binaries on this machine"
)

# Facts only the server can tell, written where the outer test can read them.
TEST_SERVER_FACTS = """
import json, os, psycopg
from pathlib import Path

def test_server_facts(connguard_server, connguard_database):
    with psycopg.connect(connguard_database.url) as conn:
        show = lambda name: conn.execute("show " + name).fetchone()[0]
        facts = {name: show(name) for name in (
            "listen_addresses", "unix_socket_directories", "fsync", "synchronous_commit",
            "full_page_writes", "max_connections")}
    data_dir = Path(connguard_server.details["data_dir"])
    postmaster = int((data_dir / "postmaster.pid").read_text().split()[0])
    uid = [line for line in Path(f"/proc/{postmaster}/status").read_text().splitlines()
           if line.startswith("Uid:")][0].split()[1]
    facts.update(pytest_pid=os.getpid(), data_dir=str(data_dir), postmaster_uid=int(uid),
                 socket_dir=connguard_server.details["socket_dir"], url=connguard_database.url)
    Path(os.environ["FACTS_FILE"]).write_text(json.dumps(facts))
"""


@pytest.fixture
def project(pytester):
    pytester.makeconftest(CONFTEST_RECORDING_URL)
    pytester.makepyfile(test_fixtures=TEST_FIXTURES_WORK, test_facts=TEST_SERVER_FACTS)
    return pytester.path


def test_fixtures_work_and_the_run_leaves_nothing(project, tmp_path):
    facts_file = tmp_path / "facts.json"
    dirs_before = connguard_temp_dirs()
    result = run_pytest(
        project, "--leak-check", "--leak-check-db=local", "--leak-check-url-env=DATABASE_URL",
        "-v", env={"FACTS_FILE": str(facts_file)},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 passed" in result.stdout
    header = [line for line in result.stdout.splitlines() if line.startswith("connguard:")]
    assert len(header) == 1
    assert "leak check on, backend local" in header[0]
    assert "PostgreSQL 15" in header[0] or "PostgreSQL 1" in header[0]
    assert "mode fail, server proof: connection log, postgresql://" in header[0]

    facts = json.loads(facts_file.read_text())
    assert facts["listen_addresses"] == "127.0.0.1"
    assert facts["unix_socket_directories"] == facts["socket_dir"]
    assert facts["data_dir"].startswith(facts["socket_dir"])
    assert (facts["fsync"], facts["synchronous_commit"], facts["full_page_writes"]) == (
        "off", "off", "off",
    )  # fmt: skip
    if os.geteuid() == 0:
        assert facts["postmaster_uid"] != 0  # initdb and postgres refuse root
    # Nothing left behind: process, directory, registry record.
    assert postgres_processes_under(facts["socket_dir"]) == []
    assert not os.path.exists(facts["socket_dir"])
    assert connguard_temp_dirs() <= dirs_before
    assert records_of(facts["pytest_pid"]) == []


def test_initdb_is_cached_per_server_version(pytester, tmp_path):
    pytester.makepyfile("def test_one(connguard_database): pass\n")
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    cold = run_pytest(pytester.path, "--leak-check", "--leak-check-db=local", env=env)
    assert cold.returncode == 0, cold.stdout + cold.stderr
    assert "initdb cache miss" in cold.stdout
    cached = list((tmp_path / "cache" / "connguard").glob("initdb-*"))
    assert len(cached) == 1 and (cached[0] / "PG_VERSION").is_file()
    warm = run_pytest(pytester.path, "--leak-check", "--leak-check-db=local", env=env)
    assert warm.returncode == 0, warm.stdout + warm.stderr
    assert "initdb cache hit" in warm.stdout


def test_ini_turns_it_on_and_names_the_url_variable(pytester):
    pytester.makeini("[pytest]\nleak_check = true\nleak_check_db = local\n"
                     "leak_check_url_env = DATABASE_URL\n")  # fmt: skip
    pytester.makeconftest(CONFTEST_RECORDING_URL)
    pytester.makepyfile(
        """
        import os, conftest
        def test_env(connguard_database):
            url = connguard_database.plain_url
            assert conftest.URL_AT_IMPORT == os.environ["DATABASE_URL"] == url
        """
    )
    result = run_pytest(pytester.path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "backend local" in result.stdout


def test_xdist_workers_share_one_server_with_a_database_each(pytester, tmp_path):
    # Strict lookup: the controller imports conftest too, and must find the variable set.
    pytester.makeconftest('import os\nURL_AT_IMPORT = os.environ["DATABASE_URL"]\n')
    pytester.makepyfile(
        """
        import json, os, time
        from pathlib import Path
        import conftest
        import pytest

        @pytest.mark.parametrize("n", range(6))
        def test_where(n, connguard_database, connguard_server):
            import psycopg
            with psycopg.connect(connguard_database.url) as conn:
                db = conn.execute("select current_database()").fetchone()[0]
            assert conftest.URL_AT_IMPORT == connguard_database.plain_url
            out = Path(os.environ["OUT_DIR"]) / f"{n}.json"
            out.write_text(json.dumps({"worker": os.environ["PYTEST_XDIST_WORKER"], "db": db,
                "port": connguard_database.port, "max": connguard_server.max_connections}))
            time.sleep(0.05)
        """
    )
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = run_pytest(
        pytester.path, "-n", "2", "--leak-check", "--leak-check-db=local",
        "--leak-check-url-env=DATABASE_URL", env={"OUT_DIR": str(out_dir)},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 passed" in result.stdout
    assert "connguard: leak check on, backend local" in result.stdout
    seen = [json.loads(path.read_text()) for path in out_dir.iterdir()]
    assert len({entry["port"] for entry in seen}) == 1  # one server
    by_worker = {}
    for entry in seen:
        by_worker.setdefault(entry["worker"], set()).add(entry["db"])
    assert len(by_worker) == 2
    assert all(len(dbs) == 1 for dbs in by_worker.values())
    assert by_worker["gw0"] != by_worker["gw1"]  # a database each
    assert all(entry["max"] >= 100 for entry in seen)


def test_per_test_databases_are_fresh_clones(pytester):
    pytester.makepyfile(
        """
        import psycopg, pytest

        @pytest.mark.parametrize("n", range(3))
        def test_fresh(n, connguard_database):
            with psycopg.connect(connguard_database.url) as conn:
                conn.execute("create table t (x int)")  # fails if a database were shared
                conn.execute("insert into t values (%s)", (n,))
                conn.commit()
            assert "_t" in connguard_database.dbname
        """
    )
    result = run_pytest(pytester.path, "--leak-check", "--leak-check-db=local",
                        "--leak-check-db-per-test")  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout


def test_the_janitor_runs_after_every_other_unconfigure_and_sessionfinish(pytester, tmp_path):
    # A detector counts in sessionfinish / unconfigure; the database must still be there.
    pytester.makeconftest(
        """
        import os, psycopg
        from pathlib import Path

        def _check(config, when):
            run = config.pluginmanager.get_plugin("connguard-provision")
            with psycopg.connect(run.database.url) as conn:
                conn.execute("select 1")
            with open(os.environ["OUT_FILE"], "a") as out:
                out.write(when + " ok\\n")

        def pytest_sessionfinish(session):
            _check(session.config, "sessionfinish")

        def pytest_unconfigure(config):
            _check(config, "unconfigure")
        """
    )
    pytester.makepyfile("def test_one(connguard_database):\n    pass\n")
    out = tmp_path / "out.txt"
    result = run_pytest(pytester.path, "--leak-check", "--leak-check-db=local",
                        env={"OUT_FILE": str(out)})  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert out.read_text().splitlines() == ["sessionfinish ok", "unconfigure ok"]


def test_a_session_scoped_fixture_may_build_on_the_database(pytester):
    # How an app's engine fixture is written: once per run, on the run's database.
    pytester.makeconftest(
        """
        import pytest

        @pytest.fixture(scope="session")
        def dbname(connguard_database):
            return connguard_database.dbname
        """
    )
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.parametrize("n", range(2))
        def test_same(n, dbname, connguard_database):
            assert dbname == connguard_database.dbname
        """
    )
    result = run_pytest(pytester.path, "--leak-check", "--leak-check-db=local")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout
