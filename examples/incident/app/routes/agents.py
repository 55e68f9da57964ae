"""GET /agents, as it shipped: the endpoint behind the outage."""

from sqlalchemy import text

from app.db import AsyncSessionLocal

AGENTS = text("SELECT name FROM (VALUES ('alpha'), ('beta'), ('gamma')) AS agents(name) ORDER BY 1")


async def list_agents() -> list[str]:
    session = AsyncSessionLocal()
    result = await session.execute(AGENTS)
    return list(result.scalars().all())
