"""The container backend: testcontainers' PostgresContainer, on bridge or host networking.

testcontainers and the docker SDK come with the extra `connguard[containers]` and are imported
only here. Before this backend is chosen it checks that the engine answers (with a short timeout,
so a missing engine never hangs a run) and that the image is present or pullable, because
testcontainers would otherwise block in a pull. Under host networking there is no port mapping:
the server listens on a free port of ours (PGPORT) and that is the port we report.

Containers carry our labels (owner host, pid and process start time), so a later run removes
what a killed run left even when Ryuk, testcontainers' own reaper, is disabled or unavailable.

On a Linux engine of this machine the server also keeps the connection log the leak detector
reads (observer.ConnectionLog), as the local backend's does: its stderr goes to a file in a
host directory mounted into the container, written by each backend itself. The first
connection checks that the host sees each line as the server writes it; where it does not
(Docker Desktop's VM, a remote engine), there is no log and every test asks the server.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

from . import ProvisionError, Server, first_line, free_port, janitor, make_url
from .local import CONNECTION_LOG_SETTINGS

LABEL_PREFIX = "org.connguard"
ENGINE_TIMEOUT = 3  # seconds for a ping; a missing engine must not hang the run
USER = "connguard"
PASSWORD = "connguard"
# Durability off: nothing in a test server needs to survive a crash.
SPEED_SETTINGS = ("fsync=off", "synchronous_commit=off", "full_page_writes=off", "jit=off")
SPEED_ARGS = tuple(arg for setting in SPEED_SETTINGS for arg in ("-c", setting))
LOG_MOUNT = "/connguard-log"
# The log's pids are the container's, so a backend's end cannot be read from this machine's
# process table. Within this many seconds of arriving, a backend has logged its authorization,
# logged a FATAL error or exited; one the log announced that said nothing more for longer has
# ended silently (a cancel request, a client that sent nothing).
AUTHENTICATION_TIMEOUT = 2
LOG_ARGS = tuple(
    arg
    for name, value in {
        **CONNECTION_LOG_SETTINGS,
        "authentication_timeout": f"{AUTHENTICATION_TIMEOUT}s",
    }.items()
    for arg in ("-c", f"{name}={value}")
)


def _docker_client(timeout: float = ENGINE_TIMEOUT, docker_host: str | None = None):
    try:
        import docker
    except ImportError:
        raise ProvisionError(
            "the docker SDK is not installed (pip install 'connguard[containers]')"
        ) from None
    try:
        if docker_host:
            client = docker.DockerClient(base_url=docker_host, timeout=timeout)
        else:
            client = docker.from_env(timeout=timeout)
        client.ping()
    except Exception as error:  # the SDK raises several unrelated types for "no engine"
        raise ProvisionError(f"no Docker engine answers: {_one_line(error)}") from None
    return client


def _one_line(error: BaseException) -> str:
    return first_line(error)[:200]  # the Docker SDK's messages can run long


def remove_container(container_id: str, docker_host: str | None = None) -> None:
    """Remove a container by id; already gone counts as done. Raises ProvisionError if the
    engine cannot be reached (the caller keeps its record and retries later)."""
    client = _docker_client(docker_host=docker_host)
    import docker

    try:
        client.containers.get(container_id).remove(force=True, v=True)
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as error:
        if "already in progress" not in str(error):
            raise ProvisionError(f"cannot remove container: {_one_line(error)}") from None
    finally:
        client.close()


def reap_labelled(client) -> list[str]:
    """Remove containers of ours on this host whose owning process is gone."""
    reaped = []
    host = socket.gethostname()
    for container in client.containers.list(
        all=True, filters={"label": f"{LABEL_PREFIX}.owner-host={host}"}
    ):
        labels = container.labels
        record = {
            "owner_pid": labels.get(f"{LABEL_PREFIX}.owner-pid", "0"),
            "owner_start": labels.get(f"{LABEL_PREFIX}.owner-start"),
        }
        if not janitor.owner_alive(record):
            with contextlib.suppress(Exception):
                container.remove(force=True, v=True)
                reaped.append(f"container {container.short_id}")
    return reaped


class ContainerProvider:
    name = "container"

    def __init__(
        self, *, image: str, network: str = "bridge", max_connections: int = 100,
        allow_pull: bool = True,
    ) -> None:  # fmt: skip
        self.image = image
        self.allow_pull = allow_pull
        self.network = network
        self.max_connections = max_connections
        self.container = None
        self.log_dir: Path | None = None
        self._record = None
        self._client = None

    def unavailable_reason(self) -> str | None:
        try:
            import testcontainers  # noqa: F401
        except ImportError:
            return "testcontainers is not installed (pip install 'connguard[containers]')"
        try:
            self._client = _docker_client()
        except ProvisionError as error:
            return str(error)
        return self._image_problem()

    def _image_problem(self) -> str | None:
        import docker

        try:
            self._client.images.get(self.image)
            return None
        except docker.errors.ImageNotFound:
            pass
        except docker.errors.APIError as error:
            return f"cannot inspect image {self.image}: {_one_line(error)}"
        if not self.allow_pull:
            return (
                f"image {self.image} is not present locally (auto never pulls; choose "
                "--leak-check-db=container to pull it)"
            )
        try:
            self._client.images.get_registry_data(self.image)
        except Exception as error:
            return f"image {self.image} is not present and not pullable: {_one_line(error)}"
        return None

    def start(self) -> Server:
        if self._client is None:
            reason = self.unavailable_reason()
            if reason:
                raise ProvisionError(reason)
        reap_labelled(self._client)
        container = self._build()
        self.container = container
        try:
            container.start()
        except Exception as error:
            raise ProvisionError(f"container did not start: {_one_line(error)}") from None
        finally:
            if container._container is not None:
                self._remember(container._container.id)
        return self._server(container)

    def _build(self):
        from testcontainers.community.postgres import PostgresContainer

        me = os.getpid()
        labels = {
            f"{LABEL_PREFIX}": "true",
            f"{LABEL_PREFIX}.owner-host": socket.gethostname(),
            f"{LABEL_PREFIX}.owner-pid": str(me),
            f"{LABEL_PREFIX}.owner-start": janitor.process_start(me) or "",
        }
        command = ["postgres", "-c", f"max_connections={self.max_connections}", *SPEED_ARGS]
        kwargs: dict = {"labels": labels}
        if self.network == "host":
            # No port mapping under host networking: the server takes a free port of ours.
            self.port = free_port()
            container = PostgresContainer(
                self.image,
                port=self.port,
                username=USER,
                password=PASSWORD,
                dbname="postgres",
                driver=None,
            )
            container.ports.clear()  # Docker rejects port bindings under host networking
            container.with_env("PGPORT", str(self.port))
            kwargs.update(network_mode="host", network=None)
            command += ["-c", "listen_addresses=127.0.0.1", "-p", str(self.port)]
        else:
            container = PostgresContainer(
                self.image, username=USER, password=PASSWORD, dbname="postgres", driver=None
            )
        entrypoint = self._entrypoint() if self._engine_shares_files() else None
        if entrypoint:
            self.log_dir = Path(tempfile.mkdtemp(prefix="connguard-log-"))
            self.log_dir.chmod(0o777)  # the server writes as the image's own account
            log = self.log_dir / "postgres.log"
            log.touch()
            log.chmod(0o666)
            container.with_volume_mapping(str(self.log_dir), LOG_MOUNT, "rw")
            # The image's own entrypoint, with stderr (and so every backend's) sent to the file.
            # A file the container may not write (an SELinux label, say) must not stop the
            # server: it starts without the log, and _log_keeps_up finds none.
            log_file = f"{LOG_MOUNT}/postgres.log"
            script = f'if [ -w {log_file} ]; then exec "$@" 2>>{log_file}; fi; exec "$@"'
            kwargs["entrypoint"] = ["sh", "-c", script, "sh", *entrypoint]
            command += LOG_ARGS
            # Some testcontainers releases wait for the server's "ready" line in the container's
            # output, which now goes to the file; _wait_for_server is the readiness check.
            container._connect = lambda: None
        container.with_kwargs(**kwargs)
        container.with_command(command)
        container.with_name(f"connguard-{me}-{os.urandom(3).hex()}")
        return container

    def _engine_shares_files(self) -> bool:
        """Whether a file the container writes through a bind mount is this machine's file."""
        docker_host = os.environ.get("DOCKER_HOST", "")
        if sys.platform != "linux" or (docker_host and not docker_host.startswith("unix://")):
            return False
        try:
            system = str(self._client.info().get("OperatingSystem", ""))
        except Exception:
            return False
        return "docker desktop" not in system.lower()  # its engine runs in a VM

    def _entrypoint(self) -> list[str] | None:
        try:
            entrypoint = self._client.images.get(self.image).attrs["Config"].get("Entrypoint")
        except Exception:
            return None
        if isinstance(entrypoint, str):
            entrypoint = [entrypoint]
        return list(entrypoint) if entrypoint else None

    def _remember(self, container_id: str) -> None:
        docker_host = os.environ.get("DOCKER_HOST")
        self._record = janitor.register(
            f"container-{container_id[:12]}",
            kind="container",
            container_id=container_id,
            docker_host=docker_host,
            log_dir=str(self.log_dir) if self.log_dir is not None else None,
        )

    def _server(self, container) -> Server:
        if self.network == "host":
            host, port = "127.0.0.1", self.port
        else:
            host = container.get_container_host_ip()
            port = int(container.get_exposed_port(5432))
        url = make_url(USER, PASSWORD, host, port, "postgres")
        version, _ = self._wait_for_server(url)
        details = {
            "image": self.image,
            "network": self.network,
            "container_id": container._container.id,
        }
        if self.log_dir is not None and self._log_keeps_up(url):
            details["connection_log"] = str(self.log_dir / "postgres.log")
            details["connection_log_gone_after"] = AUTHENTICATION_TIMEOUT + 3
        return Server(
            backend=self.name,
            url=url,
            version=version,
            max_connections=self.max_connections,
            details=details,
        )

    def _log_keeps_up(self, url: str) -> bool:
        """Whether a connection's first line is in the file by the time the connection is made.

        The detector's proof needs exactly that; a mount that shows writes late must not be used.
        """
        log = self.log_dir / "postgres.log"
        try:
            before = log.stat().st_size
            janitor.server_facts(url)  # one connection, logged before it authenticates
            with log.open("rb") as file:
                file.seek(before)
                return b"connection received" in file.read()
        except (OSError, ProvisionError):
            return False

    @staticmethod
    def _wait_for_server(url: str) -> tuple[str, int]:
        # The in-container readiness probe can pass before the host-side port answers.
        deadline = time.monotonic() + 30
        while True:
            try:
                return janitor.server_facts(url)
            except ProvisionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        container, self.container = self.container, None
        if container is not None and container._container is not None:
            with contextlib.suppress(Exception):
                container._container.remove(force=True, v=True)
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None
        if self.log_dir is not None:
            shutil.rmtree(self.log_dir, ignore_errors=True)
            self.log_dir = None
        janitor.unregister(self._record)
        self._record = None
