from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

engine = create_async_engine("sqlite+aiosqlite:///:memory:")
AsyncSessionLocal = async_sessionmaker(engine)


async def touch_all(ids: list[int]) -> None:
    for agent_id in ids:
        async with AsyncSessionLocal() as session:
            await session.execute(text("SELECT :id"), {"id": agent_id})
            await session.commit()
