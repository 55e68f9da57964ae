"""Small test projects for the leak-detector tests, and a runner for them against a real server.

Every leaking line in these projects ends with ``# LEAK <test name>``, so the tests find the
line numbers the report must name instead of hard-coding them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

INI_AUTO_SESSION = """
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = session
asyncio_default_test_loop_scope = session
leak_check_url_env = DATABASE_URL
"""

INI_STRICT_FUNCTION = """
[pytest]
asyncio_mode = strict
asyncio_default_fixture_loop_scope = function
asyncio_default_test_loop_scope = function
leak_check_url_env = DATABASE_URL
"""

# SQLAlchemy's testing recipe as a fixture of a generated project (it needs an `engine`
# fixture): a connection in a transaction for the whole test, rolled back at teardown.
# For a run that must ask the server after every test, as for a server on another host.
ASK_EVERY_TEST = "--leak-check-server-proof=off"
# A command prefix that runs pytest in a PID namespace of its own, whose /proc cannot show the
# server's processes: as for a server on another host, only this process's own side is seen.
OUT_OF_SIGHT = ("unshare", "--map-root-user", "--pid", "--fork", "--mount-proc")

ROLLED_BACK = """

@pytest_asyncio.fixture(loop_scope="session")
async def rolled_back(engine):
    async with engine.connect() as conn:
        outer = await conn.begin()
        async with AsyncSession(bind=conn, join_transaction_mode="create_savepoint") as s:
            yield s
        await outer.rollback()
"""

CONFTEST = (
    """
import os

import asyncpg
import pytest
import pytest_asyncio
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

# The xdist controller imports this too, and only workers get a database.
URL = os.environ.get("DATABASE_URL", "")
SA_URL = URL.replace("postgresql://", "postgresql+asyncpg://")


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def engine():
    eng = create_async_engine(SA_URL, pool_size=5, max_overflow=0)
    yield eng
    await eng.dispose()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def apool():
    pool = await asyncpg.create_pool(URL, min_size=2, max_size=4)
    yield pool
    # close() would wait forever for the connection a leaking test never released
    pool.terminate()


@pytest_asyncio.fixture(loop_scope="session")
async def leaky_conn():
    conn = await asyncpg.connect(URL)  # LEAK test_function_fixture
    yield conn


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def leaky_session_conn():
    conn = await asyncpg.connect(URL)  # LEAK fixture:leaky_session_conn
    yield conn


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def session_conn():
    conn = await asyncpg.connect(URL)
    yield conn
    await conn.close()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def background_pool():
    from psycopg_pool import AsyncConnectionPool

    # Opened without waiting: the pool connects in the background while the tests run.
    async with AsyncConnectionPool(URL, min_size=4) as pool:
        yield pool


@pytest.fixture(scope="session")
def background_sync_pool():
    from psycopg_pool import ConnectionPool

    # The same with worker threads, which connect while the detector checks a test.
    with ConnectionPool(URL, min_size=4, num_workers=4) as pool:
        yield pool
"""
    + ROLLED_BACK
)

# Each test leaks exactly what its name says, on the line marked LEAK.
TEST_LEAKY = """
import asyncio
import gc

import asyncpg
import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from conftest import SA_URL, URL

pytestmark = pytest.mark.asyncio(loop_scope="session")
KEEP = []
LATE_DONE = asyncio.Event()
# Opens a connection in another process (no driver call of ours sees it) and keeps it until
# this pytest process exits (its stdin closes).
HOLDER = (
    "import os, sys, psycopg; c = psycopg.connect(os.environ['DATABASE_URL']); "
    "c.execute('select 42'); print('connected', flush=True); sys.stdin.read()"
)


async def test_never_closed_session(engine):
    session = AsyncSession(engine)  # LEAK test_never_closed_session
    await session.execute(text("select 1"))
    KEEP.append(session)


async def test_close_skipped_by_exception(engine):
    session = AsyncSession(engine)  # LEAK test_close_skipped_by_exception
    try:
        await session.execute(text("select 1"))
        raise ValueError("the request failed")
        await session.close()
    except ValueError:
        pass


async def test_gc_reclaimed_session(engine):
    async def handler():
        session = AsyncSession(engine)  # LEAK test_gc_reclaimed_session
        return (await session.execute(text("select 1"))).scalar()

    assert await handler() == 1
    gc.collect()  # the connection went back to the pool silently, before the test ended


async def test_asyncpg_not_closed():
    conn = await asyncpg.connect(URL)  # LEAK test_asyncpg_not_closed
    await conn.execute("select 1")


async def test_pool_acquire_without_release(apool):
    con = await apool.acquire()  # LEAK test_pool_acquire_without_release
    await con.execute("select 1")


async def test_psycopg_async_not_closed():
    conn = await psycopg.AsyncConnection.connect(URL)  # LEAK test_psycopg_async_not_closed
    await conn.execute("select 1")


async def test_function_fixture(leaky_conn):
    await leaky_conn.execute("select 1")


async def test_session_fixture(leaky_session_conn):
    await leaky_session_conn.execute("select 1")


async def test_background_task(engine):
    holding = asyncio.Event()

    async def poll():
        async with AsyncSession(engine) as session:  # LEAK test_background_task
            await session.execute(text("select 1"))
            holding.set()
            await asyncio.sleep(30)

    asyncio.ensure_future(poll())
    await holding.wait()


async def test_idle_in_transaction():
    conn = await asyncpg.connect(URL)  # LEAK test_idle_in_transaction
    await conn.execute("begin")
    await conn.execute("select 1")


async def test_thread_sync_session_and_psycopg():
    def work():
        engine = create_engine(URL.replace("postgresql://", "postgresql+psycopg://"))
        session = Session(engine)  # LEAK test_thread_sync_session_and_psycopg
        session.execute(text("select 1"))
        conn = psycopg.connect(URL, autocommit=True)  # LEAK test_thread_sync_session_and_psycopg
        conn.execute("select 1")
        return session, conn, engine

    KEEP.append(await asyncio.to_thread(work))


async def test_starts_late_work(engine):
    async def later():
        await asyncio.sleep(0.05)
        session = AsyncSession(engine)  # LEAK test_starts_late_work
        await session.execute(text("select 1"))
        LATE_DONE.set()

    asyncio.ensure_future(later())


async def test_waits_for_late_work():
    await asyncio.wait_for(LATE_DONE.wait(), 30)


def test_unseen_connection_from_a_subprocess():
    import subprocess
    import sys

    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "connected"
    KEEP.append(holder)


async def test_undisposed_engine():
    eng = create_async_engine(SA_URL)  # ENGINE test_undisposed_engine
    async with eng.connect() as conn:
        await conn.execute(text("select 1"))


async def test_timeout_path(engine):
    async def handler():
        session = AsyncSession(engine)  # LEAK test_timeout_path
        await session.execute(text("select 1"))
        await asyncio.sleep(5)
        await session.close()

    try:
        await asyncio.wait_for(handler(), 0.1)
    except asyncio.TimeoutError:
        pass
"""

# The clean counterparts: none of these may fail.
TEST_CLEAN = """
import asyncio

import asyncpg
import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from conftest import SA_URL, URL

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_function_fixture_holds_a_transaction(rolled_back):
    await rolled_back.execute(text("select 1"))


async def test_pooled_idle_connections(engine):
    for _ in range(3):
        async with AsyncSession(engine) as session:
            await session.execute(text("select 1"))


async def test_concurrent_sessions_returned(engine):
    async def one():
        async with AsyncSession(engine) as session:
            await session.execute(text("select pg_sleep(0.01)"))

    await asyncio.gather(one(), one(), one())


async def test_close_in_finally(engine):
    session = AsyncSession(engine)
    try:
        await session.execute(text("select 1"))
    finally:
        await session.close()


async def test_released_later_in_the_test(engine):
    session = AsyncSession(engine)
    await session.execute(text("select 1"))
    await asyncio.sleep(0.01)
    await session.close()


async def test_finished_background_task(engine):
    async def work():
        async with AsyncSession(engine) as session:
            await session.execute(text("select 1"))

    await asyncio.ensure_future(work())


async def test_session_scoped_connection(session_conn):
    assert await session_conn.fetchval("select 1") == 1


async def test_pool_acquire_released(apool):
    async with apool.acquire() as con:
        await con.execute("select 1")


async def test_asyncpg_closed():
    conn = await asyncpg.connect(URL)
    try:
        await conn.execute("select 1")
    finally:
        await conn.close()


async def test_psycopg_async_closed():
    async with await psycopg.AsyncConnection.connect(URL) as conn:
        await conn.execute("select 1")


async def test_engine_disposed():
    eng = create_async_engine(SA_URL)
    try:
        async with eng.connect() as conn:
            await conn.execute(text("select 1"))
    finally:
        await eng.dispose()


async def test_thread_sync_work_closed():
    def work():
        engine = create_engine(URL.replace("postgresql://", "postgresql+psycopg://"))
        with Session(engine) as session:
            session.execute(text("select 1"))
        engine.dispose()
        with psycopg.connect(URL) as conn:
            conn.execute("select 1")

    await asyncio.to_thread(work)


def test_subprocess_connection_closed():
    import subprocess
    import sys

    code = "import os, psycopg; psycopg.connect(os.environ['DATABASE_URL']).close()"
    subprocess.run([sys.executable, "-c", code], check=True)


async def test_pool_filling_itself_in_the_background(background_pool):
    async with background_pool.connection() as conn:
        await conn.execute("select 1")


def test_sync_pool_filling_itself_in_the_background(background_sync_pool):
    with background_sync_pool.connection() as conn:
        conn.execute("select 1")


def test_sync_psycopg_pool():
    from psycopg_pool import ConnectionPool

    with ConnectionPool(URL, min_size=1, max_size=2, open=True) as pool:
        with pool.connection() as conn:
            conn.execute("select 1")
"""

# pytest-asyncio strict mode with a loop per test: the fixtures here are function-scoped.
TEST_FUNCTION_LOOP = """
import asyncio
import os

import asyncpg
import pytest
import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

URL = os.environ["DATABASE_URL"]


@pytest_asyncio.fixture
async def engine():
    eng = create_async_engine(URL.replace("postgresql://", "postgresql+asyncpg://"))
    yield eng
    await eng.dispose()


@pytest.mark.asyncio
async def test_fl_session_leak(engine):
    session = AsyncSession(engine)  # LEAK test_fl_session_leak
    await session.execute(text("select 1"))


@pytest.mark.asyncio
async def test_fl_asyncpg_leak():
    conn = await asyncpg.connect(URL)  # LEAK test_fl_asyncpg_leak
    await conn.execute("select 1")


@pytest.mark.asyncio
async def test_fl_background_task(engine):
    holding = asyncio.Event()

    async def poll():
        async with AsyncSession(engine) as session:  # LEAK test_fl_background_task
            await session.execute(text("select 1"))
            holding.set()
            await asyncio.sleep(30)

    asyncio.ensure_future(poll())
    await holding.wait()


@pytest.mark.asyncio
async def test_fl_clean(engine):
    async with AsyncSession(engine) as session:
        await session.execute(text("select 1"))


@pytest.mark.asyncio
async def test_fl_clean_raw():
    conn = await asyncpg.connect(URL)
    try:
        await conn.execute("select 1")
    finally:
        await conn.close()
"""


def leak_lines(source: str) -> dict[str, list[int]]:
    """`# LEAK <owner>` markers: owner -> 1-based line numbers, in file order."""
    found: dict[str, list[int]] = {}
    for number, line in enumerate(source.lstrip("\n").splitlines(), 1):
        if "# LEAK " in line:
            found.setdefault(line.split("# LEAK ")[1].strip(), []).append(number)
    return found


def marker_line(source: str, marker: str) -> int:
    for number, line in enumerate(source.lstrip("\n").splitlines(), 1):
        if marker in line:
            return number
    raise AssertionError(marker)


def write_project(root: Path, ini: str, **files: str) -> Path:
    (root / "pytest.ini").write_text(ini.lstrip())
    for name, text in files.items():
        (root / f"{name}.py").write_text(text.lstrip("\n"))
    return root


def run(
    project: Path,
    server_url: str | None,
    *args: str,
    timeout: float = 180,
    backend: tuple[str, ...] | None = None,
    prefix: tuple[str, ...] = (),
):
    """pytest --leak-check on `project`, in a fresh interpreter, on the given server.

    With `server_url` None the run starts its own local cluster (--leak-check-db=local), whose
    connection log lets the detector skip the per-test server query when nothing changed.
    `backend`, when given, are the options that choose the server instead; `prefix`, a
    command to run pytest under (OUT_OF_SIGHT).
    """
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("CONNGUARD_", "PYTEST_", "DATABASE_URL"))
    }
    if backend is None:
        backend = (
            ("--leak-check-db=local",)
            if server_url is None
            else ("--leak-check-db=url", f"--leak-check-db-url={server_url}")
        )
    command = [
        *prefix, sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--leak-check",
        *backend, *args,
    ]  # fmt: skip
    return subprocess.run(
        command, cwd=project, env=env, capture_output=True, text=True, timeout=timeout
    )


def load_report(path: Path) -> dict:
    return json.loads(path.read_text())


def results_by_owner(report: dict) -> dict[str, dict]:
    """owner -> result; a test's owner is its nodeid's last part, a fixture's is its label.

    An owner with a finding of its own and one found later (an engine it kept, found
    undisposed when the run ended) maps to the first."""
    found = {}
    for result in report["results"]:
        owner = result["owner"]
        key = owner.split("::")[-1] if "::" in owner else owner
        if key not in found or not result["surfaced_later"]:
            found[key] = result
    return found
