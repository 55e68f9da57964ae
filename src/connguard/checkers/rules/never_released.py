"""CG101: a resource that some normal path never releases."""

from __future__ import annotations

from .base import PRELUDE, Rule, advice, is_pool_like


class NeverReleased(Rule):
    """
    What it does:
        Flags a session, connection or pooled connection that is created and then, on at least
        one normal path through its owner, neither released (closed, released to its pool,
        exited as a context manager) nor handed on (returned, stored on an owner that releases
        it, entered on an exit stack, given to a task). Also: a resource overwritten or deleted
        before it is closed, one consumed inline (`await AsyncSessionLocal().execute(q)`), one
        passed straight into a call that does not own it, and a dependency generator driven by
        `anext()` that is never finished.

    Why is this bad?
        An AsyncSession that has executed a statement holds a pooled connection until it is
        closed. Garbage collection does not return it reliably under asyncio, so each call of
        the leaking code strands one connection; a busy endpoint exhausts the pool and every
        request then times out waiting for a connection.

    Example:
        async def list_agents():
            session = AsyncSessionLocal()
            result = await session.execute(AGENTS)
            return result.scalars().all()

    Use instead:
        async def list_agents():
            async with AsyncSessionLocal() as session:
                result = await session.execute(AGENTS)
                return result.scalars().all()

    Fix safety:
        Wrapping the uses in `async with` is safe when the resource is not returned or stored
        and all its uses follow its creation in the same block; `--fix` applies only then.
    """

    CODE = "CG101"
    NAME = "resource-not-released"
    MESSAGE = "{resource} created here is {problem}; {advice}"

    def check(self, fate) -> None:
        if fate.owner != "function" or not fate.leak_normal or is_pool_like(fate):
            return
        if fate.unawaited is not None or (fate.mistaken and not fate.released):
            return
        self.report(
            fate.node,
            resource=fate.spec.name,
            problem=fate.reason or "never closed",
            advice=advice(fate),
        )

    VALID = [
        """
import asyncio

async def guarded(lock: asyncio.Lock, bot):
    await lock.acquire()
    await bot.worker_pool.acquire()
    try:
        async with bot.pool.acquire() as conn:
            await conn.execute("select 1")
        conn = await bot.db_pool.acquire()
        try:
            await conn.execute("select 2")
        finally:
            await bot.db_pool.release(conn)
    finally:
        bot.worker_pool.release()
        lock.release()
""",
        """
import logging

def migrate(engine, speech_engine, sql):
    with engine.connect() as conn:
        conn.execute(sql)
    speech_engine.connect("started-utterance", logging.info)
""",
        PRELUDE
        + """
async def list_agents(query):
    async with AsyncSessionLocal() as session:
        return (await session.execute(query)).scalars().all()
""",
        PRELUDE
        + """
async def two(query):
    async with AsyncSessionLocal() as a, AsyncSessionLocal() as b:
        await a.execute(query)
        await b.execute(query)
""",
        PRELUDE
        + """
async def parenthesised(query):
    async with (
        AsyncSessionLocal() as session,
        AsyncSessionLocal.begin() as other,
    ):
        await session.execute(query)
""",
        PRELUDE
        + """
async def fetch(query):
    session = AsyncSessionLocal()
    try:
        return await session.execute(query)
    finally:
        await session.close()
""",
        PRELUDE
        + """
async def fetch(query):
    session = None
    try:
        session = AsyncSessionLocal()
        return await session.execute(query)
    finally:
        if session is not None:
            await session.close()
""",
        PRELUDE
        + """
def make_session():
    session = AsyncSessionLocal()
    session.info["tenant"] = "a"
    return session
""",
        PRELUDE
        + """
async def alias(query):
    session = AsyncSessionLocal()
    other = session
    try:
        await other.execute(query)
    finally:
        await other.close()
""",
        PRELUDE
        + """
async def shadowed(AsyncSessionLocal, query):
    session = AsyncSessionLocal()
    return await session.execute(query)
""",
        PRELUDE
        + """
async def immediately():
    await AsyncSessionLocal().close()
""",
        """
import asyncpg

async def count(dsn):
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval("select 1")
    finally:
        await conn.close()
""",
        """
import asyncpg

async def count(pool: asyncpg.Pool):
    conn = await pool.acquire()
    try:
        return await conn.fetchval("select 1")
    finally:
        await pool.release(conn)
""",
        """
import asyncpg

async def count(pool: asyncpg.Pool):
    async with pool.acquire() as conn:
        return await conn.fetchval("select 1")
""",
        PRELUDE
        + """
async def conditional(flag, query):
    if flag:
        session = AsyncSessionLocal()
    else:
        session = AsyncSessionLocal()
    async with session:
        await session.execute(query)
""",
    ]

    INVALID = [
        PRELUDE
        + """
async def list_agents(query):
    session = AsyncSessionLocal()  # CG101
    result = await session.execute(query)
    return result.scalars().all()
""",
        PRELUDE
        + """
def get_sessionmaker():
    return AsyncSessionLocal

async def list_agents(query):
    maker = get_sessionmaker()
    session = maker()  # CG101
    return (await session.execute(query)).scalars().all()
""",
        PRELUDE
        + """
async def early_return(query, flag):
    session = AsyncSessionLocal()  # CG101
    if flag:
        return None
    try:
        return await session.execute(query)
    finally:
        await session.close()
""",
        PRELUDE
        + """
async def branch_close(query):
    session = AsyncSessionLocal()  # CG101
    try:
        result = await session.execute(query)
    finally:
        if result is None:
            await session.close()
    return result
""",
        PRELUDE
        + """
async def inline(query):
    return (await AsyncSessionLocal().execute(query)).scalars().all()  # CG101
""",
        PRELUDE
        + """
async def passed(repo):
    return await repo.list(AsyncSessionLocal())  # CG101
""",
        PRELUDE
        + """
async def overwritten(query):
    session = AsyncSessionLocal()  # CG101
    session = AsyncSessionLocal()
    try:
        await session.execute(query)
    finally:
        await session.close()
""",
        PRELUDE
        + """
async def forgotten(query):
    session = AsyncSessionLocal()  # CG101
    await session.execute(query)
    session = None
""",
        """
import asyncpg

async def count(dsn):
    conn = await asyncpg.connect(dsn)  # CG101
    return await conn.fetchval("select 1")
""",
        """
import asyncpg

async def count(pool: asyncpg.Pool):
    conn = await pool.acquire()  # CG101
    return await conn.fetchval("select 1")
""",
        PRELUDE
        + """
async def get_db():
    async with AsyncSessionLocal() as session:
        yield session

async def script():
    session = await anext(get_db())  # CG101
    await session.execute("select 1")
""",
        """
from sqlalchemy import create_engine

def create_db_engine(url):
    return create_engine(url, pool_pre_ping=True)

engine = create_db_engine("postgresql://localhost/app")

def upgrade(sql):
    conn = engine.connect()  # CG101
    conn.execute(sql)
""",
        """
import asyncio

async def balance(bot, user_id):
    conn = await bot.pool.acquire()  # CG101
    return await conn.fetchval("select balance from users where id = $1", user_id)
""",
        """
from sqlalchemy import Engine

def count(engine: Engine, sql):
    conn = engine.connect()  # CG101
    return conn.execute(sql).scalar()
""",
        """
import asyncmy

async def version(dsn):
    conn = await asyncmy.connect(dsn)  # CG101
    async with conn.cursor() as cur:
        await cur.execute("select version()")
        return await cur.fetchone()
""",
        """
import pytest

async def test_select_one(async_engine):
    conn = await async_engine.connect()  # CG101
    assert (await conn.execute("select 1")).scalar() == 1
""",
        """
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

SessionMaker = async_sessionmaker[AsyncSession]

class UserRepository:
    def __init__(self, maker: SessionMaker):
        self.maker = maker

    async def get(self, model, user_id):
        session = self.maker()  # CG101
        return await session.get(model, user_id)
""",
        """
from sqlalchemy.ext.asyncio import async_sessionmaker

async def count(maker: async_sessionmaker, query):
    session = maker()  # CG101
    return await session.scalar(query)

async def total(maker: "async_sessionmaker", query):
    session = maker()  # CG101
    return await session.scalar(query)
""",
    ]
