from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

engine = create_async_engine("sqlite+aiosqlite:///:memory:")


async def version() -> str:
    async with engine.connect() as conn:
        result = await conn.execute(text("SELECT sqlite_version()"))
        return result.scalar_one()
