from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

engine = create_async_engine("sqlite+aiosqlite:///:memory:")


async def version() -> str:
    conn = await engine.connect()
    result = await conn.execute(text("SELECT sqlite_version()"))
    return result.scalar_one()
