"""Named exemptions: the small syntactic facts that move or end ownership of a resource.

Each predicate is one reason a resource is *not* a leak (or one way it is released), with VALID
examples in `EXAMPLES` that the rule tests run. A false positive is a bug with a home here.
"""

from __future__ import annotations

from collections.abc import Iterable

import libcst as cst

# Methods of contextlib.(Async)ExitStack that take over a resource or its close callback.
_EXIT_STACK_METHODS = frozenset(
    {
        "enter_async_context",
        "enter_context",
        "push_async_exit",
        "push",
        "push_async_callback",
        "callback",
    }
)
# Calls that take a coroutine (or a resource) and own it from then on.
_OWNERSHIP_SINKS = frozenset(
    {
        "create_task",
        "ensure_future",
        "start_soon",
        "start",
        "run_coroutine_threadsafe",
        "run_until_complete",
        "run",
        "gather",
        "shield",
        "wait_for",
        "as_completed",
        "wait",
        "spawn",
        "submit",
        "call_soon",
        "call_soon_threadsafe",
        "run_in_executor",
        "timeout",
        "partial",
        "setattr",
        "addCleanup",
        "addAsyncCleanup",
        "add_done_callback",
        "closing",
        "aclosing",
        "AsyncExitStack",
        "ExitStack",
        "weakref",
        "finalize",
        "add_task",
        "add_job",
        "enqueue",
        "call_later",
        "start_task",
        "spawn_task",
    }
)
# Container methods: the resource now lives in a collection its owner manages.
_CONTAINER_METHODS = frozenset(
    {
        "append",
        "add",
        "extend",
        "insert",
        "put",
        "put_nowait",
        "setdefault",
        "appendleft",
        "update",
        "register",
        "push",
        "set",
        "__setitem__",
        "store",
        "attach",
        "track",
    }
)
# A helper whose name says it releases what it is given (close_quietly(s), release_conn(c)).
_RELEASE_WORDS = (
    "close",
    "release",
    "dispose",
    "cleanup",
    "clean_up",
    "shutdown",
    "teardown",
    "terminate",
    "putconn",
    "discard",
    "finaliz",
    "destroy",
    "disconnect",
    "free",
)
# Handler types that catch the exception a pending close must survive, cancellation included.
# `Exception` (which lets CancelledError through) counts too when the handler releases the
# resource: code that closes and re-raises in `except Exception` is written with release
# intent, and flagging it would be noise. One that swallows and closes after the `try` is not.
_CANCELLATION_TOO = frozenset({"BaseException", "CancelledError", "GeneratorExit"})
_CATCH_ALL = _CANCELLATION_TOO | {"Exception"}


def is_exit_stack_method(method: str) -> bool:
    """`await stack.enter_async_context(s)`, `stack.push_async_callback(s.close)`: the stack
    owns it."""
    return method in _EXIT_STACK_METHODS


def is_ownership_sink(callee: str) -> bool:
    """`asyncio.create_task(worker(s))`, `tg.create_task(...)`, `closing(s)`: ownership moves."""
    return callee in _OWNERSHIP_SINKS


def is_container_method(method: str) -> bool:
    """`self._sessions.append(s)`: escapes into a container whose owner manages it."""
    return method in _CONTAINER_METHODS


def is_release_helper(callee: str) -> bool:
    """`await close_quietly(s)`, `release_connection(conn)`: the helper's name says it releases."""
    lowered = callee.lower()
    return any(word in lowered for word in _RELEASE_WORDS)


def is_constructor_name(callee: str) -> bool:
    """`Repository(session)`: a class usually keeps what it is given; its owner must release it."""
    return bool(callee) and callee[0].isupper() and not callee.isupper()


def is_catch_all_handler(
    handler: cst.ExceptHandler | cst.ExceptStarHandler, names: frozenset[str] = _CATCH_ALL
) -> bool:
    """`except:`, `except BaseException:`, `except Exception:` (and tuples containing them)."""
    kind = handler.type
    if kind is None:
        return True
    caught = kind.elements if isinstance(kind, cst.Tuple) else (kind,)
    for item in caught:
        expr = item.value if isinstance(item, cst.Element) else item
        if isinstance(expr, cst.Name) and expr.value in names:
            return True
        if isinstance(expr, cst.Attribute) and expr.attr.value in names:
            return True
    return False


def catches_cancellation(handler: cst.ExceptHandler | cst.ExceptStarHandler) -> bool:
    """`except:`, `except BaseException:`, `except asyncio.CancelledError:`: not `Exception`."""
    return is_catch_all_handler(handler, _CANCELLATION_TOO)


def is_generator_cm_decorator(last_name: str) -> bool:
    """`@contextmanager`/`@asynccontextmanager`: code after `yield` is the exit, run by `with`."""
    return last_name in ("contextmanager", "asynccontextmanager")


def is_fixture_decorator(last_name: str) -> bool:
    """`@pytest.fixture`: pytest resumes the generator for teardown even when the test failed,
    so the code after `yield` always runs (no exception is thrown into the fixture)."""
    return last_name in ("fixture", "yield_fixture", "async_fixture")


def is_expected_failure(callee: str) -> bool:
    """`with pytest.raises(...)`, `self.assertRaises(...)`, `pytest.warns(...)`: the code inside is
    meant to fail (or to warn about a leak); a resource it creates is the point of the test."""
    return callee in ("raises", "warns", "RaisesGroup") or callee.startswith(
        ("assertRaises", "assertWarns", "assert_raises", "expect_raises", "expect_warnings")
    )


def is_release_all(callee: str) -> bool:
    """`close_all_sessions()`, `Session.close_all()`: closes every session there is."""
    return "close_all" in callee


def is_shielding_with(item_text: str) -> bool:
    """`with anyio.CancelScope(shield=True):` / `move_on_after(..., shield=True)` protects an
    await."""
    return "shield" in item_text


def is_pool_teardown(method: str) -> bool:
    """`pool.terminate()`: asyncpg, aiopg and aiomysql pools close every connection they handed
    out, acquired or not (`close()` instead waits for them to be released)."""
    return method == "terminate"


def is_shared_product(decorators: Iterable[str]) -> bool:
    """`@functools.lru_cache` / `@cache` (or cachetools' `@cached`, async-lru's `@alru_cache`)
    on `def get_engine(): return create_async_engine(...)`, and `@property`/`@cached_property`:
    every call hands out the one object the first call made, so a caller is not its creator
    and need not dispose it."""
    return any(
        name in ("cache", "lru_cache", "cached", "alru_cache", "property", "cached_property")
        for name in decorators
    )


def keeps_no_connections(call: cst.CSTNode) -> bool:
    """`create_async_engine(url, poolclass=NullPool)`: every connection is closed when it is
    released, so an engine never disposed holds none."""
    if type(call) is not cst.Call:
        return False
    for arg in call.args:
        if arg.keyword is not None and arg.keyword.value == "poolclass":
            value = arg.value
            name = value.attr.value if type(value) is cst.Attribute else getattr(value, "value", "")
            return name == "NullPool"
    return False


def is_memoized_getter(returns: Iterable[cst.BaseExpression], self_name: str, attr: str) -> bool:
    """`self._engine = create_async_engine(...); return self._engine`: a lazy getter hands the one
    cached resource to every caller, and whoever asked for it (an app's shutdown hook) releases
    it; the object that caches it is not its owner."""
    for value in returns:
        if (
            type(value) is cst.Attribute
            and type(value.value) is cst.Name
            and value.value.value == self_name
            and value.attr.value == attr
        ):
            return True
    return False


# VALID examples, one per exemption; tests assert none of them is flagged.
EXAMPLES: dict[str, str] = {
    "exit-stack": """
from contextlib import AsyncExitStack
from sqlalchemy.ext.asyncio import async_sessionmaker

AsyncSessionLocal = async_sessionmaker()

async def run():
    async with AsyncExitStack() as stack:
        session = await stack.enter_async_context(AsyncSessionLocal())
        stack.push_async_callback(session.close)
        return await session.execute("select 1")
""",
    "cached-factory": """
import functools
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

@functools.lru_cache(maxsize=None)
def get_engine():
    return create_async_engine("postgresql+asyncpg://localhost/app")

async def count():
    engine = get_engine()
    async with engine.connect() as conn:
        return await conn.scalar(text("select 1"))
""",
    "conditional-expression": """
from sqlalchemy.ext.asyncio import async_sessionmaker

AsyncSessionLocal = async_sessionmaker()
ReplicaSession = async_sessionmaker()

async def fetch(query, replica):
    session = ReplicaSession() if replica else AsyncSessionLocal()
    async with session:
        return await session.execute(query)

async def fetch_closing(query, replica):
    session = ReplicaSession() if replica else AsyncSessionLocal()
    try:
        return await session.execute(query)
    finally:
        await session.close()
""",
    "walrus-with": """
from sqlalchemy.ext.asyncio import async_sessionmaker

AsyncSessionLocal = async_sessionmaker()

async def fetch(query):
    async with (session := AsyncSessionLocal()):
        return await session.execute(query)
""",
    "module-engine-getter": """
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

engine = create_async_engine("postgresql+asyncpg://localhost/app")

def get_engine():
    return engine

async def count():
    shared = get_engine()
    async with shared.connect() as conn:
        return await conn.scalar(text("select 1"))
""",
    "unused-session": """
from sqlalchemy.ext.asyncio import async_sessionmaker

AsyncSessionLocal = async_sessionmaker()

async def fetch(query, load_options, item):
    session = AsyncSessionLocal()  # holds no connection until its first query
    session.add(item)
    options = await load_options()
    try:
        return await session.execute(query, execution_options=options)
    finally:
        await session.close()

def saver(session):
    async def save(item):
        session.add(item)
        await session.flush()
    return save

async def save_all(items, load_options):
    session = AsyncSessionLocal()
    save = saver(session)  # not awaited: an AsyncSession cannot query here
    await load_options()
    try:
        for item in items:
            await save(item)
    finally:
        await session.close()
""",
    "null-pool-engine": """
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

async def count(url):
    engine = create_async_engine(url, poolclass=NullPool)
    async with engine.connect() as conn:
        return await conn.scalar(text("select 1"))
""",
    "ownership-sink": """
import asyncio
from sqlalchemy.ext.asyncio import async_sessionmaker

AsyncSessionLocal = async_sessionmaker()

async def worker(session):
    async with session:
        await session.execute("select 1")

async def run():
    asyncio.create_task(worker(AsyncSessionLocal()))
""",
    "container": """
from sqlalchemy.ext.asyncio import async_sessionmaker

AsyncSessionLocal = async_sessionmaker()

class Pool:
    def __init__(self):
        self._sessions = []

    def open(self):
        self._sessions.append(AsyncSessionLocal())
""",
    "release-helper": """
from sqlalchemy.ext.asyncio import async_sessionmaker

AsyncSessionLocal = async_sessionmaker()
from app.util import close_quietly

async def run():
    session = AsyncSessionLocal()
    try:
        await session.execute("select 1")
    finally:
        await close_quietly(session)
""",
    "constructor": """
from sqlalchemy.ext.asyncio import async_sessionmaker

AsyncSessionLocal = async_sessionmaker()
from app.repo import Repository

def make_repository():
    session = AsyncSessionLocal()
    repository = Repository(session)
    return repository
""",
    "catch-all-handler": """
from sqlalchemy.ext.asyncio import async_sessionmaker

AsyncSessionLocal = async_sessionmaker()

async def make():
    session = AsyncSessionLocal()
    try:
        await session.execute("select 1")
    except BaseException:
        await session.close()
        raise
    return session
""",
    "generator-cm": """
from contextlib import asynccontextmanager
from sqlalchemy.ext.asyncio import async_sessionmaker

AsyncSessionLocal = async_sessionmaker()

@asynccontextmanager
async def session_scope():
    session = AsyncSessionLocal()
    try:
        yield session
    finally:
        await session.close()
""",
    "expected-failure": """
import pytest
import asyncpg

async def test_refused():
    with pytest.raises(OSError):
        await asyncpg.connect("postgresql://nowhere/db")
""",
    "pool-teardown": """
import asyncpg

async def test_terminate_with_acquired_connections(dsn):
    pool = await asyncpg.create_pool(dsn)
    conn = await pool.acquire()
    pool.terminate()
    assert conn.is_closed()
""",
    "memoized-getter": """
from sqlalchemy.ext.asyncio import create_async_engine

class DatabaseSettings:
    _engine = None

    def get_engine(self):
        if self._engine is None:
            self._engine = create_async_engine("postgresql+asyncpg://app")
        return self._engine
""",
    "fixture": """
import pytest
from sqlalchemy.ext.asyncio import async_sessionmaker

AsyncSessionLocal = async_sessionmaker()

@pytest.fixture
async def session():
    session = AsyncSessionLocal()
    yield session
    await session.close()
""",
}
