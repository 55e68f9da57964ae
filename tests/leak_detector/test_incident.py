"""The README's incident: `pytest --leak-check examples/incident` fails the leaking test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from connguard.leak_detector.provision.local import find_bindir

ROOT = Path(__file__).resolve().parents[2]
INCIDENT = ROOT / "examples" / "incident"


@pytest.mark.skipif(find_bindir()[0] is None, reason="no PostgreSQL server binaries")
def test_incident_example_names_the_leaking_line():
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("CONNGUARD_", "PYTEST_", "DATABASE_URL"))
    }
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--leak-check",
         "examples/incident"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    source = (INCIDENT / "app" / "routes" / "agents.py").read_text().splitlines()
    line = next(n for n, text in enumerate(source, 1) if "AsyncSessionLocal()" in text)
    assert "ERROR at teardown of test_list_agents" in out
    assert "connguard: test_list_agents leaked 1 database connection" in out
    assert f"SQLAlchemy session opened at app/routes/agents.py:{line}" in out
    assert "session = AsyncSessionLocal()" in out
    assert "called from tests/test_agents.py:5 in test_list_agents" in out
    assert "static check: CG101 flags this line" in out
    # the fixed endpoint passes: its test has no error at teardown
    assert "test_list_agents_fixed" not in out.split("short test summary info")[1]
    assert "2 passed, 1 warning, 1 error" in out or "2 passed, 1 error" in out
