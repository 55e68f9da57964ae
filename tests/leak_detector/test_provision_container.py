"""The container backend, for real: a local engine, a local image, host networking.

Skipped with the reason when no engine answers or the image is missing, except under
CONNGUARD_REQUIRE_DOCKER=1 (as .ci/run sets after .ci/docker-up.sh), where that fails.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from leak_projects import ASK_EVERY_TEST
from provision_helpers import (
    CONFTEST_RECORDING_URL,
    TEST_FIXTURES_WORK,
    TEST_IMAGE,
    TEST_WAITS,
    LoopbackProxy,
    records,
    run_pytest,
    start_waiting_run,
)
from test_connection_log import (
    EXPECTED,
    TESTS,
    children_account_for_every_backend,
    gated_run,
    verdicts,
)

pytestmark = pytest.mark.docker

# What this machine needs: no Ryuk (its image cannot be pulled) and no gateway guessing.
TESTCONTAINERS_ENV = {
    "TESTCONTAINERS_RYUK_DISABLED": "true",
    "TESTCONTAINERS_HOST_OVERRIDE": "127.0.0.1",
    "TESTCONTAINERS_CONNECTION_MODE": "docker_host",
}
CONTAINER_ARGS = ("--leak-check-db=container", "--leak-check-network=host",
                  f"--leak-check-image={TEST_IMAGE}")  # fmt: skip


def _engine_problem() -> str | None:
    try:
        import docker
    except ImportError:
        return "the docker SDK is not installed"
    try:
        client = docker.from_env(timeout=3)
        client.ping()
    except Exception as error:
        return f"no Docker engine answers ({type(error).__name__})"
    try:
        client.images.get(TEST_IMAGE)
    except docker.errors.ImageNotFound:
        return f"image {TEST_IMAGE} is missing (build it with .ci/build-postgres-image.sh)"
    finally:
        client.close()
    return None


@pytest.fixture(scope="module")
def docker_client():
    problem = _engine_problem()
    if problem:
        if os.environ.get("CONNGUARD_REQUIRE_DOCKER") == "1":
            pytest.fail(f"CONNGUARD_REQUIRE_DOCKER=1 but {problem}")
        pytest.skip(problem)
    import docker

    client = docker.from_env(timeout=10)
    yield client
    client.close()


def _exists(client, container_id: str) -> bool:
    import docker

    try:
        client.containers.get(container_id)
    except docker.errors.NotFound:
        return False
    return True


def test_container_backend_fixtures_work_and_the_container_goes(pytester, docker_client):
    pytester.makeconftest(CONFTEST_RECORDING_URL)
    pytester.makepyfile(test_fixtures=TEST_FIXTURES_WORK)
    result = run_pytest(
        pytester.path, "--leak-check", *CONTAINER_ARGS, "--leak-check-url-env=DATABASE_URL",
        "-v", "-s", env=TESTCONTAINERS_ENV,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 passed" in result.stdout
    assert "BACKEND container" in result.stdout
    header = [line for line in result.stdout.splitlines() if line.startswith("connguard:")]
    assert f"backend container ({TEST_IMAGE}, host)" in header[0]
    assert "connguard:***@127.0.0.1" in header[0]
    container_id = result.stdout.split("CONTAINER ", 1)[1].split()[0]
    assert len(container_id) == 64
    assert not _exists(docker_client, container_id)


def test_ctrl_c_removes_the_container(pytester, docker_client):
    pytester.makepyfile(test_waits=TEST_WAITS)
    started = pytester.path / "started.json"
    process = start_waiting_run(pytester.path, started, *CONTAINER_ARGS, extra=TESTCONTAINERS_ENV)
    facts = json.loads(started.read_text())
    assert _exists(docker_client, facts["container_id"])
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 2, output
    assert not _exists(docker_client, facts["container_id"])


def test_kill_9_then_the_next_run_removes_the_container(pytester, docker_client):
    pytester.makepyfile(test_waits=TEST_WAITS)
    started = pytester.path / "started.json"
    process = start_waiting_run(pytester.path, started, *CONTAINER_ARGS, extra=TESTCONTAINERS_ENV)
    facts = json.loads(started.read_text())
    process.kill()
    process.communicate(timeout=30)
    assert _exists(docker_client, facts["container_id"])  # nothing could clean up
    (log_dir,) = [r["log_dir"] for r in records() if r.get("container_id") == facts["container_id"]]
    assert os.path.isdir(log_dir)  # the server's connection log, mounted from this machine

    (pytester.path / "test_waits.py").unlink()
    pytester.makepyfile(test_next="def test_next(connguard_database):\n    pass\n")
    # Any backend reaps: the next run here uses the fast local one.
    result = run_pytest(pytester.path, "--leak-check", "--leak-check-db=local")
    assert result.returncode == 0, result.stdout + result.stderr
    assert not _exists(docker_client, facts["container_id"])
    assert not os.path.exists(log_dir)


def test_auto_skips_a_missing_image_without_pulling(pytester, docker_client):
    pytester.makepyfile("def test_ok(connguard_database):\n    pass\n")
    result = run_pytest(
        pytester.path, "--leak-check", "--leak-check-image=connguard/absent:0",
        "--leak-check-network=host", env=TESTCONTAINERS_ENV,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "backend local" in result.stdout


def test_auto_chooses_the_container_when_engine_and_image_are_there(pytester, docker_client):
    pytester.makepyfile("def test_ok(connguard_database):\n    pass\n")
    result = run_pytest(
        pytester.path, "--leak-check", f"--leak-check-image={TEST_IMAGE}",
        "--leak-check-network=host", env=TESTCONTAINERS_ENV,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"backend container ({TEST_IMAGE}, host)" in result.stdout


def test_the_local_image_honours_the_official_environment(docker_client):
    """The image .ci/build-postgres-image.sh builds behaves like the official one."""
    import psycopg

    from connguard.leak_detector.provision import free_port, make_url

    port = free_port()
    container = docker_client.containers.run(
        TEST_IMAGE, detach=True, network_mode="host",
        environment={"POSTGRES_USER": "alice", "POSTGRES_PASSWORD": "pw", "POSTGRES_DB": "appdb",
                     "PGPORT": str(port)},
        labels={"org.connguard": "true"},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while b"database system is ready to accept connections" not in container.logs():
            assert time.monotonic() < deadline, container.logs().decode()[-2000:]
            time.sleep(0.1)
        url = make_url("alice", "pw", "127.0.0.1", port, "appdb")
        with psycopg.connect(url) as conn:
            assert conn.execute("select current_user, current_database()").fetchone() == (
                "alice", "appdb",
            )  # fmt: skip
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(make_url("alice", "wrong", "127.0.0.1", port, "appdb")).close()
    finally:
        container.remove(force=True)


def test_the_container_keeps_a_connection_log_that_misses_nothing(
    docker_client, tmp_path, monkeypatch
):
    # The server's stderr goes to a file mounted from this machine; the detector trusts it as
    # it trusts the local cluster's, and the verdicts are those of asking after every test.
    # (Without the query cancel: in a container a cancel request's backend counts as gone
    # only after the server's authentication timeout, and this run is shorter.)
    from connguard.leak_detector.provision.local import LocalProvider

    for name, value in TESTCONTAINERS_ENV.items():
        monkeypatch.setenv(name, value)  # leak_projects.run passes them on
    selection = ("-k", "not cancel")
    selected = TESTS - 4  # the cancel and the three tests after it
    _, container = gated_run(
        tmp_path / "container", None, *selection, backend=CONTAINER_ARGS, selected=selected
    )
    provider = LocalProvider()
    if provider.unavailable_reason():
        pytest.skip(f"no server to compare with: {provider.unavailable_reason()}")
    server = provider.start()
    try:  # the baseline: no proof, every test asks
        _, url = gated_run(
            tmp_path / "url", server.url, *selection, ASK_EVERY_TEST, selected=selected
        )
    finally:
        provider.stop()
    assert container["server_proof"] == "connection log" and url["server_proof"] is None
    assert verdicts(container) == verdicts(url) == EXPECTED
    # The thirteen quiet tests were not asked about.
    saved = url["server_snapshots"] - container["server_snapshots"]
    assert saved >= 11, (url["server_snapshots"], container["server_snapshots"])


@pytest.fixture(scope="module")
def container_server(docker_client):
    """A server in a container of this machine, in its own PID namespace (as a CI service
    container is), reached by URL."""
    from connguard.leak_detector.provision.container import ContainerProvider

    provider = ContainerProvider(image=TEST_IMAGE, network="host", allow_pull=False)
    server = provider.start()
    try:
        yield server
    finally:
        provider.stop()


@pytest.mark.parametrize("over", ["tcp", "proxy"])
def test_a_container_servers_processes_account_for_every_backend(container_server, over):
    # This machine's process table lists the container's processes under other pids; each
    # one's status gives the pid the server reports. Through a proxy (a published port) the
    # server's backends name the proxy's port, and the server tells which.
    url = container_server.url
    if over == "proxy":
        with LoopbackProxy(url) as proxy:
            children_account_for_every_backend(url, proxy.url)
    else:
        children_account_for_every_backend(url, url)


def test_a_container_server_over_a_shared_unix_socket_is_named_too(docker_client, tmp_path):
    # A socket directory shared with the container: the kernel names the postmaster under our
    # pid, and the backend is its child whose pid in the container is the one the server gives.
    from connguard.leak_detector.provision import free_port, make_url
    from connguard.leak_detector.provision.container import ContainerProvider

    sockets = tmp_path / "sockets"
    sockets.mkdir()
    sockets.chmod(0o777)  # the server runs as its own user
    port = free_port()
    container = docker_client.containers.run(
        TEST_IMAGE, detach=True, network_mode="host",
        environment={"POSTGRES_USER": "alice", "POSTGRES_PASSWORD": "pw", "PGPORT": str(port)},
        volumes={str(sockets): {"bind": "/var/run/postgresql", "mode": "rw"}},
        labels={"org.connguard": "true"},
    )  # fmt: skip
    try:
        url = make_url("alice", "pw", "127.0.0.1", port, "postgres")
        ContainerProvider._wait_for_server(url)  # the image's first start initializes it
        children_account_for_every_backend(url, f"{url}?host={sockets}")
    finally:
        container.remove(force=True)


def test_a_container_reached_by_url_skips_only_what_is_proven(container_server, tmp_path):
    # The url backend on a container of this machine (a CI service container): the process
    # table proves what the connection log proves for the container backend, with the
    # verdicts of asking after every test.
    # (A cancel request's backend ends silently; its process leaves the table at once.)
    url = container_server.url
    _, proven = gated_run(tmp_path / "proven", url)
    _, asked = gated_run(tmp_path / "asked", url, ASK_EVERY_TEST)
    assert (proven["server_proof"], asked["server_proof"]) == ("process table", None)
    assert verdicts(proven) == verdicts(asked) == EXPECTED
    saved = asked["server_snapshots"] - proven["server_snapshots"]
    assert saved >= 14, (asked["server_snapshots"], proven["server_snapshots"])


UNWRITABLE_LOG = """
import json, sys
import psycopg
from connguard.leak_detector.provision.container import ContainerProvider

provider = ContainerProvider(image=sys.argv[1], network="host", allow_pull=False)
build = provider._build


def build_then_lock():
    container = build()
    (provider.log_dir / "postgres.log").chmod(0o444)  # the server's account may not write it
    return container


provider._build = build_then_lock
server = provider.start()
try:
    with psycopg.connect(server.url) as conn:
        answer = conn.execute("select 1").fetchone()[0]
    print(json.dumps({"answer": answer, "log": server.details.get("connection_log")}))
finally:
    provider.stop()
"""


def test_a_log_the_server_cannot_write_leaves_it_running_without_one(docker_client):
    import subprocess
    import sys

    env = {**os.environ, **TESTCONTAINERS_ENV}
    result = subprocess.run(
        [sys.executable, "-c", UNWRITABLE_LOG, TEST_IMAGE],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == {"answer": 1, "log": None}
