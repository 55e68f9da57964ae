"""CG108: a session created at module or class level, shared by every request."""

from __future__ import annotations

from .base import PRELUDE, Rule


class SharedSession(Rule):
    """
    What it does:
        Warns about an AsyncSession or async connection created at module level or as a class
        attribute, where every request and task shares it.

    Why is this bad?
        An AsyncSession is not safe for concurrent use by several tasks, and a module-level one
        is never closed: it holds its connection for the life of the process and mixes the
        transactions of unrelated requests.

    Example:
        session = AsyncSessionLocal()

        async def items():
            return (await session.execute(q)).all()

    Use instead:
        async def items():
            async with AsyncSessionLocal() as session:
                return (await session.execute(q)).all()

    Fix safety:
        Not fixed automatically.
    """

    CODE = "CG108"
    NAME = "shared-session"
    MESSAGE = (
        "{resource} created at {level} level is shared by every request and task and never "
        'closed; create one per request with "async with"'
    )

    def check(self, fate) -> None:
        if fate.shared:
            self.report(fate.node, resource=fate.spec.name, level=fate.owner)

    VALID = [
        PRELUDE,
        PRELUDE
        + """
async def items(query):
    async with AsyncSessionLocal() as session:
        return (await session.execute(query)).all()
""",
    ]

    INVALID = [
        PRELUDE
        + """
session = AsyncSessionLocal()  # CG108

async def items(query):
    return (await session.execute(query)).all()
""",
        PRELUDE
        + """
class Repository:
    session = AsyncSessionLocal()  # CG108
""",
    ]
