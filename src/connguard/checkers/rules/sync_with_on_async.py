"""CG104: a plain `with` on a resource that is only an async context manager."""

from __future__ import annotations

from .base import PRELUDE, Rule, call_text


class SyncWithOnAsync(Rule):
    """
    What it does:
        Flags `with AsyncSessionLocal() as session:` and other plain `with` statements on
        resources that only implement `__aenter__`/`__aexit__`.

    Why is this bad?
        The `with` statement raises TypeError at runtime (the object has no `__enter__`),
        usually after the resource was already created. When it is caught and retried, or
        when the code path is rare, it ships.

    Example:
        async def fetch(query):
            with AsyncSessionLocal() as session:
                return await session.execute(query)

    Use instead:
        async def fetch(query):
            async with AsyncSessionLocal() as session:
                return await session.execute(query)

    Fix safety:
        Safe inside an `async def`: replace `with` by `async with`.
    """

    CODE = "CG104"
    NAME = "sync-with-on-async-resource"
    MESSAGE = (
        '{resource} is an async context manager: plain "with" fails at runtime; '
        'use "async with {call} as {var}:"'
    )

    def check(self, fate) -> None:
        if fate.sync_with:
            self.report(fate.node, resource=fate.spec.name, call=call_text(fate), var=fate.spec.var)

    VALID = [
        PRELUDE
        + """
async def fetch(query):
    async with AsyncSessionLocal() as session:
        return await session.execute(query)
""",
        """
from sqlalchemy.orm import Session

def fetch(engine, query):
    with Session(engine) as session:
        return session.execute(query)
""",
    ]

    INVALID = [
        PRELUDE
        + """
async def fetch(query):
    with AsyncSessionLocal() as session:  # CG104
        return await session.execute(query)
""",
    ]
