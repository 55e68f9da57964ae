"""GET /agents, as fixed after the post-mortem: the session is closed on every path."""

from sqlalchemy import text

from app.db import AsyncSessionLocal

AGENTS = text("SELECT name FROM (VALUES ('alpha'), ('beta'), ('gamma')) AS agents(name) ORDER BY 1")


async def list_agents() -> list[str]:
    async with AsyncSessionLocal() as session:
        result = await session.execute(AGENTS)
        return list(result.scalars().all())
