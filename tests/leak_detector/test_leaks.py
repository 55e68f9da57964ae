"""pytest --leak-check on small projects against a real PostgreSQL: what leaks, what does not."""

from __future__ import annotations

import json

import pytest
from leak_projects import (
    ASK_EVERY_TEST,
    CONFTEST,
    INI_AUTO_SESSION,
    INI_STRICT_FUNCTION,
    OUT_OF_SIGHT,
    TEST_CLEAN,
    TEST_FUNCTION_LOOP,
    TEST_LEAKY,
    leak_lines,
    load_report,
    marker_line,
    results_by_owner,
    run,
    write_project,
)

from connguard.leak_detector.provision.local import LocalProvider, find_bindir

pytestmark = pytest.mark.skipif(
    find_bindir()[0] is None, reason="no PostgreSQL server binaries on this machine"
)


@pytest.fixture(scope="module")
def server_url():
    """One local server for this module; each run makes (and drops) its own database on it."""
    provider = LocalProvider(max_connections=200)
    server = provider.start()
    try:
        yield server.url
    finally:
        provider.stop()


# How each kind of run may skip the server round trip (the report's server_proof).
PROOFS = {
    "asked": None,
    "url": "process table",
    "local": "connection log",
    "remote": "file descriptors",
}


def _server_of(kind: str, server_url: str) -> tuple[str | None, tuple[str, ...], tuple[str, ...]]:
    """The server of a run of this kind (None: its own local cluster), its options, and the
    command pytest runs under ("remote": where this machine's process table cannot show the
    server, as for one on another host)."""
    return {
        "asked": (server_url, (ASK_EVERY_TEST,), ()),
        "url": (server_url, (), ()),
        "local": (None, (), ()),
        "remote": (server_url, (), OUT_OF_SIGHT),
    }[kind]


EXPECTED_KINDS = {
    "test_never_closed_session": ["SQLAlchemy session"],
    "test_close_skipped_by_exception": ["SQLAlchemy session"],
    "test_gc_reclaimed_session": ["SQLAlchemy session"],
    "test_asyncpg_not_closed": ["asyncpg connection"],
    "test_pool_acquire_without_release": ["asyncpg pool connection"],
    "test_psycopg_async_not_closed": ["psycopg async connection"],
    "test_function_fixture": ["asyncpg connection"],
    "test_background_task": ["SQLAlchemy session"],
    "test_idle_in_transaction": ["asyncpg connection"],
    "test_thread_sync_session_and_psycopg": ["SQLAlchemy session", "psycopg connection"],
    "test_timeout_path": ["SQLAlchemy session"],
    "fixture 'leaky_session_conn' (session scope)": ["asyncpg connection"],
}


# "asked": every test asks the server. "url" (a server on this machine) and "local" (the run's
# own cluster): the process table or the connection log lets the detector skip that question
# when nothing can have changed; the verdicts must not change.
@pytest.fixture(scope="module", params=list(PROOFS))
def leaky_run(request, server_url, tmp_path_factory):
    project = write_project(
        tmp_path_factory.mktemp("leaky"), INI_AUTO_SESSION,
        conftest=CONFTEST, test_leaky=TEST_LEAKY,
    )  # fmt: skip
    url, options, prefix = _server_of(request.param, server_url)
    result = run(project, url, "--leak-check-report=report.json", "-rA", *options, prefix=prefix)
    report = load_report(project / "report.json")
    assert report["server_proof"] == PROOFS[request.param]
    return project, result, report


def test_every_leak_fails_its_test_and_names_the_opening_line(leaky_run):
    project, result, report = leaky_run
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    lines = leak_lines(TEST_LEAKY) | {
        owner: numbers for owner, numbers in leak_lines(CONFTEST).items()
    }
    results = results_by_owner(report)
    for owner, kinds in EXPECTED_KINDS.items():
        key = owner
        if owner.startswith("fixture"):
            expected_lines = lines["fixture:" + owner.split("'")[1]]
            expected_file = "conftest.py"
        else:
            expected_lines = lines[owner]
            expected_file = "conftest.py" if owner == "test_function_fixture" else "test_leaky.py"
        outcome = results[key]
        assert outcome["fails"], owner
        assert sorted(leak["kind"] for leak in outcome["leaks"]) == sorted(kinds), owner
        opened = [
            (leak["opened_at"]["path"], leak["opened_at"]["line"]) for leak in outcome["leaks"]
        ]
        assert sorted(line for _, line in opened) == sorted(expected_lines), owner
        assert all(path.endswith(expected_file) for path, _ in opened), owner
        for _path, line in opened:
            assert f"opened at {expected_file}:{line}" in out, owner
    for name in EXPECTED_KINDS:
        if not name.startswith("fixture"):
            assert f"ERROR at teardown of {name}" in out
    # the session fixture's leak fails the teardown of the last test, blamed on the fixture
    assert "connguard: fixture 'leaky_session_conn' (session scope) leaked 1" in out


def test_leaks_under_xdist_reach_the_controllers_summary_and_report(server_url, tmp_path):
    project = write_project(
        tmp_path, INI_AUTO_SESSION, conftest=CONFTEST, test_leaky=TEST_LEAKY, test_clean=TEST_CLEAN
    )
    # loadfile: the leaky file's tests share one worker (two of them share an asyncio.Event)
    result = run(
        project, server_url, "-p", "xdist", "-n", "2", "--dist", "loadfile",
        "--leak-check-report=report.json",
    )  # fmt: skip
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    report = load_report(project / "report.json")
    results = results_by_owner(report)
    failing = {owner for owner, outcome in results.items() if outcome["fails"]}
    assert failing == set(EXPECTED_KINDS) | {"test_unseen_connection_from_a_subprocess"}, out
    # the clean file ran on the other worker, with nothing to report
    assert not [r for r in report["results"] if r["nodeid"].startswith("test_clean.py")]
    assert "test_clean.py::test_pooled_idle_connections" not in out
    summary = out.split("connguard leak check")[1]
    assert "FAIL fixture 'leaky_session_conn' (session scope): 1 leaked" in summary


def test_report_shows_state_query_and_source_line(leaky_run):
    _, result, report = leaky_run
    out = result.stdout
    results = results_by_owner(report)
    idle_tx = results["test_idle_in_transaction"]["leaks"][0]
    assert idle_tx["state"] == "idle in transaction"
    assert idle_tx["last_query"] == "select 1"
    assert idle_tx["pid"] and idle_tx["client_port"]
    assert "conn = await asyncpg.connect(URL)  # LEAK test_idle_in_transaction" in out
    assert "state: idle in transaction, backend pid" in out
    warnings = [w["category"] for w in results["test_idle_in_transaction"]["warnings"]]
    assert "idle-in-transaction" in warnings
    assert results["test_asyncpg_not_closed"]["leaks"][0]["state"] == "idle"
    # a session that took its connection later names both lines
    never = results["test_never_closed_session"]["leaks"][0]
    assert never["checked_out_at"]["source"] == 'await session.execute(text("select 1"))'
    # the static layer's verdict on the opening line (it flags the plain connect)
    assert results["test_asyncpg_not_closed"]["leaks"][0]["static_check"] == "CG101 flags this line"
    assert "static check: CG101 flags this line" in out


def test_gc_and_task_leaks_are_explained(leaky_run):
    _, result, report = leaky_run
    results = results_by_owner(report)
    for name in (
        "test_gc_reclaimed_session",
        "test_close_skipped_by_exception",
        "test_timeout_path",
    ):
        note = results[name]["leaks"][0]["note"]
        assert "garbage collector" in note, name
    task_leak = results["test_background_task"]["leaks"][0]
    assert "still running when the test ended" in task_leak["note"]


def test_a_leak_found_during_a_later_test_is_blamed_on_its_owner(leaky_run):
    _, result, report = leaky_run
    results = results_by_owner(report)
    late = results["test_starts_late_work"]
    assert late["surfaced_later"] and not late["fails"]
    assert late["nodeid"] == "test_leaky.py::test_waits_for_late_work"
    (line,) = leak_lines(TEST_LEAKY)["test_starts_late_work"]
    assert late["leaks"][0]["opened_at"]["line"] == line
    assert "test_waits_for_late_work" not in results
    assert "PASSED test_leaky.py::test_waits_for_late_work" in result.stdout
    assert "LATE test_leaky.py::test_starts_late_work: 1 leaked" in result.stdout


# A late leak whose connection is left idle in a transaction, and kept alive (in the matrix
# above the garbage collector reclaims it, and whether the server still shows the transaction at
# the check is a race): the finding is the earlier test's leak, not a warning for this test.
TEST_LATE_IN_TRANSACTION = """
import asyncio

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

KEEP = []
DONE = asyncio.Event()


async def test_starts_late_work(engine):
    async def later():
        await asyncio.sleep(0.05)
        session = AsyncSession(engine)  # LEAK test_starts_late_work
        await session.execute(text("select 1"))
        KEEP.append(session)
        DONE.set()

    asyncio.ensure_future(later())


async def test_waits_for_late_work():
    await asyncio.wait_for(DONE.wait(), 30)
"""


def test_a_late_leak_left_in_a_transaction_is_only_its_owners(server_url, tmp_path):
    project = write_project(
        tmp_path, INI_AUTO_SESSION, conftest=CONFTEST, test_late=TEST_LATE_IN_TRANSACTION
    )
    result = run(project, server_url, "--leak-check-report=report.json", "-rA")
    # Both tests passed; the leak found after its test had passed fails the run instead.
    assert "2 passed" in result.stdout, result.stdout
    failed = "the run fails: 1 LATE finding(s) above fail, and their tests had already passed"
    assert failed in result.stdout
    assert result.returncode == 1, result.stdout + result.stderr
    results = results_by_owner(load_report(project / "report.json"))
    assert set(results) == {"test_starts_late_work"}, results
    late = results["test_starts_late_work"]
    assert late["surfaced_later"] and late["nodeid"] == "test_late.py::test_waits_for_late_work"
    assert late["leaks"][0]["state"] == "idle in transaction"
    warned = run(project, server_url, "--leak-check-mode=warn")
    assert warned.returncode == 0, warned.stdout + warned.stderr
    assert "LATE test_late.py::test_starts_late_work" in warned.stdout
    # Warnings made errors fail the test they are about, not the one that found them.
    strict = run(
        project, server_url, "-W", "error::connguard.leak_detector.detect.ConnectionLeakWarning"
    )
    assert "2 passed" in strict.stdout and "ERROR at teardown" not in strict.stdout, strict.stdout
    assert strict.returncode == 1, strict.stdout + strict.stderr


# SQLAlchemy's "join a session into an external transaction" recipe: a session-scoped
# connection holds one transaction for the whole run, and each test's session works in a
# savepoint of it. A module-scoped connection that autobegins is the same case.
TEST_EXTERNAL_TRANSACTION = """
import os

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

URL = "postgresql+psycopg://" + os.environ["DATABASE_URL"].split("://", 1)[1]


@pytest.fixture(scope="session")
def connection():
    engine = sa.create_engine(URL)
    with engine.connect() as conn:
        transaction = conn.begin()
        conn.execute(sa.text("create table items (x int)"))
        yield conn
        transaction.rollback()
    engine.dispose()


@pytest.fixture
def db(connection):
    with Session(bind=connection, join_transaction_mode="create_savepoint") as session:
        yield session


@pytest.fixture(scope="module")
def module_connection():
    engine = sa.create_engine(URL)
    with engine.connect() as conn:
        conn.execute(sa.text("select 1"))  # autobegins, and stays in that transaction
        yield conn
    engine.dispose()


def test_inserts(db):
    db.execute(sa.text("insert into items values (1)"))
    db.flush()


def test_counts(db):
    assert db.execute(sa.text("select count(*) from items")).scalar() == 0


def test_module_connection(module_connection):
    assert module_connection.execute(sa.text("select 2")).scalar() == 2
"""


def test_a_wider_fixtures_own_transaction_is_not_its_first_tests(server_url, tmp_path):
    project = write_project(tmp_path, INI_AUTO_SESSION, test_external=TEST_EXTERNAL_TRANSACTION)
    result = run(
        project,
        server_url,
        "--leak-check-fail-on=idle-in-transaction",
        "--leak-check-report=report.json",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout
    assert load_report(project / "report.json")["results"] == []


# An application's engine made lazily by the first test that needs it, and kept.
LAZY_ENGINE_APP = """
import functools
import os

import sqlalchemy as sa


@functools.lru_cache
def get_engine():
    return sa.create_engine("postgresql+psycopg://" + os.environ["DATABASE_URL"].split("://", 1)[1])


def count():
    with get_engine().connect() as conn:
        return conn.execute(sa.text("select 1")).scalar()
"""

TEST_LAZY_ENGINE = """
import lazy_app


def test_first():
    assert lazy_app.count() == 1


def test_second():
    assert lazy_app.count() == 1
"""

DISPOSED_AT_THE_END = """
import pytest

import lazy_app


@pytest.fixture(scope="session", autouse=True)
def dispose_engine():
    yield
    lazy_app.get_engine().dispose()
"""


def test_an_engine_kept_by_the_app_is_judged_when_the_run_ends(server_url, tmp_path):
    project = write_project(
        tmp_path,
        INI_AUTO_SESSION + "pythonpath = .\n",
        lazy_app=LAZY_ENGINE_APP,
        test_lazy=TEST_LAZY_ENGINE,
    )
    kept = run(project, server_url, "--leak-check-report=report.json")
    assert kept.returncode == 0, kept.stdout + kept.stderr
    assert (
        "LATE test_lazy.py::test_first: engine (at lazy_app.py:9) [found when the run ended]"
        in kept.stdout
    ), kept.stdout
    (late,) = load_report(project / "report.json")["results"]
    assert late["surfaced_later"] and late["owner"] == "test_lazy.py::test_first"
    assert [w["category"] for w in late["warnings"]] == ["engine"]
    failing = run(project, server_url, "--leak-check-fail-on=engine")
    assert failing.returncode == 1 and "2 passed" in failing.stdout, failing.stdout
    # Under xdist each worker's app makes its own, found when that worker's run ends.
    spread = run(project, server_url, "--leak-check-report=report.json", "-p", "xdist", "-n", "2")
    assert spread.returncode == 0, spread.stdout + spread.stderr
    late = load_report(project / "report.json")["results"]
    assert late and all(o["surfaced_later"] for o in late), late
    assert {w["category"] for o in late for w in o["warnings"]} == {"engine"}
    # Disposed when the run ends, by a session fixture: nothing to say.
    (project / "conftest.py").write_text(DISPOSED_AT_THE_END)
    disposed = run(project, server_url, "--leak-check-report=report.json")
    assert disposed.returncode == 0, disposed.stdout + disposed.stderr
    assert load_report(project / "report.json")["results"] == []


# A session fixture that starts a server in a subprocess (an e2e suite's live server): its
# connection is the fixture's, seen only by the server, and ends with the fixture.
TEST_LIVE_SERVER = """
import subprocess
import sys

import pytest

CHILD = (
    "import os, time, psycopg; conn = psycopg.connect(os.environ['DATABASE_URL']); "
    "print('ready', flush=True); time.sleep(600)"
)


@pytest.fixture(scope="session")
def live_server():
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    yield child.pid
    child.terminate()
    child.wait()


def test_uses_the_server(live_server):
    assert live_server


def test_does_not():
    pass
"""


@pytest.mark.parametrize("proof", ["auto", "off"])
def test_a_wider_fixtures_subprocess_connection_is_not_its_first_tests(server_url, tmp_path, proof):
    project = write_project(tmp_path, INI_AUTO_SESSION, test_live=TEST_LIVE_SERVER)
    result = run(
        project, server_url, "--leak-check-report=report.json", f"--leak-check-server-proof={proof}"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout
    assert load_report(project / "report.json")["results"] == []


TEST_SQLITE_ENGINE = """
from sqlalchemy import create_engine, text


def test_sqlite_in_memory():
    engine = create_engine("sqlite://")
    with engine.connect() as conn:
        conn.execute(text("select 1"))
"""


def test_an_engine_without_a_server_is_no_engine_finding(server_url, tmp_path):
    # "Its connections stay open on the server": SQLite has none to keep.
    project = write_project(tmp_path, INI_AUTO_SESSION, test_sqlite=TEST_SQLITE_ENGINE)
    result = run(project, server_url, "--leak-check-fail-on=engine", "--leak-check-report=r.json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert load_report(project / "r.json")["results"] == []


TEST_POOL_OF_ONE = """
import os

from sqlalchemy import create_engine, text

URL = "postgresql+psycopg://" + os.environ["DATABASE_URL"].split("://", 1)[1]


def test_pool_of_one():
    engine = create_engine(URL, pool_size=1, max_overflow=0)
    with engine.connect() as conn:
        conn.execute(text("select 1"))
    engine.dispose()
"""


def test_a_pool_of_one_in_use_is_no_threshold_warning(server_url, tmp_path):
    project = write_project(tmp_path, INI_AUTO_SESSION, test_one=TEST_POOL_OF_ONE)
    result = run(
        project, server_url, "--leak-check-fail-on=pool-threshold", "--leak-check-report=r.json"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert load_report(project / "r.json")["results"] == []


def test_server_sees_what_the_ledger_cannot(leaky_run):
    _, result, report = leaky_run
    outcome = results_by_owner(report)["test_unseen_connection_from_a_subprocess"]
    assert outcome["fails"]
    (leak,) = outcome["leaks"]
    assert leak["kind"] == "database connection (not seen by the client ledger)"
    assert leak["opened_at"] is None
    assert leak["last_query"] == "select 42" and leak["state"] == "idle in transaction"
    assert "ERROR at teardown of test_unseen_connection_from_a_subprocess" in result.stdout


def test_undisposed_engine_is_a_warning_by_default(leaky_run):
    _, result, report = leaky_run
    results = results_by_owner(report)
    # An engine the test kept (KEEP) is judged when the run ends: never disposed by then.
    (kept,) = [
        o for o in report["results"] if o["surfaced_later"] and "test_thread_sync" in o["owner"]
    ]
    assert [w["category"] for w in kept["warnings"]] == ["engine"] and not kept["leaks"]
    engine = results["test_undisposed_engine"]
    assert not engine["fails"] and not engine["leaks"]
    assert [w["category"] for w in engine["warnings"]] == ["engine"]
    assert engine["warnings"][0]["location"]["line"] == marker_line(
        TEST_LEAKY, "# ENGINE test_undisposed_engine"
    )
    assert "PASSED test_leaky.py::test_undisposed_engine" in result.stdout
    summary = result.stdout.split("connguard leak check")[1]
    assert "WARN test_leaky.py::test_undisposed_engine: engine" in summary
    assert "FAIL test_leaky.py::test_asyncpg_not_closed: 1 leaked" in summary


@pytest.fixture(scope="module")
def clean_project(tmp_path_factory):
    return write_project(
        tmp_path_factory.mktemp("clean"), INI_AUTO_SESSION, conftest=CONFTEST, test_clean=TEST_CLEAN
    )


# Three consecutive runs of the clean suite (the 20-run check is in
# benchmarks/bench_leak_check.py --false-positives 20).
@pytest.mark.parametrize(
    ("backend", "extra"),
    [
        ("url", ()),
        ("url", ("-p", "xdist", "-n", "2")),
        ("asked", ()),
        ("asked", ("-p", "xdist", "-n", "2")),
        ("local", ()),
        ("local", ("-p", "xdist", "-n", "2")),
        ("remote", ()),
        ("remote", ("-p", "xdist", "-n", "2")),
    ],
    ids=[
        "serial", "xdist-n2", "asked-serial", "asked-xdist-n2", "local-serial", "local-xdist-n2",
        "remote-serial", "remote-xdist-n2",
    ],
)  # fmt: skip
def test_clean_suite_passes(server_url, clean_project, backend, extra, tmp_path):
    report_path = tmp_path / "report.json"
    url, options, prefix = _server_of(backend, server_url)
    result = run(
        clean_project, url, f"--leak-check-report={report_path}", *options, *extra, prefix=prefix
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "16 passed" in result.stdout
    assert "connguard: " in result.stdout  # the header: the check really ran
    report = load_report(report_path)
    assert report["results"] == []
    if not extra:  # (under xdist the controller has no observer, and reports no proof)
        assert report["server_proof"] == PROOFS[backend]


# A function-scoped fixture holds its connection through the test; when it is back in its pool
# during the teardown, the server is asked then, and the rest of the teardown (here a pause)
# overlaps the round trip. The observer's last query, as the server timed it, says when.
TEST_ASKED_WHEN_RETURNED = """
import os
import time

import psycopg
import psycopg_pool
import pytest_asyncio
from sqlalchemy import text

MARKS = {{}}


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def psycopg_pool_():
    async with psycopg_pool.AsyncConnectionPool(os.environ["DATABASE_URL"], open=False) as pool:
        yield pool


@pytest_asyncio.fixture(loop_scope="session")
async def held({pool}):
    async with {acquire} as conn:
        await conn.execute({query})
        yield conn
        MARKS["releasing"] = time.time()
    time.sleep(0.5)
    MARKS["torn_down"] = time.time()


async def test_holds_a_fixture_connection(held):
    await held.execute({query})


def test_when_the_server_was_asked():
    with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as conn:
        (asked,) = conn.execute(
            "select extract(epoch from query_start)::float8 from pg_stat_activity"
            " where application_name like 'connguard-%-admin'"
        ).fetchone()
    assert MARKS["releasing"] <= asked < MARKS["torn_down"], (MARKS, asked)
"""

POOLS = {
    "sqlalchemy": ("engine", "engine.connect()", 'text("select 1")'),
    "asyncpg": ("apool", "apool.acquire()", '"select 1"'),
    "psycopg_pool": ("psycopg_pool_", "psycopg_pool_.connection()", '"select 1"'),
}


@pytest.mark.parametrize("pool", list(POOLS))
def test_a_fixture_connection_back_in_its_pool_is_asked_about_then(pool, server_url, tmp_path):
    name, acquire, query = POOLS[pool]
    test = TEST_ASKED_WHEN_RETURNED.format(pool=name, acquire=acquire, query=query)
    project = write_project(tmp_path, INI_AUTO_SESSION, conftest=CONFTEST, test_returned=test)
    result = run(project, server_url, "--leak-check-report=report.json", ASK_EVERY_TEST)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout
    report = load_report(project / "report.json")
    assert report["server_proof"] is None and report["results"] == []


# Between tests the event loop does not run: a connect it started, whose backend the server
# already lists, cannot finish before the check (a pool filling itself in the background does
# this). Here a proxy holds the server's replies to one connect until the second test lets them
# through, or the connect is given up while the proxy keeps the server's side open.
TEST_CONNECT_UNDER_WAY = """
import asyncio
import os
import socket
import threading
import time
from urllib.parse import urlsplit

import psycopg

URL = os.environ["DATABASE_URL"]
STATE = {{}}


def _pump(source, sink):
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass  # (nothing is shut down: the server's side stays open until the run ends)


def _hold(listener, port, release):
    client, _ = listener.accept()
    server = socket.create_connection(("127.0.0.1", port))
    threading.Thread(target=_pump, args=(client, server), daemon=True).start()
    release.wait()
    _pump(server, client)


def _others(watch):
    return watch.execute(
        "select count(*) from pg_stat_activity"
        " where datname = current_database() and pid <> pg_backend_pid()"
    ).fetchone()[0]


async def test_starts_a_connect():
    listener = socket.create_server(("127.0.0.1", 0))
    port = urlsplit(URL).port
    STATE["release"] = release = threading.Event()
    threading.Thread(target=_hold, args=(listener, port, release), daemon=True).start()
    held = URL.replace(f":{{port}}/", f":{{listener.getsockname()[1]}}/")
    with psycopg.connect(URL, autocommit=True) as watch:
        before = _others(watch)
        # (no SSL or GSS negotiation: it would wait for a held reply before the startup)
        connect = psycopg.AsyncConnection.connect(held, sslmode="disable", gssencmode="disable")
        STATE["task"] = asyncio.ensure_future(connect)
        for _ in range(500):  # until the server lists its backend (its reply is held)
            await asyncio.sleep(0.002)
            if _others(watch) > before:
                break
        else:
            raise AssertionError("the server never listed the connect's backend")
    assert not STATE["task"].done()


async def test_{ending}():
    {ending_body}
"""

ENDINGS = {
    "finishes_it": """STATE["release"].set()
    conn = await STATE["task"]
    await conn.close()""",
    "gives_it_up": """STATE["task"].cancel()
    try:
        await STATE["task"]
    except asyncio.CancelledError:
        pass
    time.sleep(0.05)""",
    "leaves_it": "pass",
}


def _connect_under_way(server_url, tmp_path, ending):
    test = TEST_CONNECT_UNDER_WAY.format(ending=ending, ending_body=ENDINGS[ending])
    project = write_project(tmp_path, INI_AUTO_SESSION, conftest=CONFTEST, test_connect=test)
    result = run(project, server_url, "--leak-check-report=report.json", "-rA")
    return result, load_report(project / "report.json")


def test_a_backend_whose_connect_is_under_way_is_not_a_leak(server_url, tmp_path):
    result, report = _connect_under_way(server_url, tmp_path, "finishes_it")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout
    assert report["results"] == []


def test_a_backend_set_aside_while_connects_were_under_way_is_settled_later(server_url, tmp_path):
    result, report = _connect_under_way(server_url, tmp_path, "gives_it_up")
    assert result.returncode == 1, result.stdout + result.stderr  # both passed; the run fails
    assert "2 passed" in result.stdout
    late = results_by_owner(report)["test_starts_a_connect"]
    assert late["surfaced_later"] and not late["fails"]
    assert late["nodeid"] == "test_connect.py::test_gives_it_up"
    (leak,) = late["leaks"]
    assert leak["kind"] == "database connection (not seen by the client ledger)"
    assert leak["state"] == "idle" and leak["pid"]


def test_a_backend_still_set_aside_when_the_run_ends_is_reported(server_url, tmp_path):
    result, report = _connect_under_way(server_url, tmp_path, "leaves_it")
    assert result.returncode == 1, result.stdout + result.stderr
    late = results_by_owner(report)["test_starts_a_connect"]
    assert late["surfaced_later"] and not late["fails"]
    (leak,) = late["leaks"]
    assert leak["kind"] == "database connection (not seen by the client ledger)"
    assert "LATE test_connect.py::test_starts_a_connect: 1 leaked" in result.stdout


def test_function_loop_strict_mode(server_url, tmp_path):
    project = write_project(tmp_path, INI_STRICT_FUNCTION, test_fl=TEST_FUNCTION_LOOP)
    result = run(project, server_url, "--leak-check-report=report.json")
    out = result.stdout
    results = results_by_owner(load_report(project / "report.json"))
    assert sorted(results) == [
        "test_fl_asyncpg_leak",
        "test_fl_background_task",
        "test_fl_session_leak",
    ], out
    for name, (line,) in leak_lines(TEST_FUNCTION_LOOP).items():
        assert f"ERROR at teardown of {name}" in out
        assert results[name]["leaks"][0]["opened_at"]["line"] == line
    assert "5 passed" in out and "3 errors" in out, out


OPTIONS_TESTS = """
import os
import asyncio
import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

URL = os.environ["DATABASE_URL"]


@pytest.mark.allow_connection_leak(reason="kept open on purpose")
async def test_allowed():
    conn = await asyncpg.connect(URL)
    await conn.execute("select 1")


async def test_undisposed():
    eng = create_async_engine(URL.replace("postgresql://", "postgresql+asyncpg://"))
    async with eng.connect() as conn:
        await conn.execute(text("select 1"))


async def test_pool_peak():
    eng = create_async_engine(URL.replace("postgresql://", "postgresql+asyncpg://"),
                              pool_size=4, max_overflow=0)

    async def hold():
        async with eng.connect() as conn:
            await conn.execute(text("select pg_sleep(0.05)"))

    await asyncio.gather(*(hold() for _ in range(4)))
    await eng.dispose()


@pytest.mark.leak_check(mode="warn")
async def test_warn_only():
    conn = await asyncpg.connect(URL)
    await conn.execute("select 1")
"""


def test_fail_on_threshold_allow_and_warn_mode(server_url, tmp_path):
    project = write_project(tmp_path, INI_AUTO_SESSION, test_options=OPTIONS_TESTS)
    result = run(
        project,
        server_url,
        "--leak-check-fail-on=engine,pool-threshold",
        "--leak-check-report=report.json",
        "-rA",
    )
    out = result.stdout
    results = results_by_owner(load_report(project / "report.json"))
    assert results["test_allowed"]["allowed"] == "kept open on purpose"
    assert not results["test_allowed"]["fails"]
    assert "PASSED test_options.py::test_allowed" in out
    assert results["test_undisposed"]["fails"]
    assert "ERROR at teardown of test_undisposed" in out
    assert "connguard error [engine]: engine created by" in out
    peak = results["test_pool_peak"]
    assert [w["category"] for w in peak["warnings"]] == ["pool-threshold"], out
    assert "peak 4 of 4 connections" in peak["warnings"][0]["message"]
    assert "ERROR at teardown of test_pool_peak" in out
    assert not results["test_warn_only"]["fails"]
    assert "PASSED test_options.py::test_warn_only" in out
    assert "ConnectionLeakWarning" in out


def test_warnings_made_errors_fail_their_test_and_the_run_goes_on(server_url, tmp_path):
    # `-W error` / `filterwarnings = error` turn connguard's warnings into exceptions; raised
    # from the report hook, one stopped the whole run with an INTERNALERROR.
    project = write_project(tmp_path, INI_AUTO_SESSION, test_options=OPTIONS_TESTS)
    result = run(
        project,
        server_url,
        "-W",
        "error::connguard.leak_detector.detect.ConnectionLeakWarning",
        "--leak-check-report=report.json",
        "-rA",
    )
    out = result.stdout
    assert "INTERNALERROR" not in out + result.stderr
    assert result.returncode == 1, out
    results = results_by_owner(load_report(project / "report.json"))
    for name in ("test_undisposed", "test_pool_peak", "test_warn_only"):
        assert f"ERROR at teardown of {name}" in out
        assert results[name]["fails"], name
    # What the marker allowed stays allowed.
    assert "ERROR at teardown of test_allowed" not in out
    assert not results["test_allowed"]["fails"]
    assert "4 passed" in out and "3 errors" in out, out


def test_allow_marker_without_reason_is_a_usage_error(server_url, tmp_path):
    project = write_project(
        tmp_path,
        INI_AUTO_SESSION,
        test_bad="""
import pytest

@pytest.mark.allow_connection_leak
def test_x():
    pass
""",
    )
    result = run(project, server_url)
    assert result.returncode == 4, result.stdout + result.stderr
    assert "allow_connection_leak on test_bad.py::test_x needs a reason" in result.stderr
    assert "Traceback" not in result.stderr


def test_marker_errors_under_xdist_fail_the_test_with_one_line(server_url, tmp_path):
    # A UsageError raised in an xdist worker would crash it with an INTERNALERROR traceback.
    project = write_project(
        tmp_path,
        INI_AUTO_SESSION,
        test_bad="""
import pytest

@pytest.mark.leak_check(foo=1)
def test_unknown_key():
    pass

@pytest.mark.allow_connection_leak
def test_no_reason():
    pass

def test_fine():
    pass
""",
    )
    result = run(project, server_url, "-p", "xdist", "-n", "2")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "INTERNALERROR" not in output and "Traceback" not in output, output
    assert (
        "usage error: @pytest.mark.leak_check(foo=1) (marker on test_bad.py::test_unknown_key): "
        "unknown setting" in output
    )
    assert "allow_connection_leak on test_bad.py::test_no_reason needs a reason" in output
    assert "1 passed, 2 errors" in output, output


def test_report_file_is_json_with_the_leaking_tests(leaky_run):
    project, _, report = leaky_run
    assert report["version"] == 1
    assert "test_leaky.py::test_asyncpg_not_closed" in report["tests_with_leaks"]
    assert "test_leaky.py::test_undisposed_engine" not in report["tests_with_leaks"]
    assert report["fixtures_with_leaks"] == ["fixture 'leaky_session_conn' (session scope)"]
    json.dumps(report)  # round-trips


def test_observer_reads_backends_and_survives_losing_its_server(server_url):
    import psycopg

    from connguard.leak_detector.observer import Observer

    observer = Observer(server_url, "postgres")
    with psycopg.connect(server_url, autocommit=True, application_name="watched") as conn:
        conn.execute("select 7")
        pid = conn.info.backend_pid
        now = observer.snapshot()
        assert now[pid].state == "idle" and now[pid].query == "select 7"
        assert now[pid].application_name == "watched"
        assert observer.pid not in now  # never itself
        observer.send()  # asked now, collected later: the same answer
        assert pid in observer.collect()
    assert pid not in observer.wait_gone({pid})
    observer._conn.close()  # the server goes away mid-run
    assert observer.snapshot() == {}
    assert observer.broken
