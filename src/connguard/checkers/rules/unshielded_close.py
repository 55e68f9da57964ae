"""CG109 (off by default): an awaited close in `finally` that a cancellation can interrupt."""

from __future__ import annotations

from .base import PRELUDE, Rule


class UnshieldedClose(Rule):
    """
    What it does:
        In modules that use trio or anyio, reports a resource whose release is an `await` in a
        `finally` block outside a shielded cancel scope. Off by default (select CG109).

    Why is this bad?
        Under trio and anyio a cancelled scope cancels every later `await` in it, including
        the one in `finally`: the close itself is cancelled and the connection is not returned
        (SQLAlchemy issues #6652, #8145 and #12077 were such leaks). Ownership is right; the
        release is fragile.

    Example:
        async def fetch(query):
            session = AsyncSessionLocal()
            try:
                return await session.execute(query)
            finally:
                await session.close()

    Use instead:
        async def fetch(query):
            session = AsyncSessionLocal()
            try:
                return await session.execute(query)
            finally:
                with anyio.CancelScope(shield=True):
                    await session.close()

    Fix safety:
        Not fixed automatically.
    """

    CODE = "CG109"
    NAME = "unshielded-close-in-finally"
    MESSAGE = (
        '{resource} created here is closed by an await in "finally" that a trio/anyio '
        'cancellation can interrupt; shield it with "CancelScope(shield=True)"'
    )
    DEFAULT_ENABLED = False

    def check(self, fate) -> None:
        if fate.unshielded is not None and not fate.leak_normal:
            self.report(fate.node, resource=fate.spec.name)

    VALID = [
        PRELUDE
        + """
import anyio

async def fetch(query):
    session = AsyncSessionLocal()
    try:
        return await session.execute(query)
    finally:
        with anyio.CancelScope(shield=True):
            await session.close()
""",
    ]

    INVALID = [
        PRELUDE
        + """
import anyio

async def fetch(query):
    session = AsyncSessionLocal()  # CG109
    try:
        return await session.execute(query)
    finally:
        await session.close()
""",
    ]
