"""Two leaks in one module; the comments between them must survive."""

from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

engine = create_async_engine("sqlite+aiosqlite:///:memory:")
AsyncSessionLocal = async_sessionmaker(engine)

# ---- reads -------------------------------------------------------------


async def first() -> int:
    async with AsyncSessionLocal() as session:
        return (await session.execute(text("SELECT 1"))).scalar_one()


# ---- writes ------------------------------------------------------------


async def second() -> int:
    async with AsyncSessionLocal() as session:
        value = (await session.execute(text("SELECT 2"))).scalar_one()
        await session.commit()
        return value
