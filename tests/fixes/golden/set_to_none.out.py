from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

engine = create_async_engine("sqlite+aiosqlite:///:memory:")
AsyncSessionLocal = async_sessionmaker(engine)


async def touch() -> None:
    async with AsyncSessionLocal() as session:
        await session.execute(text("SELECT 1"))
    session = None  # "dropping" the handle closes nothing
