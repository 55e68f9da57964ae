from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

engine = create_async_engine("sqlite+aiosqlite:///:memory:")
AsyncSessionLocal = async_sessionmaker(engine)


async def one() -> int:
    session: AsyncSession = AsyncSessionLocal()
    return (await session.execute(text("SELECT 1"))).scalar_one()
