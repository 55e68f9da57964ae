import aiosqlite


async def tables(path: str) -> list[str]:
    async with aiosqlite.connect(path) as db:
        cursor = await db.execute("SELECT name FROM sqlite_master")
        return [row[0] for row in await cursor.fetchall()]
