import aiosqlite


async def tables(path: str) -> list[str]:
    db = await aiosqlite.connect(path)
    cursor = await db.execute("SELECT name FROM sqlite_master")
    return [row[0] for row in await cursor.fetchall()]
