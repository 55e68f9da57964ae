"""Overhead of `pytest --leak-check`: a generated suite of database tests, with and without it.

Generates N tests (default 500) of each shape asked for with --work (see TESTS), which all use
the pool of a session-scoped async engine, then runs the suite alternately without
--leak-check and with it, several rounds. Each way with it is compared with a run without it
on the same kind of server:

- local: --leak-check-db=local, the run's own cluster, whose connection log lets the detector
  skip the per-test pg_stat_activity query when nothing can have changed. Its baseline runs
  on a cluster started just before it, as fresh as the one --leak-check starts (a server that
  has run for minutes answers differently: warm caches, but checkpoints and more WAL).
- url: --leak-check-db=url on a cluster started once here. That server runs on this machine, so
  the postmaster's children in the process table let the detector skip the query as the
  connection log does. Its baseline runs on that same cluster.
- remote: url on that same cluster, with pytest (both ways) in a PID namespace of its own,
  whose /proc cannot show the server's processes: what a server on another host costs, or a
  service container seen from a job in a container of its own. Only this process's own
  descriptors prove that nothing changed (no connection of it came or went, and it has no
  child).
- url-container (only when asked, with --image): --leak-check-db=url on a container started
  once here (host networking, its own PID namespace), as a CI service container is. This
  machine's process table shows its processes under other pids, and proves as for url. Its
  baseline runs on that same container.
- asked (only when asked, with --image): url-container with --leak-check-server-proof=off: the
  detector asks the server after every test, the cost of a run that proves nothing.
- container (only when asked, with --image): --leak-check-db=container on host networking,
  whose server keeps the same connection log on a Linux engine of this machine. Its baseline
  runs on a container started just before it.

Prints the median added time per clean test (goal <= 0.3 ms) and the whole-suite ratio
(goal <= 1.05), both measured in this run. The suite ratio is read two ways, each labelled:
the tests' span (first test start to last test end) and the whole pytest process (start to
exit, as a user times it).

    .venv/bin/python benchmarks/bench_leak_check.py [--tests 500] [--rounds 5]
        [--work light typical] [--backend local url remote container url-container asked]
        [--image IMAGE]

With --false-positives N it instead runs the clean suite of the leak-detector tests
(tests/leak_detector/leak_projects.py: pooled idle connections, session-scoped engines and
pools, close in finally, finished background tasks, ...) N times serially and N times with
`-n 2`, on each backend given (the container ones too, with --image), and prints how
many runs reported anything (goal: 0).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# The generated projects of the leak-detector tests: their clean suite, and fixtures.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "leak_detector"))
from leak_projects import ASK_EVERY_TEST, OUT_OF_SIGHT, ROLLED_BACK  # noqa: E402

CONFTEST = """
import gc, json, os, time
import pytest
import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

_starts = {}
_times = []
_span = []
_cpu = []


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def engine():
    eng = create_async_engine(os.environ["DATABASE_URL"].replace(
        "postgresql://", "postgresql+asyncpg://"), pool_size=5)
    async with eng.begin() as conn:
        await conn.execute(text("create table if not exists agents (name text)"))
    yield eng
    await eng.dispose()


def pytest_runtest_logstart(nodeid, location):
    _starts[nodeid] = now = time.perf_counter()
    if not _span:
        _span.append(now)
        _cpu.append(time.thread_time())


def pytest_runtest_logfinish(nodeid, location):
    now = time.perf_counter()
    _times.append(now - _starts.pop(nodeid))
    _span[1:] = [now]
    _cpu[1:] = [time.thread_time()]


def pytest_collection_finish(session):
    # Both ways start the tests from the same state of the garbage collector: otherwise a
    # full collection lands inside one run's span and not the other's (--leak-check collects
    # here itself), a one-off tens of milliseconds that is not a per-test cost.
    gc.collect()


def pytest_sessionfinish(session):
    with open(os.environ["BENCH_TIMES"], "w") as f:
        json.dump({"times": _times, "span": _span[1] - _span[0], "cpu": _cpu[1] - _cpu[0]}, f)
"""

# "light": the least a test can do with the database (one pooled session, one query).
# "typical": the shape of a CRUD test: a transaction that writes, reads back and rolls back.
# "fixture": the same through a function-scoped session fixture whose transaction is rolled
# back after the test, as SQLAlchemy's testing recipe has it.
# "endpoint": an application test: a request to a FastAPI route, in process through httpx's
# ASGI transport, whose session dependency runs one query (the incident example's shape).
TESTS = {
    "light": """
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession


async def test_query_{n}(engine):
    async with AsyncSession(engine) as session:
        assert (await session.execute(text("select {n}"))).scalar() == {n}
""",
    "typical": """
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession


async def test_crud_{n}(engine):
    async with AsyncSession(engine) as session, session.begin():
        await session.execute(text("insert into agents (name) values (:name)"), {{"name": "a{n}"}})
        found = await session.execute(text("select count(*) from agents where name = :name"),
                                      {{"name": "a{n}"}})
        assert found.scalar() == 1
        await session.rollback()
""",
    "fixture": """
from sqlalchemy import text


async def test_with_fixture_{n}(rolled_back):
    await rolled_back.execute(text("insert into agents (name) values (:name)"), {{"name": "f{n}"}})
    await rolled_back.flush()
    found = await rolled_back.execute(text("select count(*) from agents where name = :name"),
                                      {{"name": "f{n}"}})
    assert found.scalar() == 1
""",
    "endpoint": """

async def test_endpoint_{n}(engine):
    ENGINE[:] = [engine]
    async with AsyncClient(transport=ASGITransport(app=app), base_url="http://test") as client:
        response = await client.get("/agents/e{n}")
    assert response.status_code == 200 and response.json() == {{"name": "e{n}", "count": 0}}
""",
}

# What a file of a shape starts with, once.
HEADERS = {
    "endpoint": """
from fastapi import Depends, FastAPI
from httpx import ASGITransport, AsyncClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

app = FastAPI()
ENGINE = []


async def session():
    async with AsyncSession(ENGINE[0]) as s:
        yield s


@app.get("/agents/{name}")
async def read_agent(name: str, s: AsyncSession = Depends(session)):
    found = await s.execute(text("select count(*) from agents where name = :name"), {"name": name})
    return {"name": name, "count": found.scalar()}
""",
}


INI = """[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = session
asyncio_default_test_loop_scope = session
"""


def make_suite(root: Path, count: int, work: str) -> None:
    (root / "pytest.ini").write_text(INI)
    (root / "conftest.py").write_text(CONFTEST + ROLLED_BACK)
    per_file = 50
    for start in range(0, count, per_file):
        tests = range(start, min(start + per_file, count))
        body = HEADERS.get(work, "") + "".join(TESTS[work].format(n=n) for n in tests)
        (root / f"test_gen_{start // per_file:03d}.py").write_text(body)


def run_suite(root: Path, args: list[str], env: dict[str, str], prefix=()) -> dict:
    times_file = root / "times.json"
    report = root / "leak-report.json"
    report.unlink(missing_ok=True)
    if args:
        args = [*args, f"--leak-check-report={report}"]
    env = {**env, "BENCH_TIMES": str(times_file)}
    started = time.perf_counter()
    result = subprocess.run(
        [*prefix, sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=root, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"suite failed ({' '.join(args) or 'baseline'}):\n{result.stdout[-3000:]}")
    snapshots = json.loads(report.read_text())["server_snapshots"] if report.exists() else None
    return {**json.loads(times_file.read_text()), "wall": wall, "snapshots": snapshots}


def _container_args(image: str) -> tuple[str, ...]:
    """The options of a --leak-check run on a container of `image`, on host networking."""
    return ("--leak-check-db=container", "--leak-check-network=host", f"--leak-check-image={image}")


def _container(image: str) -> Any:
    """A provider of a server in a container of `image`, on host networking (its own PID
    namespace): what the container and url-container baselines and servers run on."""
    from connguard.leak_detector.provision.container import ContainerProvider

    return ContainerProvider(image=image, network="host", allow_pull=False)


def _url_servers(local_url: str, backends: list[str], image: str) -> tuple[dict[str, str], Any]:
    """The server each url backend uses, by backend, and the container started for one."""
    local = {"url": local_url, "remote": local_url}
    if not {"url-container", "asked"} & set(backends):
        return local, None
    remote = _container(image)
    remote_url = remote.start().url
    return {**local, "url-container": remote_url, "asked": remote_url}, remote


# The options a --leak-check run on each backend adds to the url ones, and what runs pytest.
_EXTRA = {"asked": (ASK_EVERY_TEST,)}
_PREFIX = {"remote": OUT_OF_SIGHT}


def false_positives(runs: int, backends: list[str], image: str) -> int:
    from leak_projects import CONFTEST as CLEAN_CONFTEST
    from leak_projects import INI_AUTO_SESSION, TEST_CLEAN, run, write_project

    from connguard.leak_detector.provision.local import LocalProvider

    provider = LocalProvider(max_connections=200)
    server = provider.start()
    urls, remote = _url_servers(server.url, backends, image)
    bad = 0
    try:
        with tempfile.TemporaryDirectory(prefix="fp-leak-") as tmp:
            project = write_project(
                Path(tmp), INI_AUTO_SESSION, conftest=CLEAN_CONFTEST, test_clean=TEST_CLEAN
            )
            modes = (("serial", ()), ("-n 2", ("-p", "xdist", "-n", "2")))
            for backend, (mode, extra) in itertools.product(backends, modes):
                url = urls.get(backend)
                chosen = _container_args(image) if backend == "container" else None
                label = f"{backend}, {mode}"
                reported = 0
                for number in range(runs):
                    report = Path(tmp) / f"report-{number}.json"
                    result = run(
                        project,
                        url,
                        f"--leak-check-report={report}",
                        *_EXTRA.get(backend, ()),
                        *extra,
                        backend=chosen,
                        prefix=_PREFIX.get(backend, ()),
                    )
                    results = json.loads(report.read_text())["results"] if report.exists() else None
                    if result.returncode != 0 or results != []:
                        reported += 1
                        print(
                            f"run {number + 1} ({label}) reported: rc={result.returncode}\n"
                            + result.stdout[-2000:]
                        )
                print(
                    f"clean suite, {label}: {runs} runs, {reported} with any failure or "
                    f"leak report (goal 0)"
                )
                bad += reported
    finally:
        provider.stop()
        if remote is not None:
            remote.stop()
    return 1 if bad else 0


def _baseline(
    root: Path, backend: str, server_url: str | None, env: dict[str, str], image: str
) -> dict:
    """The suite without --leak-check, on the kind of server `backend` gives the checked run.

    A fresh database each time, as --leak-check makes one: the first connections to a new
    database cost the server extra work.
    """
    from connguard.leak_detector.provision import with_database
    from connguard.leak_detector.provision.janitor import create_database, drop_databases
    from connguard.leak_detector.provision.local import LocalProvider

    provider: Any = None
    if backend == "local":
        provider = LocalProvider()
    elif backend == "container":
        provider = _container(image)
    url = provider.start().url if provider is not None else server_url
    try:
        create_database(url, "bench_baseline")
        result = run_suite(
            root,
            [],
            {**env, "DATABASE_URL": with_database(url, "bench_baseline")},
            _PREFIX.get(backend, ()),
        )
        drop_databases(url, ["bench_baseline"])
        return result
    finally:
        if provider is not None:
            provider.stop()


def _verdict(ok: bool) -> str:
    return "OK" if ok else "OVER"


def _report(label: str, plain_runs: list[dict], checked_runs: list[dict]) -> None:
    plain_median = statistics.median(t for run in plain_runs for t in run["times"])
    checked_median = statistics.median(t for run in checked_runs for t in run["times"])
    # The suite: wall time from the first test's start to the last test's end (collection,
    # provisioning and interpreter start are outside it), median over the rounds.
    plain_total = statistics.median(run["span"] for run in plain_runs)
    checked_total = statistics.median(run["span"] for run in checked_runs)
    added_ms = (checked_median - plain_median) * 1000
    ratio = checked_total / plain_total
    # Paired by round (each pair ran back to back), which cancels most of the drift of a
    # shared machine's load between rounds.
    pairs = list(zip(plain_runs, checked_runs, strict=True))
    paired_added = (
        statistics.median(
            statistics.median(c["times"]) - statistics.median(p["times"]) for p, c in pairs
        )
        * 1000
    )
    paired_ratios = sorted(c["span"] / p["span"] for p, c in pairs)
    paired_ratio = statistics.median(paired_ratios)
    # The same span in CPU time of the thread running the tests: steadier than wall time on a
    # shared machine, and blind to waiting (for the server, for instance).
    paired_cpu = statistics.median(c["cpu"] / p["cpu"] for p, c in pairs)
    # The least disturbed run of each: on a shared machine the noise only ever adds time.
    best_ratio = min(c["span"] for c in checked_runs) / min(p["span"] for p in plain_runs)
    # The whole pytest process, start to exit: what a user waits for. Besides the tests it
    # holds interpreter start, imports, collection and, with --leak-check only, the
    # provisioner's work (a database, or a whole local cluster, and the observer).
    plain_wall = statistics.median(run["wall"] for run in plain_runs)
    checked_wall = statistics.median(run["wall"] for run in checked_runs)
    wall_ratio = checked_wall / plain_wall
    paired_wall = statistics.median(c["wall"] / p["wall"] for p, c in pairs)
    snapshots = statistics.median(run.get("snapshots") or 0 for run in checked_runs)
    rounds = ", ".join(
        f"{statistics.median(p['times']) * 1000:.3f}/{statistics.median(c['times']) * 1000:.3f}"
        for p, c in pairs
    )
    print(f"[{label}] per-round median ms without/with: {rounds}")
    print(
        f"[{label}] median per test: without {plain_median * 1000:.3f} ms, "
        f"with --leak-check {checked_median * 1000:.3f} ms; "
        f"server snapshots per run: {snapshots:.0f}"
    )
    print(
        f"[{label}] median added time per clean test (goal <= 0.3 ms): "
        f"{added_ms:.3f} ms over all tests {_verdict(added_ms <= 0.3)}, "
        f"{paired_added:.3f} ms paired by round {_verdict(paired_added <= 0.3)}"
    )
    print(
        f"[{label}] whole suite (goal ratio <= 1.05): without {plain_total:.3f} s, "
        f"with {checked_total:.3f} s, ratio {ratio:.3f} {_verdict(ratio <= 1.05)}, "
        f"{paired_ratio:.3f} paired by round {_verdict(paired_ratio <= 1.05)} "
        f"(rounds {paired_ratios[0]:.3f}-{paired_ratios[-1]:.3f}; first test start to last "
        f"test end)"
    )
    print(
        f"[{label}] the same span in CPU time of the test thread: ratio {paired_cpu:.3f} "
        f"paired by round; fastest run with / fastest without: {best_ratio:.3f}"
    )
    print(
        f"[{label}] whole pytest process (start to exit, incl. startup, collection and "
        f"--leak-check provisioning): without {plain_wall:.3f} s, with {checked_wall:.3f} s, "
        f"ratio {wall_ratio:.3f} {_verdict(wall_ratio <= 1.05)}, "
        f"{paired_wall:.3f} paired by round {_verdict(paired_wall <= 1.05)}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work", nargs="+", choices=sorted(TESTS), default=["light", "typical"])
    parser.add_argument(
        "--backend",
        nargs="+",
        choices=["local", "url", "remote", "container", "url-container", "asked"],
        default=["local", "url"],
    )
    parser.add_argument(
        "--image",
        default=os.environ.get("CONNGUARD_TEST_IMAGE", "postgres:16-alpine"),
        help="for --backend container, url-container and asked: a PostgreSQL image present on the "
        "engine (host network)",
    )
    parser.add_argument("--false-positives", type=int, metavar="N", default=0)
    options = parser.parse_args()
    if options.false_positives:
        return false_positives(options.false_positives, options.backend, options.image)

    from connguard.leak_detector.provision.local import LocalProvider

    provider = LocalProvider(max_connections=100)
    server = provider.start()
    urls, remote = _url_servers(server.url, options.backend, options.image)
    try:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("CONNGUARD_", "PYTEST_", "DATABASE_URL"))
        }
        common = ["--leak-check", "--leak-check-url-env=DATABASE_URL"]
        checked_args = {
            "local": [*common, "--leak-check-db=local"],
            "container": [*common, *_container_args(options.image)],
            **{
                backend: [
                    *common,
                    "--leak-check-db=url",
                    f"--leak-check-db-url={url}",
                    *_EXTRA.get(backend, ()),
                ]
                for backend, url in urls.items()
            },
        }
        runs: dict[str, dict[str, list[dict]]] = {}
        for work in options.work:
            with tempfile.TemporaryDirectory(prefix="bench-leak-") as tmp:
                root = Path(tmp)
                make_suite(root, options.tests, work)
                found: dict[str, list[dict]] = {}
                for number in range(-1, options.rounds):  # round -1 warms caches, not counted
                    results = {}
                    for backend in options.backend:
                        results[f"plain-{backend}"] = _baseline(
                            root, backend, urls.get(backend), env, options.image
                        )
                        results[backend] = run_suite(
                            root, checked_args[backend], env, _PREFIX.get(backend, ())
                        )
                    if number >= 0:
                        for key, result in results.items():
                            found.setdefault(key, []).append(result)
            runs[work] = found
    finally:
        provider.stop()
        if remote is not None:
            remote.stop()

    print(
        f"{options.tests} generated tests, {options.rounds} rounds each way, alternating, "
        f"PostgreSQL {server.version}, load average {os.getloadavg()[0]:.2f}"
    )
    for work, found in runs.items():
        for backend in options.backend:
            _report(f"{work}, {backend}", found[f"plain-{backend}"], found[backend])
    return 0


if __name__ == "__main__":
    sys.exit(main())
