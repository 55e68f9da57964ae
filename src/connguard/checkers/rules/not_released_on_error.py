"""CG102: released on the normal path, but not when an exception or cancellation interrupts."""

from __future__ import annotations

from .base import PRELUDE, Rule, advice, is_pool_like


class NotReleasedOnError(Rule):
    """
    What it does:
        Flags a resource whose release runs on every normal path but is not protected: an
        exception, or the `CancelledError` of a timeout or a client disconnect, raised between
        the creation and the release skips it (the release is not in `finally`, not in an
        `async with`, not in an `except` that re-raises). The points that count are every
        `await` (where cancellation lands) and every call on or with the resource itself; a
        log line or a metric between the creation and the `try` does not, and neither does
        anything before a SQLAlchemy session's first use (it takes a connection at its first
        query; `add()` takes none). Also the generator
        dependency or `@asynccontextmanager` that closes after `yield` without `try/finally`:
        an exception in the endpoint is thrown in at the `yield`. An exception that is caught
        and swallowed before the close is reported here too.

    Why is this bad?
        Under load, requests fail and time out; each failure between the creation and the
        close strands a pooled connection. Cancellation is routine in async servers, so the
        "happy path only" close leaks exactly when the service is already struggling.

    Example:
        async def fetch(query):
            session = AsyncSessionLocal()
            result = await session.execute(query)
            await session.close()
            return result

    Use instead:
        async def fetch(query):
            async with AsyncSessionLocal() as session:
                return await session.execute(query)

    Fix safety:
        Rewriting into `async with` is safe when the close is the last use; `--fix` removes the
        explicit close it replaces.
    """

    CODE = "CG102"
    NAME = "resource-not-released-on-error"
    MESSAGE = (
        "{resource} created here is not closed if {interruption} interrupts before the close; "
        "{advice}"
    )

    def check(self, fate) -> None:
        if fate.owner != "function" or fate.leak_normal or not fate.leak_exception:
            return
        if is_pool_like(fate) or fate.unawaited is not None or not fate.released:
            return
        text = advice(fate)
        if text.startswith('use "'):
            text += ', or close it in "finally"'
        # Cancellation lands at an `await`: only an async function's code can be cancelled.
        interruption = "an exception or cancellation" if fate.in_async else "an exception"
        self.report(fate.node, resource=fate.spec.name, advice=text, interruption=interruption)

    VALID = [
        PRELUDE
        + """
async def fetch(query):
    session = AsyncSessionLocal()
    try:
        result = await session.execute(query)
    finally:
        await session.close()
    return result
""",
        PRELUDE
        + """
async def cleanup_on_failure(query):
    session = AsyncSessionLocal()
    try:
        await session.execute(query)
    except:
        await session.close()
        raise
    return session
""",
        PRELUDE
        + """
from contextlib import asynccontextmanager

@asynccontextmanager
async def session_scope():
    session = AsyncSessionLocal()
    try:
        yield session
    finally:
        await session.close()
""",
        PRELUDE
        + """
from contextlib import contextmanager
from sqlalchemy.orm import sessionmaker

SessionLocal = sessionmaker()

@contextmanager
def session_scope():
    session = SessionLocal()
    try:
        yield session
    finally:
        session.close()
""",
        PRELUDE
        + """
import pytest

@pytest.fixture
async def session():
    session = AsyncSessionLocal()
    yield session
    await session.close()
""",
        PRELUDE
        + """
async def get_db():
    session = AsyncSessionLocal()
    try:
        yield session
    finally:
        await session.close()
""",
        PRELUDE
        + """
async def no_work_between():
    session = AsyncSessionLocal()
    session.info["k"] = 1
    await session.close()
""",
    ]

    INVALID = [
        PRELUDE
        + """
async def fetch(query):
    session = AsyncSessionLocal()  # CG102
    result = await session.execute(query)
    await session.close()
    return result
""",
        PRELUDE
        + """
async def fetch(query, load_options):
    session = AsyncSessionLocal()  # CG102
    await session.execute(query)  # the session holds a connection from here
    options = await load_options()
    try:
        return await session.execute(query, execution_options=options)
    finally:
        await session.close()
""",
        PRELUDE
        + """
async def fetch(query):
    session = AsyncSessionLocal()  # CG102
    try:
        await session.execute(query)
    except Exception:  # swallowed; CancelledError is no Exception, and skips the close
        pass
    await session.close()
""",
        PRELUDE
        + """
ReplicaSession = async_sessionmaker(engine)

async def fetch(query, replica):
    session = ReplicaSession() if replica else AsyncSessionLocal()  # CG102
    result = await session.execute(query)
    await session.close()
    return result
""",
        PRELUDE
        + """
from contextlib import asynccontextmanager

@asynccontextmanager
async def session_scope():
    session = AsyncSessionLocal()  # CG102
    yield session
    await session.close()
""",
        PRELUDE
        + """
from fastapi import Depends, FastAPI

app = FastAPI()

async def get_db():
    session = AsyncSessionLocal()  # CG102
    yield session
    await session.close()

@app.get("/items")
async def items(db=Depends(get_db)):
    return []
""",
        PRELUDE
        + """
async def close_in_except_only_reraise(query):
    session = AsyncSessionLocal()  # CG102
    await session.execute(query)
    try:
        await session.commit()
    finally:
        await session.close()
""",
    ]
