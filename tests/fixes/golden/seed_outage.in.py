"""The endpoint behind the outage: the session is never closed."""

from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

engine = create_async_engine("sqlite+aiosqlite:///:memory:")
AsyncSessionLocal = async_sessionmaker(engine, expire_on_commit=False)


async def list_agents() -> list[str]:
    # One session per request.
    session = AsyncSessionLocal()
    result = await session.execute(text("SELECT 'alpha'"))  # the query
    return list(result.scalars().all())
