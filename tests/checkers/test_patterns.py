"""The 50 patterns of PATTERNS.md and the issue-2 bullets, each a real snippet with its verdict.

Snippets mark the expected finding at the end of the flagged line (`# CG101`); a snippet
without marks must be clean.
"""

from __future__ import annotations

import pytest
from test_rules import expected_marks

from connguard.checkers.analysis import check_module, module_factories
from connguard.checkers.resources import DEFAULT_TABLE, ResourceSpec
from connguard.checkers.rules import RULES

PRE = """\
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

engine = create_async_engine("postgresql+asyncpg://localhost/app")
AsyncSessionLocal = async_sessionmaker(engine, expire_on_commit=False)
"""

PATTERNS: dict[str, str] = {
    "01-canonical-leak": PRE
    + """
async def list_agents(q):
    session = AsyncSessionLocal()  # CG101
    result = await session.execute(q)
    return result.scalars().all()
""",
    "02-async-with": PRE
    + """
async def list_agents(q):
    async with AsyncSessionLocal() as session:
        return (await session.execute(q)).scalars().all()
""",
    "03-happy-path-close": PRE
    + """
async def list_agents(q):
    session = AsyncSessionLocal()  # CG102
    result = await session.execute(q)
    await session.close()
    return result.scalars().all()
""",
    "04-try-finally": PRE
    + """
async def list_agents(q):
    session = AsyncSessionLocal()
    try:
        return (await session.execute(q)).scalars().all()
    finally:
        await session.close()
""",
    "05-none-guarded-finally": PRE
    + """
async def list_agents(q):
    session = None
    try:
        session = AsyncSessionLocal()
        return (await session.execute(q)).scalars().all()
    finally:
        if session is not None:
            await session.close()
""",
    "06-inverted-guard": PRE
    + """
async def list_agents(q):
    session = None
    try:
        session = AsyncSessionLocal()  # CG101
        return (await session.execute(q)).scalars().all()
    finally:
        if session is None:
            await session.close()
""",
    "07-helper-factory": PRE
    + """
def make():
    return AsyncSessionLocal()
""",
    "08-configure-and-return": PRE
    + """
def make():
    s = AsyncSessionLocal()
    s.info["k"] = "v"
    return s
""",
    "09-consumed-inside-return": PRE
    + """
async def rows(q):
    return (await AsyncSessionLocal().execute(q)).scalars().all()  # CG101
""",
    "10-consumed-bare": PRE
    + """
async def touch(q):
    await AsyncSessionLocal().execute(q)  # CG101
""",
    "11-caller-of-user-factory": PRE
    + """
def make():
    return AsyncSessionLocal()

async def use(q):
    s = make()  # CG101
    return await s.execute(q)
""",
    "12-dependency-returns": PRE
    + """
from fastapi import Depends, FastAPI

app = FastAPI()

def get_db():
    return AsyncSessionLocal()  # CG106

@app.get("/items")
async def items(db: AsyncSession = Depends(get_db)):
    return []
""",
    "13-dependency-yield-finally": PRE
    + """
from fastapi import Depends

async def get_db():
    s = AsyncSessionLocal()
    try:
        yield s
    finally:
        await s.close()

async def items(db=Depends(get_db)):
    return []
""",
    "14-dependency-async-with": PRE
    + """
from fastapi import Depends

async def get_db():
    async with AsyncSessionLocal() as s:
        yield s

async def items(db=Depends(get_db)):
    return []
""",
    "15-dependency-close-after-yield": PRE
    + """
from fastapi import Depends

async def get_db():
    s = AsyncSessionLocal()  # CG102
    yield s
    await s.close()

async def items(db=Depends(get_db)):
    return []
""",
    "16-asynccontextmanager": PRE
    + """
from contextlib import asynccontextmanager

@asynccontextmanager
async def scope():
    s = AsyncSessionLocal()
    try:
        yield s
    finally:
        await s.close()
""",
    "17-contextmanager": """
from contextlib import contextmanager
from sqlalchemy.orm import sessionmaker

SessionLocal = sessionmaker()

@contextmanager
def scope():
    s = SessionLocal()
    try:
        yield s
    finally:
        s.close()
""",
    "18-stored-on-self-released": PRE
    + """
class Repo:
    def __init__(self):
        self.session = AsyncSessionLocal()

    async def close(self):
        await self.session.close()
""",
    "19-stored-on-self-never-released": PRE
    + """
class Repo:
    def __init__(self):
        self.session = AsyncSessionLocal()  # CG101

    async def get(self, q):
        return await self.session.execute(q)
""",
    "20-aenter-aexit": PRE
    + """
class Unit:
    async def __aenter__(self):
        self.session = AsyncSessionLocal()
        return self

    async def __aexit__(self, *exc):
        await self.session.close()
""",
    "21-enter-exit": """
from sqlalchemy.orm import Session

class Unit:
    def __init__(self, engine):
        self.engine = engine

    def __enter__(self):
        self.session = Session(self.engine)
        return self

    def __exit__(self, *exc):
        self.session.close()
""",
    "22-enter-async-context": PRE
    + """
from contextlib import AsyncExitStack

async def run(q):
    async with AsyncExitStack() as stack:
        s = await stack.enter_async_context(AsyncSessionLocal())
        return await s.execute(q)
""",
    "23-enter-context-on-async-stack": """
from contextlib import AsyncExitStack
from sqlalchemy.orm import sessionmaker

SessionLocal = sessionmaker()

async def run(q):
    async with AsyncExitStack() as stack:
        s = stack.enter_context(SessionLocal())
        return s.execute(q)
""",
    "24-stack-parameter": PRE
    + """
async def open_session(stack):
    s = await stack.enter_async_context(AsyncSessionLocal())
    return s
""",
    "25-push-async-callback": PRE
    + """
from contextlib import AsyncExitStack

async def run(q, stack: AsyncExitStack):
    s = AsyncSessionLocal()
    stack.push_async_callback(s.close)
    return await s.execute(q)
""",
    "26-aclosing": PRE
    + """
from contextlib import aclosing

async def run(q):
    async with aclosing(AsyncSessionLocal()) as s:
        return await s.execute(q)
""",
    "27-passed-to-non-owner": PRE
    + """
async def run(repo):
    return await repo.list(AsyncSessionLocal())  # CG101
""",
    "27b-create-task-sink": PRE
    + """
import asyncio

async def worker(s):
    async with s:
        await s.execute("select 1")

async def run():
    asyncio.create_task(worker(AsyncSessionLocal()))
""",
    "28-appended-to-self-container": PRE
    + """
class Holder:
    def __init__(self):
        self._sessions = []

    def add(self):
        self._sessions.append(AsyncSessionLocal())
""",
    "29-overwritten": PRE
    + """
async def run(q):
    s = AsyncSessionLocal()  # CG101
    s = AsyncSessionLocal()
    await s.close()
""",
    "30-conditional-creation": PRE
    + """
async def run(q, flag):
    if flag:
        s = AsyncSessionLocal()
    else:
        s = AsyncSession(engine)
    async with s:
        await s.execute(q)
""",
    "31-close-in-one-branch": PRE
    + """
async def run(q):
    s = AsyncSessionLocal()  # CG101
    result = await s.execute(q)
    if result:
        await s.close()
    return result
""",
    "32-early-return": PRE
    + """
async def run(q, user):
    s = AsyncSessionLocal()  # CG101
    if user is None:
        return None
    try:
        return await s.execute(q)
    finally:
        await s.close()
""",
    "33a-del": PRE
    + """
async def run(q):
    session = AsyncSessionLocal()  # CG101
    await session.execute(q)
    del session
""",
    "33b-set-none": PRE
    + """
async def run(q):
    session = AsyncSessionLocal()  # CG101
    await session.execute(q)
    session = None
""",
    "34-close-quietly-helper": PRE
    + """
async def close_quietly(s):
    try:
        await s.close()
    except Exception:
        pass

async def run(q):
    s = AsyncSessionLocal()
    try:
        return await s.execute(q)
    finally:
        await close_quietly(s)
""",
    "35-cleanup-on-failure-factory": PRE
    + """
async def make(q):
    s = AsyncSessionLocal()
    try:
        await s.execute(q)
    except:
        await s.close()
        raise
    return s
""",
    "36-close-only-in-except": PRE
    + """
async def run(q):
    s = AsyncSessionLocal()  # CG101
    try:
        return await s.execute(q)
    except Exception:
        await s.close()
        raise
""",
    "37-loop-no-close": PRE
    + """
async def run(qs):
    for q in qs:
        s = AsyncSessionLocal()  # CG101
        await s.execute(q)
""",
    "38-comprehension-in-return": PRE
    + """
async def run(qs):
    return [await AsyncSessionLocal().execute(q) for q in qs]  # CG101
""",
    "39-immediate-release": PRE
    + """
async def run():
    await AsyncSessionLocal().close()
""",
    "40-close-not-awaited": PRE
    + """
async def run(q):
    session = AsyncSessionLocal()  # CG103
    try:
        return await session.execute(q)
    finally:
        session.close()
""",
    "41-sync-with-on-async": PRE
    + """
async def run(q):
    with AsyncSessionLocal() as s:  # CG104
        return await s.execute(q)
""",
    "42-begin-only": PRE
    + """
async def run(item):
    session = AsyncSessionLocal()  # CG105
    async with session.begin():
        session.add(item)
""",
    "43-maker-begin": PRE
    + """
async def run(item):
    async with AsyncSessionLocal.begin() as s:
        s.add(item)
""",
    "44a-engine-connect-leak": PRE
    + """
async def run(q):
    conn = await engine.connect()  # CG101
    return await conn.execute(q)
""",
    "44b-engine-connect-with": PRE
    + """
async def run(q):
    async with engine.connect() as conn:
        return await conn.execute(q)

async def run2(q):
    async with engine.begin() as conn:
        return await conn.execute(q)
""",
    "45a-asyncpg-connect": """
import asyncpg

async def run(dsn):
    conn = await asyncpg.connect(dsn)  # CG101
    return await conn.fetch("select 1")
""",
    "45b-asyncpg-acquire": """
import asyncpg

async def run(pool: asyncpg.Pool):
    conn = await pool.acquire()  # CG101
    return await conn.fetch("select 1")
""",
    "45c-asyncpg-acquire-with": """
import asyncpg

async def run(pool: asyncpg.Pool):
    async with pool.acquire() as conn:
        return await conn.fetch("select 1")
""",
    "45d-asyncpg-release-on-pool": """
import asyncpg

async def run(pool: asyncpg.Pool):
    conn = await pool.acquire()
    try:
        return await conn.fetch("select 1")
    finally:
        await pool.release(conn)
""",
    "46a-scoped-remove-in-finally": PRE
    + """
from asyncio import current_task
from sqlalchemy.ext.asyncio import async_scoped_session

Session = async_scoped_session(AsyncSessionLocal, scopefunc=current_task)

async def run(q):
    s = Session()
    try:
        return await s.execute(q)
    finally:
        await Session.remove()
""",
    "46b-scoped-remove-not-in-finally": PRE
    + """
from asyncio import current_task
from sqlalchemy.ext.asyncio import async_scoped_session

Session = async_scoped_session(AsyncSessionLocal, scopefunc=current_task)

async def run(q):
    s = Session()  # CG102
    result = await s.execute(q)
    await Session.remove()
    return result
""",
    "47-module-level-session": PRE
    + """
session = AsyncSessionLocal()  # CG108

async def items(q):
    return (await session.execute(q)).all()
""",
    "48-trio-unshielded": PRE
    + """
import trio

async def run(q):
    s = AsyncSessionLocal()  # CG109
    try:
        return await s.execute(q)
    finally:
        await s.close()
""",
    "49-class-constructor": PRE
    + """
async def run(q):
    s = AsyncSession(engine)  # CG101
    return await s.execute(q)
""",
    "50-alias-then-close": PRE
    + """
async def run(q):
    s = AsyncSessionLocal()
    s2 = s
    try:
        return await s2.execute(q)
    finally:
        await s2.close()
""",
}

# The issue-2 "Not flagged" / "Flagged" bullets beyond the patterns above.
BULLETS: dict[str, str] = {
    "multi-item-async-with": PRE
    + """
async def run(q):
    async with AsyncSessionLocal() as a, AsyncSessionLocal() as b:
        await a.execute(q)
        await b.execute(q)
""",
    "parenthesised-async-with": PRE
    + """
async def run(q):
    async with (
        AsyncSessionLocal() as a,
        AsyncSessionLocal() as b,
    ):
        await a.execute(q)
""",
    "maker-begin-bare": PRE
    + """
async def run(q):
    async with AsyncSessionLocal.begin():
        pass
""",
    "release-aclose-dispose-release-aexit": PRE
    + """
import asyncpg
from sqlalchemy.ext.asyncio import create_async_engine

async def a(q):
    s = AsyncSessionLocal()
    try:
        await s.execute(q)
    finally:
        await s.__aexit__(None, None, None)

async def b(url):
    e = create_async_engine(url)
    try:
        async with e.connect() as c:
            await c.exec_driver_sql("select 1")
    finally:
        await e.dispose()

async def c(dsn):
    pool = await asyncpg.create_pool(dsn)
    try:
        conn = await pool.acquire()
        try:
            await conn.fetch("select 1")
        finally:
            await pool.release(conn)
    finally:
        await pool.close()
""",
    "fixture-yield-finally": PRE
    + """
import pytest

@pytest.fixture
async def session():
    s = AsyncSessionLocal()
    try:
        yield s
    finally:
        await s.close()
""",
    "stored-on-self-shutdown": """
import asyncpg

class Db:
    async def start(self, dsn):
        self.pool = await asyncpg.create_pool(dsn)

    async def shutdown(self):
        await self.pool.close()
""",
    "appended-released-in-finally": PRE
    + """
async def run(qs):
    sessions = []
    try:
        for q in qs:
            sessions.append(AsyncSessionLocal())
    finally:
        for s in sessions:
            await s.close()
""",
    "parameter-shadows-factory": PRE
    + """
async def run(AsyncSessionLocal, q):
    s = AsyncSessionLocal()
    return await s.execute(q)

async def local(q):
    AsyncSessionLocal = object
    s = AsyncSessionLocal()
    return s
""",
    "close-last-statement-awaited-work-before": PRE
    + """
async def run(q):
    s = AsyncSessionLocal()  # CG102
    await s.execute(q)
    await s.commit()
    await s.close()
""",
    "anext-dependency-never-finished": PRE
    + """
async def get_db():
    async with AsyncSessionLocal() as s:
        yield s

async def script(q):
    db = await anext(get_db())  # CG101
    await db.execute(q)
""",
    "connection-to-helper-that-does-not-close": """
import asyncpg

async def helper(conn):
    return await conn.fetch("select 1")

async def run(dsn):
    conn = await asyncpg.connect(dsn)  # CG101
    return await helper(conn)
""",
    "pool-on-object-never-closed": """
import asyncpg

class Db:
    async def start(self, dsn):
        self.pool = await asyncpg.create_pool(dsn)  # CG107

    async def fetch(self):
        async with self.pool.acquire() as conn:
            return await conn.fetch("select 1")
""",
    "begin-awaited-taken-for-close": PRE
    + """
async def run(item):
    s = AsyncSessionLocal()  # CG105
    s.add(item)
    await s.commit()
""",
    "sessionmaker-class-async": """
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import sessionmaker

SessionLocal = sessionmaker(class_=AsyncSession, expire_on_commit=False)

async def run(q):
    s = SessionLocal()  # CG101
    return await s.execute(q)
""",
    "aliased-import": """
from sqlalchemy.ext.asyncio import AsyncSession as S

async def run(engine, q):
    s = S(engine)  # CG101
    return await s.execute(q)
""",
    "aliased-maker": PRE
    + """
Maker = AsyncSessionLocal

async def run(q):
    s = Maker()  # CG101
    return await s.execute(q)
""",
    "psycopg-async": """
import psycopg

async def run(dsn):
    conn = await psycopg.AsyncConnection.connect(dsn)  # CG101
    return await conn.execute("select 1")

async def ok(dsn):
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        return await conn.execute("select 1")
""",
    "psycopg-pool-per-call": """
from psycopg_pool import AsyncConnectionPool

async def run(dsn):
    pool = AsyncConnectionPool(dsn)  # CG107
    async with pool.connection() as conn:
        await conn.execute("select 1")

async def ok(dsn):
    async with AsyncConnectionPool(dsn) as pool:
        async with pool.connection() as conn:
            await conn.execute("select 1")
""",
    "aiosqlite-and-aiomysql": """
import aiomysql
import aiosqlite

async def a(path):
    db = await aiosqlite.connect(path)  # CG101
    await db.execute("select 1")

async def b(path):
    async with aiosqlite.connect(path) as db:
        await db.execute("select 1")

async def c():
    conn = await aiomysql.connect()
    try:
        await conn.ping()
    finally:
        conn.close()
""",
    "sync-session-leak-and-with": """
from sqlalchemy.orm import Session, sessionmaker

SessionLocal = sessionmaker()

def a(q):
    s = SessionLocal()  # CG101
    return s.execute(q).all()

def b(engine, q):
    with Session(engine) as s:
        return s.execute(q).all()
""",
    "engine-inside-function-never-disposed": """
from sqlalchemy.ext.asyncio import create_async_engine

async def run(url):
    engine = create_async_engine(url)  # CG107
    async with engine.connect() as conn:
        await conn.exec_driver_sql("select 1")
""",
    "self-factory-attribute": """
from sqlalchemy.ext.asyncio import async_sessionmaker

class Repo:
    def __init__(self, engine):
        self.session_factory = async_sessionmaker(engine)

    async def get(self, q):
        s = self.session_factory()  # CG101
        return await s.execute(q)

    async def ok(self, q):
        async with self.session_factory() as s:
            return await s.execute(q)
""",
    "function-level-import": """
async def run(dsn):
    import asyncpg

    conn = await asyncpg.connect(dsn)  # CG101
    return await conn.fetch("select 1")
""",
    "wrapper-alias": PRE
    + """
class UserRepository:
    def __init__(self, session):
        self.session = session

async def leaks(user_id):
    session = AsyncSessionLocal()  # CG101
    repo = UserRepository(session)
    return await repo.get(user_id)

def hands_over():
    session = AsyncSessionLocal()
    repo = UserRepository(session)
    return repo

async def closes_through_wrapper(user_id):
    repo = UserRepository(AsyncSessionLocal())
    try:
        return await repo.get(user_id)
    finally:
        await repo.close()
""",
    "expected-failure-block": """
import asyncpg
import pytest

async def test_refused():
    with pytest.raises(OSError):
        await asyncpg.connect("postgresql://nowhere/db")
""",
    "factory-registering-cleanup": """
from sqlalchemy import orm

_sessions = set()

def fixture_session(**kw):
    sess = orm.Session(**kw)
    _sessions.add(sess)
    return sess

def test_uses():
    s = fixture_session()
    s.execute("select 1")
""",
    "chained-with-item": """
from sqlalchemy import create_engine

def reap(url):
    eng = create_engine(url)
    with eng.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("select 1")
""",
    "annotated-dependency": PRE
    + """
from typing import Annotated
from fastapi import Depends

def get_db():
    return AsyncSessionLocal()  # CG106

SessionDep = Annotated[AsyncSession, Depends(get_db)]
""",
    "background-task-owns": PRE
    + """
async def endpoint(background_tasks, process):
    session = AsyncSessionLocal()
    background_tasks.add_task(process, session)
    return {"ok": True}
""",
    "cached-singleton-getter": """
from sqlalchemy.ext.asyncio import create_async_engine

_engine = None

def _get_engine():
    global _engine
    if _engine is None:
        _engine = create_async_engine("postgresql+asyncpg://localhost/app")
    return _engine

async def init_db():
    engine = _get_engine()
    async with engine.begin() as conn:
        await conn.exec_driver_sql("select 1")
""",
    "logging-before-try": PRE
    + """
import logging

logger = logging.getLogger(__name__)

async def get_db():
    db = AsyncSessionLocal()
    logger.debug("Opening new DB session")
    try:
        yield db
    finally:
        await db.close()
""",
    "optional-session-parameter": PRE
    + """
async def seed(db=None):
    db_session = db
    if db_session is None:
        db_session = AsyncSessionLocal()
    try:
        await db_session.execute("select 1")
        return
    finally:
        if db is None:
            await db_session.close()
""",
    "exception-swallowed-then-return": """
import asyncpg

async def check(url, setup):
    try:
        conn = await asyncpg.connect(url)  # CG102
        if not await setup(conn):
            await conn.close()
            return False
        await conn.close()
        return True
    except Exception:
        return False
""",
    "session-or-fresh": PRE
    + """
async def seed(db=None):
    db_session = db or AsyncSessionLocal()
    try:
        await db_session.execute("select 1")
    finally:
        if db is None:
            await db_session.close()
""",
    "session-bound-to-outer-connection": """
import pytest
from sqlalchemy.orm import Session

@pytest.fixture
def session(engine):
    connection = engine.connect()
    transaction = connection.begin()
    session = Session(bind=connection, expire_on_commit=False)
    savepoint = connection.begin_nested()
    try:
        yield session
    finally:
        session.close()
        transaction.rollback()
        connection.close()
""",
    "engine-behind-local-maker": """
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

async def script(url):
    engine = create_async_engine(url)  # CG107
    maker = async_sessionmaker(engine)
    async with maker() as session:
        await session.execute("select 1")

async def disposed(url):
    engine = create_async_engine(url)
    maker = async_sessionmaker(engine)
    try:
        async with maker() as session:
            await session.execute("select 1")
    finally:
        await engine.dispose()

def handed_over(url):
    engine = create_async_engine(url)
    maker = async_sessionmaker(engine)
    return maker
""",
    "close-all-sessions": PRE
    + """
from sqlalchemy.ext.asyncio import close_all_sessions

async def test_close_all():
    s1 = AsyncSession(engine)
    s2 = AsyncSession(engine)
    await close_all_sessions()
""",
    "session-close-all-classmethod": """
from sqlalchemy.orm import Session

def test_close_all(engine):
    s1 = Session(engine)
    Session.close_all()
""",
    "expect-raises-helper": """
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.testing import expect_raises_message

def test_bad_option(url):
    with expect_raises_message(ValueError, "bad"):
        create_async_engine(url, bad=True)
""",
    "raw-connection": """
from sqlalchemy import create_engine

engine = create_engine("postgresql://localhost/app")

def copy_rows():
    conn = engine.raw_connection()  # CG101
    cursor = conn.cursor()
    cursor.execute("select 1")
""",
    "app-state-pool": """
import asyncpg
from fastapi import FastAPI, Request

app = FastAPI()

@app.on_event("startup")
async def startup():
    app.state.pool = await asyncpg.create_pool("postgresql://localhost/app")

@app.get("/leaks")
async def leaks(request: Request):
    conn = await request.app.state.pool.acquire()  # CG101
    return await conn.fetch("select 1")

@app.get("/ok")
async def ok(request: Request):
    async with request.app.state.pool.acquire() as conn:
        return await conn.fetch("select 1")
""",
    "wait-for-connect": """
import asyncio
import asyncpg

async def leaks(dsn):
    conn = await asyncio.wait_for(asyncpg.connect(dsn), timeout=10)  # CG101
    return await conn.fetch("select 1")

async def ok(dsn):
    conn = await asyncio.wait_for(asyncpg.connect(dsn), timeout=10)
    try:
        return await conn.fetch("select 1")
    finally:
        await asyncio.wait_for(conn.close(), timeout=5)
""",
    "class-attribute-maker": PRE
    + """
class Repo:
    maker = AsyncSessionLocal

    async def get(self, q):
        s = self.maker()  # CG101
        return await s.execute(q)
""",
    "main-block-is-not-shared": PRE
    + """
import asyncio

if __name__ == "__main__":
    session = AsyncSessionLocal()
    asyncio.run(session.close())
""",
    "metric-before-try": """
import time
from sqlalchemy.orm import scoped_session, sessionmaker

def task(engine, metrics, func):
    CoreSession = scoped_session(sessionmaker(bind=engine))
    db_session = CoreSession()
    metrics.counter("function.call.counter", tags={"function": func.__name__})
    start = time.perf_counter()
    try:
        func(db_session)
    finally:
        db_session.close()
        CoreSession.remove()
""",
    "resource-call-before-try": """
from sqlalchemy.orm import sessionmaker

Session = sessionmaker()

def fixture():
    session = Session()  # CG102
    session.begin_nested()
    try:
        yield session
    finally:
        session.close()
""",
    "alembic-migration-session": """
from alembic import op
from sqlalchemy.orm import Session

def upgrade():
    bind = op.get_bind()
    session = Session(bind=bind)
    for row in session.query(object).all():
        session.delete(row)
    session.commit()
""",
    "unbound-session-class": """
from sqlalchemy.orm import Session

def test_compile(query):
    sess = Session()
    return str(sess.query(query))
""",
    "created-in-handler": PRE
    + """
async def fallback(cache, q):
    try:
        return cache[q]
    except KeyError:
        s = AsyncSessionLocal()  # CG101
        return await s.execute(q)
""",
    "handler-without-raising-body": PRE
    + """
async def lookup(d, k):
    s = AsyncSessionLocal()
    try:
        x = d[k]
    except KeyError:
        x = None
    await s.close()
    return x
""",
    "nested-cleanup-fixture": """
import pytest
from sqlalchemy.ext.asyncio import async_sessionmaker

@pytest.fixture
async def s(async_engine):
    connection = await async_engine.connect()  # CG102
    transaction = await connection.begin()
    try:
        session_factory = async_sessionmaker(bind=connection, expire_on_commit=False)
        session_instance = session_factory()
        try:
            yield session_instance
        finally:
            try:
                await session_instance.rollback()
            except Exception:
                pass
            finally:
                try:
                    await session_instance.close()
                except Exception:
                    pass
    finally:
        try:
            if transaction.is_active:
                await transaction.rollback()
        except Exception:
            pass
        finally:
            try:
                await connection.close()
            except Exception:
                pass
""",
    "global-pool": """
import asyncpg

pool = None

async def init(dsn):
    global pool
    pool = await asyncpg.create_pool(dsn)

async def fetch():
    conn = await pool.acquire()  # CG101
    return await conn.fetch("select 1")
""",
}


def run(source: str, **kwargs) -> set[tuple[int, str]]:
    found = check_module(source, "snippet.py", table=DEFAULT_TABLE, enabled=set(RULES), **kwargs)
    return {(f.line, f.code) for f in found}


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_pattern_verdict(name: str) -> None:
    source = PATTERNS[name]
    assert run(source) == expected_marks(source)


@pytest.mark.parametrize("name", sorted(BULLETS))
def test_issue_bullet_verdict(name: str) -> None:
    source = BULLETS[name]
    assert run(source) == expected_marks(source)


def test_all_fifty_patterns_are_covered() -> None:
    numbers = {name.split("-", 1)[0].rstrip("abcd") for name in PATTERNS}
    assert numbers == {f"{n:02d}" for n in range(1, 51)}


def test_seed_outage_message_and_position() -> None:
    source = (
        "from app.db import AsyncSessionLocal\n"
        "async def list_agents():\n"
        "    session = AsyncSessionLocal()\n"
        "    result = await session.execute(AGENTS)\n"
        "    return list(result.scalars().all())\n"
    )

    class Resolver:
        def resolve(self, module: str, name: str) -> ResourceSpec | None:
            db = (
                "from sqlalchemy.ext.asyncio import async_sessionmaker\n"
                "AsyncSessionLocal = async_sessionmaker()\n"
            )
            return module_factories(db).get(name) if module == "app.db" else None

    found = check_module(source, "app/routes/agents.py", table=DEFAULT_TABLE, imports=Resolver())
    assert [f.text() for f in found] == [
        "app/routes/agents.py:3:15: CG101 AsyncSession created here is never closed; "
        'use "async with AsyncSessionLocal() as session:"'
    ]


def test_without_resolver_project_imports_are_unknown() -> None:
    source = "from app.db import AsyncSessionLocal\nasync def f():\n    s = AsyncSessionLocal()\n"  # noqa: E501
    assert run(source) == set()


def test_module_factories_exports_makers_factories_and_engines() -> None:
    source = (
        PRE
        + "\ndef make():\n    return AsyncSessionLocal()\n"
        + "\nasync def amake():\n    return AsyncSession(engine)\n"
    )
    exported = module_factories(source)
    assert set(exported) >= {"AsyncSessionLocal", "make", "amake", "engine"}
    assert exported["AsyncSessionLocal"].call.name == "AsyncSession"
    assert exported["make"].call.name == "AsyncSession"
    assert exported["amake"].call.awaited
    assert exported["engine"].product("connect") is not None


def test_relative_import_resolved_with_module_name() -> None:
    source = """
from .session import Session
def f(engine, q):
    s = Session(engine)  # CG101
    return s.execute(q)
"""
    assert run(source, module_name="sqlalchemy.orm.scoping") == expected_marks(source)
    assert run(source, module_name="myapp.orm.scoping") == set()


def test_default_off_rule_needs_selection() -> None:
    source = PATTERNS["48-trio-unshielded"]
    assert check_module(source, "x.py") == []


def test_end_position_is_exclusive_one_based() -> None:
    source = PATTERNS["01-canonical-leak"]
    (finding,) = check_module(source, "x.py")
    line = source.splitlines()[finding.line - 1]
    assert line[finding.col - 1 : finding.end_col - 1] == "AsyncSessionLocal()"


TRICKY = """
import asyncpg
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

Maker = async_sessionmaker()

async def everything(engine, items, flag):
    global COUNTER
    s = AsyncSession(engine)
    match flag:
        case {"a": 1}:
            await s.close()
        case [x, *rest] if x:
            return s
        case _:
            pass
    try:
        async with Maker() as t, t.begin():
            pass
    except* ValueError:
        pass
    if (n := len(items)) > 3:
        f = lambda: s
    total = [await s.execute(i) async for i in items if i]
    del total
    while flag:
        flag -= 1
        if flag == 2:
            continue
        break
    else:
        pass
    for (a, b), c in items:
        nonlocal_like = a
    class Inner:
        x = s
    def nested():
        nonlocal flag
        return s
    return (yield_ for yield_ in items)

def gen():
    conn = yield
    x = yield from other()
    return x

async def with_tuple_targets(dsn):
    (a, b), c = await asyncpg.connect(dsn), None, None
    a, b = b, a
    [p, q] = await asyncpg.connect(dsn), 1
    async with await asyncpg.connect(dsn) as (x, y):
        pass
"""


def test_tricky_syntax_does_not_crash() -> None:
    check_module(TRICKY, "tricky.py", table=DEFAULT_TABLE, enabled=set(RULES))


def test_deeply_nested_expression_does_not_crash() -> None:
    source = (
        "from sqlalchemy.ext.asyncio import AsyncSession\n"
        "async def f(e):\n    s = AsyncSession(e)\n    x = "
        + "(" * 120
        + "s"
        + ")" * 120
        + "\n    return x\n"
    )
    assert check_module(source, "deep.py") == []


class _ProjectResolver:
    """Resolves `app.db` as a project module holding a maker, through module_factories."""

    DB = (
        "from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine\n"
        "engine = create_async_engine('postgresql+asyncpg://localhost/app')\n"
        "AsyncSessionLocal = async_sessionmaker(engine)\n"
        "def make_session():\n    return AsyncSessionLocal()\n"
        "def create_sessionmaker(engine):\n    return async_sessionmaker(engine)\n"
    )

    def resolve(self, module: str, name: str) -> ResourceSpec | None:
        if module == "app.db":
            return module_factories(self.DB, imports=self, module_name="app.db").get(name)
        return None


_CROSS_MODULE = [
    """
from app.db import AsyncSessionLocal
async def f(q):
    s = AsyncSessionLocal()  # CG101
    return await s.execute(q)
""",
    """
from app import db
async def f(q):
    s = db.AsyncSessionLocal()  # CG101
    return await s.execute(q)
""",
    """
import app.db as db
async def f(q):
    s = db.make_session()  # CG101
    return await s.execute(q)
""",
    """
from app.db import engine
async def f(q):
    conn = await engine.connect()  # CG101
    return await conn.execute(q)
""",
    """
from app.db import AsyncSessionLocal as S
async def f(q):
    async with S() as s:
        return await s.execute(q)
""",
    # A function of the project that returns a maker: what its result makes is a creation.
    """
from app.db import create_sessionmaker
async def f(engine, q):
    maker = create_sessionmaker(engine)
    session = maker()  # CG101
    return await session.execute(q)
""",
    # ... and closing it behind an ownership flag in `finally` is a release.
    """
from app.db import create_sessionmaker
async def f(engine, q, session=None):
    own_session = False
    if session is None:
        session = create_sessionmaker(engine)()
        own_session = True
    try:
        return await session.execute(q)
    finally:
        if own_session:
            await session.close()
""",
]


@pytest.mark.parametrize("source", _CROSS_MODULE)
def test_cross_module_makers_and_factories(source: str) -> None:
    assert run(source, imports=_ProjectResolver()) == expected_marks(source)


def test_maker_factory_in_the_same_module() -> None:
    source = (
        PRE
        + """
def make_maker(bind):
    return async_sessionmaker(bind, expire_on_commit=False)

async def f(q):
    maker = make_maker(engine)
    session = maker()  # CG101
    return await session.execute(q)

async def g(q):
    async with make_maker(engine)() as session:
        return await session.execute(q)
"""
    )
    assert run(source) == expected_marks(source)


def test_prefilter_never_rejects_a_file_with_findings() -> None:
    from connguard.checkers.resources import may_hold_resource

    for name, source in {**PATTERNS, **BULLETS}.items():
        if expected_marks(source):
            assert may_hold_resource(source, DEFAULT_TABLE), name
    assert not may_hold_resource("import os\nprint(os.getcwd())\n", DEFAULT_TABLE)


def test_extra_factories_from_configuration() -> None:
    from connguard.checkers.resources import TableError, build_table, may_hold_resource

    table = build_table({"myapp.db.open_session": "session", "myapp.db.open_pool": "pool"})
    source = (
        "from myapp.db import open_session, open_pool\n"
        "async def f(q):\n"
        "    s = open_session()  # CG101\n"
        "    return await s.execute(q)\n"
        "async def g():\n"
        "    pool = open_pool()\n"
        "    return pool\n"
        "async def h():\n"
        "    pool = open_pool()  # CG107\n"
        "    await pool.fetch('select 1')\n"
    )
    assert may_hold_resource(source, table)
    found = {(f.line, f.code) for f in check_module(source, "x.py", table=table)}
    assert found == expected_marks(source) == {(3, "CG101"), (9, "CG107")}
    with pytest.raises(TableError, match="unknown kind"):
        build_table({"myapp.db.x": "socket"})


def test_bad_syntax_raises_the_parser_error() -> None:
    import libcst

    with pytest.raises(libcst.ParserSyntaxError):
        check_module("def f(:\n    pass\n", "bad.py")


def test_findings_carry_end_positions_and_sort() -> None:
    source = PATTERNS["37-loop-no-close"] + PATTERNS["01-canonical-leak"].replace(PRE, "")
    found = check_module(source, "x.py")
    assert found == sorted(found)
    assert all(f.end_line >= f.line and (f.end_line > f.line or f.end_col > f.col) for f in found)


def test_advice_names_the_users_own_variable() -> None:
    source = PRE + "\nasync def f(q):\n    db = AsyncSessionLocal()\n    return await db.execute(q)"
    [finding] = check_module(source, "x.py")
    assert finding.message.endswith('use "async with AsyncSessionLocal() as db:"')
