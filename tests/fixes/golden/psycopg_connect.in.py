import psycopg


async def now(dsn: str):
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    cur = await conn.execute("SELECT now()")
    return await cur.fetchone()
