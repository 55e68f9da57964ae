"""No orphans: after a failing run, Ctrl-C, SIGTERM, and kill -9 plus the next run, nothing of
ours is left (postgres process, temporary directory, registry record, database)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from leak_projects import OUT_OF_SIGHT
from provision_helpers import (
    TEST_WAITS,
    connguard_temp_dirs,
    postgres_processes_under,
    records_of,
    run_pytest,
    start_waiting_run,
)

from connguard.leak_detector.provision.local import find_bindir

pytestmark = pytest.mark.skipif(
    find_bindir()[0] is None, reason="no PostgreSQL server binaries on this machine"
)


def _assert_nothing_left(facts: dict) -> None:
    assert postgres_processes_under(facts["root"]) == []
    assert not os.path.exists(facts["root"])
    assert records_of(facts["pid"]) == []


@pytest.fixture
def waiting_project(pytester):
    pytester.makepyfile(test_waits=TEST_WAITS)
    return pytester.path


def test_failing_run_leaves_nothing(pytester):
    pytester.makepyfile(
        """
        import json, os
        from pathlib import Path
        def test_fails(connguard_server, connguard_database):
            Path(os.environ["STARTED_FILE"]).write_text(json.dumps({
                "pid": os.getpid(), "root": connguard_server.details["socket_dir"]}))
            raise RuntimeError("boom")
        """
    )
    started = pytester.path / "started.json"
    result = run_pytest(pytester.path, "--leak-check", "--leak-check-db=local",
                        env={"STARTED_FILE": str(started)})  # fmt: skip
    assert result.returncode == 1
    _assert_nothing_left(json.loads(started.read_text()))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupted_run_cleans_up(waiting_project, signum):
    started = waiting_project / "started.json"
    process = start_waiting_run(waiting_project, started, "--leak-check-db=local")
    facts = json.loads(started.read_text())
    process.send_signal(signum)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 2, output  # pytest's "interrupted"
    _assert_nothing_left(facts)


def test_kill_9_then_the_next_run_reaps(waiting_project, pytester):
    started = waiting_project / "started.json"
    process = start_waiting_run(waiting_project, started, "--leak-check-db=local")
    facts = json.loads(started.read_text())
    process.kill()
    process.communicate(timeout=30)
    # The postmaster dies with its parent (parent-death signal); its directory and record stay.
    deadline = time.monotonic() + 10
    while postgres_processes_under(facts["root"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert postgres_processes_under(facts["root"]) == []
    assert os.path.exists(facts["root"])
    assert records_of(facts["pid"]) != []

    started.unlink()
    (waiting_project / "test_waits.py").unlink()
    pytester.makepyfile(test_next="def test_next(connguard_database):\n    pass\n")
    result = run_pytest(waiting_project, "--leak-check", "--leak-check-db=local")
    assert result.returncode == 0, result.stdout + result.stderr
    _assert_nothing_left(facts)
    assert facts["root"] not in connguard_temp_dirs()


def test_a_run_in_another_pid_namespace_reaps_nothing_alive(waiting_project):
    # A run whose /proc cannot show this one (in a container of its own, or a PID namespace,
    # sharing the temporary directory) sees no process with the owner's pid, or another one:
    # it must not take a live run's server and directory for a dead run's.
    started = waiting_project / "started.json"
    process = start_waiting_run(waiting_project, started, "--leak-check-db=local")
    try:
        facts = json.loads(started.read_text())
        reap = "from connguard.leak_detector.provision.janitor import reap_stale; reap_stale()"
        result = subprocess.run(
            [*OUT_OF_SIGHT, sys.executable, "-c", reap], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        assert os.path.exists(facts["root"])
        assert postgres_processes_under(facts["root"]) != []
        assert records_of(facts["pid"]) != []
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=60)
    _assert_nothing_left(facts)
