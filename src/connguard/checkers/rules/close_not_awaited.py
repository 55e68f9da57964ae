"""CG103: an async close called without await, so it never runs."""

from __future__ import annotations

from ..analysis import node_text
from .base import PRELUDE, Rule


class CloseNotAwaited(Rule):
    """
    What it does:
        Flags a resource whose only release is a coroutine method called without `await`
        (`session.close()` on an AsyncSession, `conn.close()` on an asyncpg connection,
        `engine.dispose()` on an AsyncEngine). The finding points at the creating call and
        names the line of the un-awaited close.

    Why is this bad?
        Calling a coroutine function only creates a coroutine object; nothing runs until it is
        awaited. The close never happens, Python at most prints "coroutine was never awaited",
        and the connection stays checked out. The code looks correct in review.

    Example:
        async def fetch(query):
            session = AsyncSessionLocal()
            try:
                return await session.execute(query)
            finally:
                session.close()

    Use instead:
        async def fetch(query):
            session = AsyncSessionLocal()
            try:
                return await session.execute(query)
            finally:
                await session.close()

    Fix safety:
        Adding `await` is safe inside an `async def`; `--fix` rewrites to `async with` where it
        can instead.
    """

    CODE = "CG103"
    NAME = "close-not-awaited"
    MESSAGE = (
        '{resource} created here is closed by "{close}" without await: the coroutine '
        'never runs, so nothing is closed; use "await {close}"'
    )

    def check(self, fate) -> None:
        if fate.owner != "function" or fate.unawaited is None:
            return
        if not (fate.leak_normal or fate.leak_exception):
            return
        self.report(fate.node, resource=fate.spec.name, close=node_text(fate.unawaited))

    VALID = [
        PRELUDE
        + """
async def fetch(query):
    session = AsyncSessionLocal()
    try:
        return await session.execute(query)
    finally:
        await session.close()
""",
        """
from sqlalchemy.orm import sessionmaker

SessionLocal = sessionmaker()

def fetch(query):
    session = SessionLocal()
    try:
        return session.execute(query)
    finally:
        session.close()
""",
        PRELUDE
        + """
import asyncio

def sync_caller():
    session = AsyncSessionLocal()
    asyncio.run(session.close())
""",
    ]

    INVALID = [
        PRELUDE
        + """
async def fetch(query):
    session = AsyncSessionLocal()  # CG103
    try:
        return await session.execute(query)
    finally:
        session.close()
""",
        """
import asyncpg

async def count(dsn):
    conn = await asyncpg.connect(dsn)  # CG103
    try:
        return await conn.fetchval("select 1")
    finally:
        conn.close()
""",
    ]
