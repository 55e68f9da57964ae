"""The hooks as a consumer meets them: the real `pre-commit try-repo` against this checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.precommit

CHECKOUT = Path(__file__).resolve().parents[2]

DB = """\
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

engine = create_async_engine("sqlite+aiosqlite:///agents.db")
AsyncSessionLocal = async_sessionmaker(engine, expire_on_commit=False)
"""

AGENTS = """\
from sqlalchemy import text

from app.db import AsyncSessionLocal


async def list_agents() -> list[str]:
    session = AsyncSessionLocal()
    result = await session.execute(text("SELECT 'alpha' UNION ALL SELECT 'beta'"))
    return list(result.scalars().all())
"""

# A leak the consumer's [tool.connguard] excludes: the hooks must leave it alone.
LEGACY = AGENTS.replace("list_agents", "old_list_agents")

PYPROJECT = """\
[project]
name = "agents-app"
version = "0"

[tool.connguard]
exclude = ["legacy/"]
"""

RUN = """\
import asyncio

from app import agents
from app.db import engine


async def main():
    names = await agents.list_agents()
    held = engine.pool.checkedout()
    await engine.dispose()
    print(names, held)


asyncio.run(main())
"""


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


@pytest.fixture(scope="module")
def consumer(tmp_path_factory) -> Path:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    if not (CHECKOUT / ".git").exists():
        pytest.skip("not running from a git checkout of connguard")
    repo = tmp_path_factory.mktemp("consumer")
    files = {
        "pyproject.toml": PYPROJECT,
        "app/__init__.py": "",
        "app/db.py": DB,
        "app/agents.py": AGENTS,
        "legacy/__init__.py": "",
        "legacy/agents.py": LEGACY,
        "run.py": RUN,
    }
    for name, text in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
    _git(repo, "init", "-q")
    _git(repo, "config", "user.email", "dev@example.invalid")
    _git(repo, "config", "user.name", "dev")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "leaking app")
    return repo


def _try_repo(repo: Path, hook: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PRE_COMMIT_HOME=str(home), PRE_COMMIT_COLOR="never")
    env.pop("VIRTUAL_ENV", None)
    return subprocess.run(
        [sys.executable, "-m", "pre_commit", "try-repo", str(CHECKOUT), hook, "--all-files"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_check_fix_check_then_the_fixed_module_runs(consumer, tmp_path):
    home = tmp_path / "pre-commit-home"

    check = _try_repo(consumer, "check-async-resources", home)
    out = check.stdout + check.stderr
    assert check.returncode == 1, out
    assert "app/agents.py:7:15: CG101" in out, out
    assert "legacy/agents.py" not in out, out

    fix = _try_repo(consumer, "fix-async-resources", home)
    out = fix.stdout + fix.stderr
    assert fix.returncode == 1, out  # files were modified: pre-commit's "please re-stage"
    assert "app/agents.py:7:15: CG101 fixed" in out, out
    fixed = (consumer / "app/agents.py").read_text()
    assert fixed == AGENTS.replace(
        "    session = AsyncSessionLocal()\n",
        "    async with AsyncSessionLocal() as session:\n",
    ).replace("    result", "        result").replace("    return", "        return")
    assert (consumer / "legacy/agents.py").read_text() == LEGACY

    again = _try_repo(consumer, "check-async-resources", home)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Passed" in again.stdout

    ran = subprocess.run(
        [sys.executable, "run.py"], cwd=consumer, capture_output=True, text=True, timeout=60
    )
    assert ran.returncode == 0, ran.stderr
    # The rows come back, and no pooled connection is left checked out afterwards.
    assert ran.stdout.strip() == "['alpha', 'beta'] 0"
