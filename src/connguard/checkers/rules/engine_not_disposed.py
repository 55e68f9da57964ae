"""CG107: an engine or pool created per call (or per object) and never disposed."""

from __future__ import annotations

from ..exemptions import keeps_no_connections
from .base import Rule, advice, is_pool_like


class EngineNotDisposed(Rule):
    """
    What it does:
        Flags `create_async_engine(...)`, `asyncpg.create_pool(...)`, `AsyncConnectionPool(...)`
        and similar engines and pools created inside a function, or stored on an object whose
        class never disposes or closes them, when no path disposes them. An engine made with
        `poolclass=NullPool` keeps no connections, and is not flagged.

    Why is this bad?
        An engine or pool owns a set of connections. Created per call and never disposed, each
        call leaves its connections open until the process exits; the database reaches
        `max_connections` long before the application notices.

    Example:
        async def count(url):
            engine = create_async_engine(url)
            async with engine.connect() as conn:
                return await conn.scalar(text("select 1"))

    Use instead:
        engine = create_async_engine(URL)   # once, at module level

        async def count():
            async with engine.connect() as conn:
                return await conn.scalar(text("select 1"))

    Fix safety:
        Not fixed automatically: where the engine should live is a design decision.
    """

    CODE = "CG107"
    NAME = "engine-not-disposed"
    MESSAGE = "{resource} created here is {problem}; {advice}"

    def check(self, fate) -> None:
        if fate.owner != "function" or not fate.leak_normal or not is_pool_like(fate):
            return
        if fate.unawaited is not None or keeps_no_connections(fate.node):
            return
        problem = fate.reason or "never closed"
        if fate.spec.kind == "engine":
            problem = problem.replace("closed", "disposed")
        self.report(fate.node, resource=fate.spec.name, problem=problem, advice=advice(fate))

    VALID = [
        """
from sqlalchemy.ext.asyncio import create_async_engine

engine = create_async_engine("postgresql+asyncpg://localhost/app")
""",
        """
from sqlalchemy.ext.asyncio import create_async_engine

async def main(url):
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            await conn.exec_driver_sql("select 1")
    finally:
        await engine.dispose()
""",
        """
import asyncpg

class Database:
    async def connect(self, dsn):
        self.pool = await asyncpg.create_pool(dsn)

    async def close(self):
        await self.pool.close()
""",
        """
from sqlalchemy.ext.asyncio import create_async_engine

def make_engine(url):
    return create_async_engine(url)
""",
    ]

    INVALID = [
        """
from sqlalchemy.ext.asyncio import create_async_engine

async def count(url):
    engine = create_async_engine(url)  # CG107
    async with engine.connect() as conn:
        return await conn.exec_driver_sql("select 1")
""",
        """
import asyncpg

class Database:
    async def connect(self, dsn):
        self.pool = await asyncpg.create_pool(dsn)  # CG107

    async def fetch(self, query):
        async with self.pool.acquire() as conn:
            return await conn.fetch(query)
""",
    ]
