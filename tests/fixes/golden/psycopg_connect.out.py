import psycopg


async def now(dsn: str):
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute("SELECT now()")
        return await cur.fetchone()
