"""The client ledger on its own: stack capture, library trimming, install and uninstall."""

from __future__ import annotations

import asyncio
import sys

import greenlet
import pytest

from connguard.leak_detector.ledger import (
    CURRENT_OWNER,
    Ledger,
    Owner,
    capture_frames,
    is_library_file,
    user_frames,
)


def test_capture_walks_from_a_child_greenlet_into_the_parent():
    # SQLAlchemy's asyncio layer checks connections out inside a child greenlet, whose own
    # stack ends where the greenlet started; the caller is in the parent greenlet.
    def inside_child_greenlet():
        return capture_frames(skip=0)

    def the_users_function():
        return greenlet.greenlet(inside_child_greenlet).switch()

    frames = user_frames(the_users_function())
    names = [name for _, _, name in frames]
    assert names[0] == "inside_child_greenlet"
    assert "the_users_function" in names
    assert names.index("the_users_function") < names.index(
        "test_capture_walks_from_a_child_greenlet_into_the_parent"
    )


def test_inside_sqlalchemys_greenlet_the_walk_starts_at_the_awaiting_coroutine():
    from sqlalchemy.util import greenlet_spawn

    def sqlalchemys_sync_side():
        return capture_frames(skip=0)

    async def the_users_coroutine():
        return await greenlet_spawn(sqlalchemys_sync_side)

    names = [code.co_name for code, _ in asyncio.run(the_users_coroutine())]
    assert "sqlalchemys_sync_side" not in names  # not walked: every frame read costs its owner
    assert names == ["greenlet_spawn", "the_users_coroutine"]


def test_lines_are_the_lines_being_executed():
    frames = user_frames(capture_frames(skip=0))  # this line
    (path, line, name) = frames[0]
    assert name == "test_lines_are_the_lines_being_executed"
    source = open(path).read().splitlines()[line - 1]
    assert "capture_frames(skip=0)" in source


def test_capture_stops_at_the_event_loop():
    async def main():
        return capture_frames(skip=0)

    frames = asyncio.run(main())
    assert [code.co_name for code, _ in frames] == ["main"]


@pytest.mark.parametrize(
    ("path", "library"),
    [
        ("/venv/lib/python3.11/site-packages/sqlalchemy/pool/base.py", True),
        ("/venv/lib/python3.11/site-packages/asyncpg/connection.py", True),
        ("/venv/lib/python3.11/site-packages/_pytest/python.py", True),
        ("/venv/lib/python3.11/site-packages/psycopg_pool/pool.py", True),
        ("<frozen runpy>", True),
        ("/src/app/routes/agents.py", False),
        ("/home/me/project/tests/test_db.py", False),
        # the user's own directory named like a library is still the user's
        ("/home/me/project/store/sqlalchemy/repo.py", False),
        ("/home/me/project/app/fastapi/deps.py", False),
    ],
)
def test_library_frames_are_trimmed(path, library):
    assert is_library_file(path) is library


def test_libraries_are_known_where_they_are_installed():
    import sqlalchemy.pool

    from connguard.leak_detector import ledger

    assert is_library_file(sqlalchemy.pool.__file__)
    assert is_library_file(greenlet.__file__)
    assert is_library_file(ledger.__file__)  # an editable install is no site-packages path


def test_the_standard_library_is_trimmed():
    assert is_library_file(asyncio.__file__)
    assert not is_library_file(__file__)


def test_install_wraps_and_uninstall_restores():
    import asyncpg
    import psycopg
    import psycopg_pool
    from sqlalchemy import event
    from sqlalchemy.pool import Pool

    originals = (
        asyncpg.connect,
        asyncpg.create_pool,
        psycopg.connect,
        psycopg.AsyncConnection.__dict__["connect"],
        psycopg_pool.ConnectionPool.__dict__["getconn"],
        Pool.__dict__["__init__"],
    )
    ledger = Ledger(lambda: None)
    ledger.install()
    try:
        assert asyncpg.connect is not originals[0]
        assert psycopg.connect is not originals[2]
        assert psycopg_pool.ConnectionPool.__dict__["getconn"] is not originals[4]
        assert event.contains(Pool, "checkout", ledger._sa_checkout)
        assert event.contains(Pool, "close_detached", ledger._sa_close_detached)
    finally:
        ledger.uninstall()
    assert (
        asyncpg.connect,
        asyncpg.create_pool,
        psycopg.connect,
        psycopg.AsyncConnection.__dict__["connect"],
        psycopg_pool.ConnectionPool.__dict__["getconn"],
        Pool.__dict__["__init__"],
    ) == originals
    assert not event.contains(Pool, "checkout", ledger._sa_checkout)


def test_pools_are_created_normally_after_uninstall(tmp_path):
    # Pool.__new__ cannot be given back to a class once assigned; after uninstall the
    # replacement must behave as object.__new__ did, and tell no ledger.
    from sqlalchemy import create_engine, text

    for _ in range(2):  # a second install (another pytest session in-process) as well
        ledger = Ledger(lambda: None)
        ledger.install()
        seen = create_engine(f"sqlite:///{tmp_path}/a.db", pool_size=2, pool_pre_ping=True)
        ledger.uninstall()
        assert [info for info in ledger.pools if info.target() is seen.pool]
        engine = create_engine(f"sqlite:///{tmp_path}/b.db", pool_size=2, pool_pre_ping=True)
        with engine.connect() as connection:
            assert connection.execute(text("select 1")).scalar() == 1
        engine.dispose()  # recreates the pool, with arguments
        assert (engine.pool.size(), engine.pool._pre_ping) == (2, True)
        assert not [info for info in ledger.pools if info.target() is engine.pool]
        seen.dispose()


def test_create_engine_keeps_its_pool_arguments_while_installed():
    # create_engine() routes pool_* arguments by the names of Pool.__init__'s parameters; the
    # ledger must see every pool without hiding them.
    from sqlalchemy.ext.asyncio import create_async_engine

    async def create() -> None:
        engine = create_async_engine(
            "postgresql+asyncpg://user@127.0.0.1:1/db",
            pool_size=3,
            pool_recycle=30,
            pool_pre_ping=True,
            pool_reset_on_return=None,
            pool_logging_name="p",
        )
        try:
            pool = engine.sync_engine.pool
            assert (pool.size(), pool._recycle, pool._pre_ping) == (3, 30, True)
            assert pool._reset_on_return.name == "reset_none"
            assert [i for i in ledger.pools if i.target() is pool]  # seen at creation
        finally:
            await engine.dispose()

    ledger = Ledger(lambda: None)
    ledger.install()
    try:
        asyncio.run(create())
    finally:
        ledger.uninstall()


def test_install_skips_drivers_that_are_not_installed(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec

    def without_asyncpg(name, *args, **kwargs):
        return None if name == "asyncpg" else real_find_spec(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "asyncpg", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", without_asyncpg)
    ledger = Ledger(lambda: None)
    ledger.install()
    try:
        assert "asyncpg" not in sys.modules
        assert "asyncpg" not in ledger._installed
    finally:
        ledger.uninstall()


def test_the_owner_follows_the_context_into_tasks():
    ledger = Ledger(lambda: Owner("test", "fallback"))
    fixture = Owner("fixture", "db", "session", "")

    async def main():
        token = CURRENT_OWNER.set(fixture)
        task = asyncio.ensure_future(asyncio.sleep(0, result=None))
        CURRENT_OWNER.reset(token)

        async def background():
            return ledger.owner()

        token = CURRENT_OWNER.set(fixture)
        started = asyncio.ensure_future(background())
        CURRENT_OWNER.reset(token)
        await task
        return await started, ledger.owner()

    in_task, outside = asyncio.run(main())
    assert in_task is fixture
    assert outside.name == "fallback"
