from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

engine = create_async_engine("sqlite+aiosqlite:///:memory:")


async def numbers() -> list[int]:
    async with engine.connect() as conn:
        seen = []
        async for row in await conn.stream(text("SELECT 1 UNION ALL SELECT 2")):
            seen.append(row[0])
        return seen
