from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

engine = create_async_engine("sqlite+aiosqlite:///:memory:")


async def names() -> list[str]:
    async with AsyncSession(engine) as session:
        await session.execute(text("SELECT 1"))
        result = await session.execute(text("SELECT 'beta'"))
        rows = list(result.scalars().all())
    return rows
