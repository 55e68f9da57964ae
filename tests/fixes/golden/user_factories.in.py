"""The project's own factories: how each hands the resource over decides the `async with`."""

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

engine = create_async_engine("sqlite+aiosqlite:///:memory:")
AsyncSessionLocal = async_sessionmaker(engine)


def make_session() -> AsyncSession:
    return AsyncSessionLocal()


async def amake_session() -> AsyncSession:
    return AsyncSession(engine)


def make_connection():
    return engine.connect()


async def run() -> list[int]:
    first = make_session()
    one = (await first.execute(text("SELECT 1"))).scalar_one()
    second = await amake_session()
    two = (await second.execute(text("SELECT 2"))).scalar_one()
    conn = await make_connection()
    three = (await conn.execute(text("SELECT 3"))).scalar_one()
    return [one, two, three]
