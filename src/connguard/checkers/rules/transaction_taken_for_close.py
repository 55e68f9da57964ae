"""CG105: `begin()`/`commit()` used where a close was needed."""

from __future__ import annotations

from .base import PRELUDE, Rule, advice


class TransactionTakenForClose(Rule):
    """
    What it does:
        Flags a manually created session or connection that is never closed but whose
        transaction is ended with `async with session.begin():`, `await session.commit()` or
        `rollback()`, as if that released it.

    Why is this bad?
        `session.begin()` as a context manager commits or rolls back the transaction; it does
        not close the session. The sessionmaker-level form `async with AsyncSessionLocal.begin()`
        does both, and the two are easy to confuse. The session keeps its state and, after any
        further use, a pooled connection.

    Example:
        async def save(item):
            session = AsyncSessionLocal()
            async with session.begin():
                session.add(item)

    Use instead:
        async def save(item):
            async with AsyncSessionLocal.begin() as session:
                session.add(item)

    Fix safety:
        Rewriting to `async with AsyncSessionLocal() as session:` around the uses is safe;
        `--fix` does not merge it with the `begin()` block.
    """

    CODE = "CG105"
    NAME = "transaction-taken-for-close"
    MESSAGE = (
        '{resource} created here is never closed: "{method}()" manages the transaction but does '
        "not close it; {advice}"
    )

    def check(self, fate) -> None:
        if fate.owner != "function" or not fate.leak_normal or not fate.mistaken:
            return
        if fate.released or fate.unawaited is not None:
            return
        self.report(fate.node, resource=fate.spec.name, method=fate.mistaken, advice=advice(fate))

    VALID = [
        PRELUDE
        + """
async def save(item):
    async with AsyncSessionLocal.begin() as session:
        session.add(item)
""",
        PRELUDE
        + """
async def save(item):
    async with AsyncSessionLocal() as session:
        async with session.begin():
            session.add(item)
""",
    ]

    INVALID = [
        PRELUDE
        + """
async def save(item):
    session = AsyncSessionLocal()  # CG105
    async with session.begin():
        session.add(item)
""",
        PRELUDE
        + """
async def save(item):
    async with AsyncSessionLocal().begin() as transaction:  # CG105
        transaction.session.add(item)
""",
        PRELUDE
        + """
async def save(item):
    session = AsyncSessionLocal()  # CG105
    session.add(item)
    await session.commit()
""",
    ]
