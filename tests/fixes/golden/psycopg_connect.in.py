import psycopg


async def now(dsn: str):
    conn = await psycopg.AsyncConnection.connect(dsn)
    cur = await conn.execute("SELECT now()")
    return await cur.fetchone()
