from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

engine = create_async_engine("sqlite+aiosqlite:///:memory:")
AsyncSessionLocal = async_sessionmaker(engine)


async def count_agents() -> int:
    async with AsyncSessionLocal() as session:
        result = await session.execute(text("SELECT 3"))
        count = result.scalar_one()
    print("counted", count)
    return count
