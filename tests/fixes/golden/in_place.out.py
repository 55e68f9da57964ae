from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

engine = create_async_engine("sqlite+aiosqlite:///:memory:")
AsyncSessionLocal = async_sessionmaker(engine)


async def names(session_id: int) -> list[str]:
    # A fresh session used once, in place.
    async with AsyncSessionLocal() as session:
        return list((await session.execute(text("SELECT 'gamma'"))).scalars().all())
