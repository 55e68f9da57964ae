from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

engine = create_async_engine("sqlite+aiosqlite:///:memory:")
AsyncSessionLocal = async_sessionmaker(engine)


async def one() -> int:
    async with AsyncSessionLocal() as session:  # a TypeError at runtime
        return (await session.execute(text("SELECT 1"))).scalar_one()
