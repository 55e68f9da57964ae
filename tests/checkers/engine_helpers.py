"""Shared by the engine's tests: small projects on disk and the real console script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent


def script(name: str) -> str:
    candidate = BIN / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    assert found, f"{name} is not installed (pip install -e '.[test]')"
    return found


# The outage: a session made by a module-level maker, used, never closed (line 8, col 15).
LEAK = """\
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

engine = create_async_engine("postgresql+asyncpg://localhost/app")
AsyncSessionLocal = async_sessionmaker(engine)


async def list_users():
    session = AsyncSessionLocal()
    result = await session.execute("select 1")
    return result.scalars().all()
"""
LEAK_LINE, LEAK_COL = 8, 15

SAFE = """\
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

engine = create_async_engine("postgresql+asyncpg://localhost/app")
AsyncSessionLocal = async_sessionmaker(engine)


async def list_users():
    async with AsyncSessionLocal() as session:
        result = await session.execute("select 1")
        return result.scalars().all()
"""

# No resource token at all: the prefilter skips it without parsing.
PLAIN = "def add(a, b):\n    return a + b\n"


# A factory the table does not know, declared in pyproject.toml; the leak is at use.py:6:15.
EXTRA_FACTORY_PROJECT = {
    "pyproject.toml": (
        '[tool.connguard]\nextra-factories = { "myapp.db.open_session" = "session" }\n'
    ),
    "use.py": """
        from myapp.db import open_session


        async def handler():
            session = open_session()
            return await session.execute("select 1")
    """,
}


def write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return root


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        return self.stdout.splitlines()


def run(
    *args: str, cwd: Path, input: str | None = None, tool: str = "check-async-resources"
) -> Run:
    env = dict(os.environ)
    proc = subprocess.run(
        [script(tool), *args],
        cwd=cwd,
        input=input,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


def assert_no_traceback(result: Run) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert "Traceback" not in result.stdout, result.stdout
