import asyncpg


async def fetch_names(pool: asyncpg.Pool) -> list[str]:
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT name FROM agents")
    return [row["name"] for row in rows]
