"""Time from pytest start to the first test body, per provisioning backend, side by side.

    python benchmarks/bench_provision.py [--repeat 3]

Each case starts a fresh `python -m pytest` on a one-test project whose test body writes the
wall-clock time; the figure is that time minus the moment before the process was started
(median of --repeat runs). Cases: plain pytest without a database (the floor), the local
backend with a cold and with a warm initdb cache, the url backend (a server this script starts),
the container backend (when a Docker engine answers and the image exists; host networking), and
pytest-postgresql's `postgresql` fixture when it is importable (set BENCH_PYTHONPATH to a
directory it is installed in to keep it out of the project's environment). pytest-postgresql
cannot run as root, so under root that case runs as the postgres account.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TEST_BODY = """
import time
from pathlib import Path

def test_first({fixture}):
    Path(__file__).with_name("reached").write_text(repr(time.time()))
"""
IMAGE = os.environ.get("CONNGUARD_TEST_IMAGE", "connguard/postgres-local:15")
TESTCONTAINERS_ENV = {
    "TESTCONTAINERS_RYUK_DISABLED": "true",
    "TESTCONTAINERS_HOST_OVERRIDE": "127.0.0.1",
    "TESTCONTAINERS_CONNECTION_MODE": "docker_host",
}


def _base_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith(("CONNGUARD_", "PYTEST_"))}


# Runs pg_ctl as postgres with the data directory's parent owned by it (root cannot run it).
PG_CTL_AS_POSTGRES = """#!/bin/sh
data=""
prev=""
for arg in "$@"; do
    case "$prev" in -D|--pgdata) data="$arg";; esac
    case "$arg" in --pgdata=*) data="${arg#--pgdata=}";; esac
    prev="$arg"
done
if [ -n "$data" ]; then
    parent=$(dirname "$data")
    chown postgres "$parent"
    dir="$parent"
    while [ "$dir" != "/" ]; do chmod o+x "$dir" 2>/dev/null; dir=$(dirname "$dir"); done
fi
cd /tmp
exec runuser -u postgres -- {pg_ctl} "$@"
"""


def time_to_first_test(fixture: str, args: list[str], env: dict) -> float:
    project = Path(tempfile.mkdtemp(prefix="bench-provision-"))
    try:
        (project / "test_first.py").write_text(TEST_BODY.format(fixture=fixture))
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
        command = [arg.replace("{project}", str(project)) for arg in command]
        started = time.time()
        result = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True)
        reached = project / "reached"
        if result.returncode != 0 or not reached.exists():
            tail = (result.stdout + result.stderr).strip().splitlines()[-5:]
            raise RuntimeError("run failed: " + " | ".join(tail))
        return float(reached.read_text()) - started
    finally:
        shutil.rmtree(project, ignore_errors=True)


def provisioning_alone(cache_dir: Path, use_cache: bool) -> float:
    """In-process: start a local cluster and create the run's database (no pytest, no detector)."""
    from connguard.leak_detector.provision import janitor
    from connguard.leak_detector.provision.local import LocalProvider

    os.environ["XDG_CACHE_HOME"] = str(cache_dir)
    started = time.perf_counter()
    provider = LocalProvider(use_cache=use_cache)
    try:
        server = provider.start()
        janitor.create_database(server.url, "bench_db")
        return time.perf_counter() - started
    finally:
        provider.stop()
        os.environ.pop("XDG_CACHE_HOME", None)


def _docker_ready() -> str | None:
    try:
        import docker

        client = docker.from_env(timeout=3)
        client.ping()
        client.images.get(IMAGE)
        client.close()
    except Exception as error:
        return f"{type(error).__name__}: {str(error)[:80]}"
    return None


def _pytest_postgresql_env() -> dict | None:
    extra = os.environ.get("BENCH_PYTHONPATH")
    env = _base_env()
    if extra:
        env["PYTHONPATH"] = extra
    probe = subprocess.run(
        [sys.executable, "-c", "import pytest_postgresql"], env=env, capture_output=True
    )
    return env if probe.returncode == 0 else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    options = parser.parse_args()

    from connguard.leak_detector.provision import make_url
    from connguard.leak_detector.provision.local import LocalProvider, find_bindir

    bindir, _ = find_bindir()
    if bindir is None:
        print("bench_provision: no PostgreSQL server binaries found", file=sys.stderr)
        return 2
    scratch = Path(tempfile.mkdtemp(prefix="bench-provision-cache-"))
    warm_cache = scratch / "warm"
    server = LocalProvider(use_cache=False)
    url_server = server.start()
    port = int(url_server.url.rsplit(":", 1)[1].split("/")[0])
    url = make_url("postgres", None, "127.0.0.1", port, "postgres")

    cases: list[tuple[str, callable]] = []
    base = _base_env()
    cases.append(("plain pytest, no database", lambda i: time_to_first_test("", [], base)))

    def local_cold(i: int) -> float:
        env = {**base, "XDG_CACHE_HOME": str(scratch / f"cold{i}")}
        return time_to_first_test(
            "connguard_database", ["--leak-check", "--leak-check-db=local"], env
        )

    def local_cached(i: int) -> float:
        env = {**base, "XDG_CACHE_HOME": str(warm_cache)}
        return time_to_first_test(
            "connguard_database", ["--leak-check", "--leak-check-db=local"], env
        )

    cases.append(("connguard local, cold initdb", local_cold))
    local_cached(-1)  # fills the warm cache
    cases.append(("connguard local, cached initdb", local_cached))
    cases.append((
        "connguard url (existing server)",
        lambda i: time_to_first_test(
            "connguard_database", ["--leak-check", "--leak-check-db=url"],
            {**base, "CONNGUARD_DATABASE_URL": url},
        ),
    ))  # fmt: skip
    docker_problem = _docker_ready()
    if docker_problem is None:
        cases.append((
            "connguard container (local image, host net)",
            lambda i: time_to_first_test(
                "connguard_database",
                ["--leak-check", "--leak-check-db=container", "--leak-check-network=host",
                 f"--leak-check-image={IMAGE}"],
                {**base, **TESTCONTAINERS_ENV},
            ),
        ))  # fmt: skip
    pp_env = _pytest_postgresql_env()
    if pp_env is not None:
        pg_ctl = str(bindir / "pg_ctl")
        if os.geteuid() == 0:
            wrapper = scratch / "pg_ctl"
            wrapper.write_text(PG_CTL_AS_POSTGRES.replace("{pg_ctl}", pg_ctl))
            wrapper.chmod(0o755)
            pg_ctl = str(wrapper)
        cases.append((
            "pytest-postgresql (postgresql fixture)",
            lambda i: time_to_first_test(
                "postgresql",
                [f"--postgresql-exec={pg_ctl}", "--basetemp={project}/basetemp"],
                pp_env,
            ),
        ))  # fmt: skip

    results: dict[str, float] = {}
    try:
        for name, run in cases:
            times = [run(i) for i in range(options.repeat)]
            results[name] = statistics.median(times)
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)

    floor = results["plain pytest, no database"]
    reference_name = "connguard local, cached initdb"
    reference = results[reference_name]
    print(f"time from pytest start to the first test body (median of {options.repeat}; "
          f"PostgreSQL binaries {bindir})")  # fmt: skip
    print(f"{'case':48} {'seconds':>8} {'- floor':>8} {'x local cached':>15}")
    for name, seconds in results.items():
        print(f"{name:48} {seconds:8.3f} {seconds - floor:8.3f} {seconds / reference:15.2f}")
    if docker_problem is not None:
        print(f"container: skipped ({docker_problem})")
    if pp_env is None:
        print("pytest-postgresql: skipped (not importable; set BENCH_PYTHONPATH)")
    else:
        pp = results["pytest-postgresql (postgresql fixture)"]
        cold_run = results["connguard local, cold initdb"]
        print(
            f"pytest-postgresql / connguard local cached: {pp / reference:.2f}x; "
            f"/ connguard local cold: {pp / cold_run:.2f}x"
        )
    import psycopg  # noqa: F401  (imported once, outside the timings below)

    cold = statistics.median(
        provisioning_alone(scratch / f"alone-cold{i}", True) for i in range(options.repeat)
    )
    provisioning_alone(scratch / "alone-warm", True)
    warm = statistics.median(
        provisioning_alone(scratch / "alone-warm", True) for i in range(options.repeat)
    )
    shutil.rmtree(scratch, ignore_errors=True)
    print(
        "local backend alone (start cluster + create database, in-process): "
        f"cold {cold:.3f} s, cached {warm:.3f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
