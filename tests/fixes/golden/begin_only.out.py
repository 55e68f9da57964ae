from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

engine = create_async_engine("sqlite+aiosqlite:///:memory:")
AsyncSessionLocal = async_sessionmaker(engine)


async def rename(old: str, new: str) -> None:
    async with AsyncSessionLocal() as session:
        # The transaction commits, but nothing closes the session.
        async with session.begin():
            await session.execute(text("SELECT :a, :b"), {"a": old, "b": new})
