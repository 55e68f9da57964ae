import asyncpg


async def fetch_names(pool: asyncpg.Pool) -> list[str]:
    conn = await pool.acquire()
    rows = await conn.fetch("SELECT name FROM agents")
    await pool.release(conn)
    return [row["name"] for row in rows]
