"""CG106: a FastAPI dependency or pytest fixture that returns a fresh session, not yields it."""

from __future__ import annotations

from .base import PRELUDE, Rule


class DependencyReturnsResource(Rule):
    """
    What it does:
        Flags a FastAPI dependency (a function used in `Depends(...)` in the module) or a
        pytest fixture that `return`s a freshly created session or connection.

    Why is this bad?
        FastAPI and pytest never close values a dependency or fixture returns; only the code
        after `yield` runs as cleanup. Every request (or test) leaks one session.

    Example:
        def get_db():
            return SessionLocal()

        @app.get("/items")
        def items(db=Depends(get_db)): ...

    Use instead:
        def get_db():
            db = SessionLocal()
            try:
                yield db
            finally:
                db.close()

    Fix safety:
        Not fixed automatically: callers that call the function directly would change.
    """

    CODE = "CG106"
    NAME = "dependency-returns-resource"
    MESSAGE = (
        '{resource} created here is returned by the {framework} "{function}", which never '
        'closes returned values; yield it and close it in "finally"'
    )

    def check(self, fate) -> None:
        if fate.returned_by:
            self.report(
                fate.node,
                resource=fate.spec.name,
                framework=fate.returned_by,
                function=fate.function,
            )

    VALID = [
        PRELUDE
        + """
from fastapi import Depends, FastAPI

app = FastAPI()

async def get_db():
    async with AsyncSessionLocal() as session:
        yield session

@app.get("/items")
async def items(db=Depends(get_db)):
    return []
""",
        PRELUDE
        + """
def make_session():
    return AsyncSessionLocal()
""",
    ]

    INVALID = [
        PRELUDE
        + """
from fastapi import Depends, FastAPI

app = FastAPI()

def get_db():
    return AsyncSessionLocal()  # CG106

@app.get("/items")
async def items(db=Depends(get_db)):
    return []
""",
        PRELUDE
        + """
import pytest

@pytest.fixture
def session():
    return AsyncSessionLocal()  # CG106
""",
        PRELUDE
        + """
from fastapi import APIRouter, Depends

router = APIRouter()

async def open_db():
    return AsyncSessionLocal()  # CG106

@router.get("/health", dependencies=[Depends(open_db)])
async def health():
    return {}
""",
        PRELUDE
        + """
from fastapi import Security

def get_db():
    return AsyncSessionLocal()  # CG106

def dependencies():
    return [Security(get_db)]
""",
    ]
