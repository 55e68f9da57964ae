import logging

from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

engine = create_async_engine("sqlite+aiosqlite:///:memory:")
Session = async_sessionmaker(engine)
log = logging.getLogger(__name__)


async def ping() -> bool:
    async with Session() as session:
        await session.execute(text("SELECT 1"))
        try:
            await session.execute(text("SELECT 2"))
        except Exception:
            log.exception("ping failed")
            return False
    return True
