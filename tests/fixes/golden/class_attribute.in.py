from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

engine = create_async_engine("sqlite+aiosqlite:///:memory:")


class AgentRepository:
    def __init__(self) -> None:
        self._sessions = async_sessionmaker(engine)

    async def count(self) -> int:
        session = self._sessions()
        return (await session.execute(text("SELECT 4"))).scalar_one()

    async def version(self) -> str:
        conn = await engine.connect()
        return (await conn.execute(text("SELECT sqlite_version()"))).scalar_one()


async def run() -> tuple[int, str]:
    repository = AgentRepository()
    return await repository.count(), await repository.version()
