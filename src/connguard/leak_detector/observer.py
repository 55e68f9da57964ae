"""The server-side view: client backends of this run's database, read from pg_stat_activity.

The observer holds its own synchronous psycopg connection. It never touches the event loop of
the code under test (an async observer would have to share that loop, or block inside it).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import struct
import sys
import time
from stat import S_ISSOCK
from typing import NamedTuple

# Our database ($1), and the per-test clones named after it (--leak-check-db-per-test).
_OURS = b"(datname = $1 OR starts_with(datname, $1 || '_t'))"
# Only client backends of our database; our own connection is excluded by pid. Other xdist
# workers use their own database, so the datname filter already keeps them out.
_QUERY = (
    b"SELECT pid, state, backend_start::text, client_port, query, application_name "
    b"FROM pg_stat_activity "
    b"WHERE " + _OURS + b" AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
)
_STATEMENT = b"connguard_snapshot"
# Which of these pids ($2) can never become a client backend of our database: other processes
# of the server (checkpointer, autovacuum, parallel workers...) and other databases' backends.
# A client backend whose database is not yet known may still be ours; an unlisted pid too.
_OTHERS = (
    b"SELECT pid FROM pg_stat_activity WHERE pid = ANY($2::int[]) AND NOT ("
    b"backend_type = 'client backend' AND (datname IS NULL OR " + _OURS + b"))"
)


_STARTED = (
    b"SELECT pid, extract(epoch FROM backend_start)::float8, "
    b"extract(epoch FROM clock_timestamp())::float8 "
    b"FROM pg_stat_activity WHERE pid = ANY($1::int[])"
)


class Backend(NamedTuple):
    """One row of pg_stat_activity.

    A named tuple rather than a frozen dataclass: every test builds one per backend of its
    database, and a frozen dataclass's __init__ sets each field through object.__setattr__.
    """

    pid: int
    state: str | None
    backend_start: str | None
    client_port: int | None
    query: str | None
    application_name: str | None


# A line of a server log written with log_line_prefix '%m [%p] ' (see provision/local.py).
_LOG_LINE = re.compile(rb"^[^\[\n]*\[(\d+)\] ([A-Z]+):  (.*)$", re.MULTILINE)
_AUTHORIZED_DB = re.compile(rb"connection authorized: .*?\bdatabase=(\S+)")


class _FileProof:
    """What the proofs share: a file of the kernel's or the server's, held open."""

    _fd: int

    def close(self) -> None:
        try:
            os.close(self._fd)
        except OSError:
            pass


class ConnectionLog(_FileProof):
    """The server's own log of connections: a proof, read with one fstat, that none came or went.

    Only for a server whose log connguard configured and can read (the local backend, and the
    container backend on a Linux engine of this machine, through a mounted file): it logs
    with log_connections and log_disconnections, and each backend writes its lines straight
    to the file. A backend writes "connection received" before it authenticates, and so before
    pg_stat_activity can list it. So if the log has not grown since the last snapshot was
    asked for, and every backend it announced before then was listed by that snapshot, has
    ended, or belongs to another database, the server's set of backends is still that
    snapshot's, and the next test's round trip can be skipped.
    """

    kind = "connection log"
    sees_every_client = True

    def __init__(self, path: str, dbname: str, gone_after: float | None = None) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        # Start at the end: every backend that started before is in the first snapshot.
        self._offset = os.fstat(self._fd).st_size
        self._partial = b""
        self._ours = dbname.encode()
        self._ours_clone = self._ours + b"_t"  # per-test clones, as in the snapshot query
        # Backends announced by the log and not yet accounted for (listed, ended, elsewhere),
        # with when this reader first saw them.
        self._in_flight: dict[int, float] = {}
        # None: the log's pids are this machine's, and a silent backend's end is read from the
        # process table. Otherwise (a container's pids) a backend silent for this many seconds
        # has ended: the server's authentication_timeout is shorter.
        self._gone_after = gone_after
        self._lost = False  # the file shrank: nothing can be proven from it any more

    def unchanged(self) -> bool:
        """Nothing was logged since the last read, and no announced backend is unaccounted."""
        if self._lost or os.fstat(self._fd).st_size != self._offset:
            return False
        if self._in_flight:
            self._drop_ended()
        return not self._in_flight

    def read(self) -> None:
        """Take in what was logged since the last read; call it before asking for a snapshot."""
        size = os.fstat(self._fd).st_size
        if size < self._offset:  # truncated or replaced
            self._lost = True
            return
        if size == self._offset:
            return
        data = self._partial + os.pread(self._fd, size - self._offset, self._offset)
        self._offset = size
        complete, _, self._partial = data.rpartition(b"\n")
        in_flight = self._in_flight
        now = time.monotonic()
        for match in _LOG_LINE.finditer(complete):
            pid, level, message = int(match[1]), match[2], match[3]
            if message.startswith(b"connection received"):
                in_flight[pid] = now
            elif pid not in in_flight:
                continue
            elif level in (b"FATAL", b"PANIC") or message.startswith(b"disconnection"):
                del in_flight[pid]
            else:
                database = _AUTHORIZED_DB.search(message)
                if database is not None and not self._is_ours(database[1]):
                    del in_flight[pid]

    def listed(self, pids) -> None:
        """A snapshot asked for after the last read listed these backends."""
        in_flight = self._in_flight
        if in_flight:
            for pid in pids:
                in_flight.pop(pid, None)

    def _is_ours(self, name: bytes) -> bool:
        return name == self._ours or name.startswith(self._ours_clone)

    def _drop_ended(self) -> None:
        # A backend that exits before authenticating (a cancel request, a refused login)
        # logs nothing more; the process is gone, and so is the doubt. With this machine's
        # pids the process table says so; with a container's, the time since it arrived.
        in_flight = self._in_flight
        if self._gone_after is not None:
            deadline = time.monotonic() - self._gone_after
            for pid, seen in list(in_flight.items()):
                if seen < deadline:
                    del in_flight[pid]
            return
        for pid in list(in_flight):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                del in_flight[pid]
            except OSError:  # exists (EPERM under another account)
                pass


class PostmasterChildren(_FileProof):
    """The server's processes, read from this machine's process table: a proof, with one pread,
    that no backend came or went.

    For a server whose processes this machine's process table shows (see `attach`): every
    backend is a child of the postmaster, and the kernel lists a process's children in
    /proc/PID/task/PID/children, in the order they were forked. When that list is the one
    read just before the last snapshot was asked for, and each process on it was either listed
    by that snapshot or is known never to be a client backend of our database, the server's
    set of backends is still that snapshot's. (A backend that ends and whose pid comes back as a
    new one, with no other process of the server starting or ending in between, would go
    unseen; that takes the machine's pids to wrap around first.)

    A server in a container of this machine (a CI service container) runs in its own PID
    namespace, which this one contains: the table lists its processes under our pids, and
    each one's status gives its pid in the server's namespace (the last of NSpid), which is
    what pg_stat_activity and the clients report. The listing is read in our pids and
    compared in the server's.
    """

    kind = "process table"
    sees_every_client = True

    def __init__(self, postmaster: int, observer_pid: int, others, translate: bool = False) -> None:
        self._fd = os.open(f"/proc/{postmaster}/task/{postmaster}/children", os.O_RDONLY)
        # Our pid -> the server's, for the children of a postmaster in another PID namespace
        # (None: the same namespace, the same pids); only the current children are kept.
        self._server_pids: dict[int, int] | None = {} if translate else None
        self._asked: bytes | None = None  # the children when the pending snapshot was asked for
        self._proven: bytes | None = None  # the children every one of which is accounted for
        # Processes that are not, and cannot become, client backends of our database, and
        # how to ask the server which of some pids are such.
        self._others: set[int] = {observer_pid}
        self._ask_others = others
        self._seen: set[int] = set()  # the children at the last snapshot (or at attach)

    @classmethod
    def attach(
        cls, pgconn, backend_pid: int, others, connect: tuple[float, float]
    ) -> PostmasterChildren | None:
        """The proof for the server behind `pgconn`, or None if its processes are not ours to see.

        The backend serving `pgconn` must be a process of this machine that we can name for
        certain. Over a Unix socket the kernel gives the listening postmaster's pid (in our
        namespace), and the backend is its child. Over loopback TCP the backend's process
        title names its client's port, which the server tells (through a proxy or a published
        container port, that is the proxy's), and the process started while `pgconn`
        connected (`connect`: before and after, on the boot clock), which tells our backend
        from one of another server with the same pid in its own namespace and, by chance, a
        client on the same port number. In either case the process's pid in its own namespace
        must be `backend_pid`. A server on another host, or in a PID namespace this one cannot
        see (a container next to ours), fails these checks.
        """
        if not sys.platform.startswith("linux"):
            return None
        try:
            with socket.socket(fileno=os.dup(pgconn.socket)) as sock:
                if sock.family == socket.AF_UNIX:
                    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                    postmaster = struct.unpack("3i", creds)[0]
                    backend = _child_named(postmaster, backend_pid)
                else:
                    if not ipaddress.ip_address(sock.getpeername()[0]).is_loopback:
                        return None
                    port = pgconn.exec_(b"SELECT inet_client_port()").get_value(0, 0)
                    backend = _process_titled(backend_pid, b"(%s)" % port, connect)
                    postmaster = _parent(backend) if backend is not None else None
            if backend is None or len(os.listdir(f"/proc/{postmaster}/task")) != 1:
                return None  # a multi-threaded postmaster would list children per thread
            proof = cls(postmaster, backend_pid, others, translate=backend != backend_pid)
        except Exception:  # whatever the reason, no proof: every test asks the server
            return None
        for _ in range(3):  # a child may end between the listing and reading its status
            proof.read()
            listing, proof._asked = proof._asked, None
            seen = proof._pids(listing)
            if seen is not None:
                break
        proof._seen = set(seen or ())
        if backend_pid not in proof._seen:
            proof.close()
            return None
        return proof

    def unchanged(self) -> bool:
        """The server has the processes it had when the last snapshot was asked for."""
        if self._proven is None:
            return False
        try:
            return os.pread(self._fd, _LISTING, 0) == self._proven
        except OSError:  # the postmaster is gone
            return False

    def read(self) -> None:
        """Call it just before asking for a snapshot."""
        try:
            asked = os.pread(self._fd, _LISTING, 0)
        except OSError:
            asked = None
        # A listing that fills the buffer may have been cut short: it proves nothing.
        self._asked = asked if asked and len(asked) < _LISTING else None

    def listed(self, pids) -> None:
        """A snapshot asked for after the last read listed these backends."""
        asked, self._asked, self._proven = self._asked, None, None
        order = self._pids(asked)
        if order is None:
            return
        children = set(order)
        # The kernel lists children in the order they were forked: whatever follows a
        # newcomer is new too, though its pid was seen before (it ended and came back).
        seen = self._seen
        for index, pid in enumerate(order):
            if pid not in seen:
                self._others.difference_update(order[index:])
                break
        self._seen = children
        self._others &= children  # a pid that left may come back as someone else
        unknown = children - self._others - pids.keys()
        if unknown:
            self._others |= self._ask_others(unknown)
            unknown -= self._others
        if not unknown:
            self._proven = asked

    def _pids(self, listing: bytes | None) -> list[int] | None:
        """The children in `listing`, as the server's pids; None if that cannot be told."""
        if listing is None:
            return None
        ours = [int(pid) for pid in listing.split()]
        known = self._server_pids
        if known is None:
            return ours
        try:
            pids = [known[pid] if pid in known else _innermost_pid(pid) for pid in ours]
        except (OSError, ValueError):  # a child ended since the listing was read
            return None
        self._server_pids = dict(zip(ours, pids, strict=True))
        return pids


# Room for some ten thousand children; a larger buffer would cost an mmap per read.
_LISTING = 1 << 16


class OwnDescriptors(_FileProof):
    """This process's own descriptors and children: a proof, read from /proc/self/fd, that no
    connection of this test process came or went.

    For a server whose side of things this machine cannot see (on another host, or in a
    container whose processes its process table does not show). Every connection this process
    opens, through any driver (libpq's in C too), is a socket among its descriptors; one a
    child process opens is not, so a process with a child proves nothing. When each socket
    among its descriptors is one it had just before the last snapshot was asked for, or is no
    server connection (a TCP socket, or a PostgreSQL Unix socket), and there is no child, this
    process tree has opened nothing that snapshot did not list. Other descriptors come and go
    freely: an event loop's self-pipe, say, made and closed by every test that has a loop of
    its own. A socket is known by its inode, not its descriptor's number: a new connection
    given the number of one closed since is still new.

    That full look costs a system call per descriptor. In between, the number of descriptors
    (the size the kernel gives the directory, one fstat) stands in for it: while it is one at
    which a full look since the last snapshot found nothing new (a test's own event loop open,
    or closed again), nothing was opened, unless as many were closed. So that such a leak is
    not missed for good, a count stands in for at most _QUICK looks in a row; what the full
    look finds then is blamed by its start time, as below.

    What it cannot see is a client outside this process tree (a process on another host, or
    one that detached from its parent): such a backend is seen by the next snapshot that is
    asked for, at the latest after the run's last test, and blamed by its start time (see
    detect.LeakDetector._by_start_time).
    """

    kind = "file descriptors"
    sees_every_client = False
    _DIR = "/proc/self/fd"

    def __init__(self, fd: int, counted: bool) -> None:
        self._fd = fd  # the directory, held open: its size is the number of descriptors
        self._counted = counted  # (a kernel older than 6.2 gives 0)
        self._asked: tuple[set[int], int] | None = None
        self._proven: set[int] | None = None  # the sockets when the last snapshot was asked for
        # Counts of descriptors at which a full look found nothing new since the last snapshot,
        # each with how many more looks it may stand in for.
        self._counts: dict[int, int] = {}
        self._server: dict[int, bool] = {}  # a socket's inode -> whether it may be a connection

    @classmethod
    def attach(cls) -> OwnDescriptors | None:
        """The proof, where this platform lists a process's descriptors and waits without
        reaping (Linux)."""
        if not sys.platform.startswith("linux") or not hasattr(os, "waitid"):
            return None
        try:
            fd = os.open(cls._DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return None
        return cls(fd, counted=os.fstat(fd).st_size > 0)

    def unchanged(self) -> bool:
        """No server connection came since the last snapshot was asked for, and no child
        process can have opened one."""
        proven = self._proven
        if proven is None:
            return False
        counts = self._counts
        try:
            count = os.fstat(self._fd).st_size
            left = counts.get(count)
            if left:
                counts[count] = left - 1
            elif self._new_connection(proven):
                return False
        except OSError:  # out of descriptors, say: nothing can be proven now
            return False
        if not left and self._counted:  # a full look found this count clean
            if len(counts) >= 4:
                del counts[next(iter(counts))]
            counts[count] = _QUICK
        return not _has_children()

    def read(self) -> None:
        """Call it just before asking for a snapshot."""
        try:
            count = os.fstat(self._fd).st_size
            self._asked = ({inode for inode, _ in self._sockets()}, count)
        except OSError:
            self._asked = None

    def listed(self, pids) -> None:
        """A snapshot asked for after the last read was stored."""
        asked, self._asked = self._asked, None
        self._counts = {}
        if asked is None:
            self._proven = None
            return
        self._proven, count = asked
        if self._counted:
            self._counts[count] = _QUICK

    def _sockets(self):
        """(inode, descriptor) of each socket among this process's descriptors."""
        fstat, is_socket = os.fstat, S_ISSOCK
        for name in os.listdir(self._DIR):
            fd = int(name)
            try:
                found = fstat(fd)
            except OSError:  # closed since the listing (the listing's own, for one)
                continue
            if is_socket(found.st_mode):
                yield found.st_ino, fd

    def _new_connection(self, proven: set[int]) -> bool:
        """Whether a descriptor is a socket that may be a server connection, and not proven."""
        return any(
            inode not in proven and self._may_connect(inode, fd) for inode, fd in self._sockets()
        )

    def _may_connect(self, inode: int, fd: int) -> bool:
        known = self._server.get(inode)
        if known is None:
            if len(self._server) > 4096:
                self._server.clear()
            known = self._server[inode] = _is_server_socket(fd)
        return known


# How many tests in a row the number of descriptors may stand in for a full look.
_QUICK = 16


def _is_server_socket(fd: int) -> bool:
    """Whether socket `fd` may be a database connection: TCP, or a PostgreSQL Unix socket."""
    if socket.getdefaulttimeout() is not None:
        # Wrapping the socket would make it non-blocking, under another owner's feet.
        return True
    try:
        sock = socket.socket(fileno=fd)
    except OSError:  # closed, or not a socket any more
        return True
    try:
        family = sock.family
        if family in (socket.AF_INET, socket.AF_INET6):
            return sock.type == socket.SOCK_STREAM
        if family == socket.AF_UNIX:
            try:
                peer = sock.getpeername()
            except OSError:
                return False  # not connected: a listening socket, no client of a server
            return isinstance(peer, str) and ".s.PGSQL." in peer
        return False
    finally:
        sock.detach()


def _has_children() -> bool:
    """Whether this process has a child, running or not yet reaped (nothing is reaped here)."""
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


def _stat(pid: int) -> list[bytes]:
    """The fields of /proc/PID/stat after the command (in parentheses, and it may hold any
    byte): the 3rd field of proc(5) is [0]."""
    with open(f"/proc/{pid}/stat", "rb") as file:
        stat = file.read()
    return stat[stat.rindex(b")") + 2 :].split()


def _parent(pid: int) -> int:
    return int(_stat(pid)[1])


def _innermost_pid(pid: int) -> int:
    """The pid of our process `pid` in its own PID namespace (the same, in ours)."""
    with open(f"/proc/{pid}/status", "rb") as file:
        for line in file:
            if line.startswith(b"NSpid:"):
                return int(line.split()[-1])
    return pid  # a kernel older than 4.1 shows no NSpid: one namespace


def _child_named(parent: int, server_pid: int) -> int | None:
    """The child of `parent` whose pid in its own namespace is `server_pid`."""
    with open(f"/proc/{parent}/task/{parent}/children", "rb") as file:
        children = [int(pid) for pid in file.read().split()]
    if server_pid in children and _innermost_pid(server_pid) == server_pid:
        return server_pid
    named = [pid for pid in children if _innermost_pid(pid) == server_pid]
    return named[0] if len(named) == 1 else None


def _process_titled(server_pid: int, client: bytes, started: tuple[float, float]) -> int | None:
    """Our pid of the PostgreSQL backend whose pid in its own namespace is `server_pid`, whose
    process title names `client` (its client's port) and which started within `started` (on
    the boot clock), if exactly one process is such."""

    def named(pid: int) -> bool:
        try:
            return _innermost_pid(pid) == server_pid and _is_backend(pid, client, started)
        except (OSError, ValueError, IndexError):  # ended, or not ours to read
            return False

    if named(server_pid):  # the same namespace: the pid is ours too
        return server_pid
    found = [int(entry) for entry in os.listdir("/proc") if entry.isdigit() and named(int(entry))]
    return found[0] if len(found) == 1 else None


def _is_backend(pid: int, client: bytes, started: tuple[float, float]) -> bool:
    with open(f"/proc/{pid}/cmdline", "rb") as file:
        title = file.read()
    if not (title.startswith(b"postgres") and client in title):
        return False
    start = int(_stat(pid)[19]) / os.sysconf("SC_CLK_TCK")  # field 22: ticks since boot
    return started[0] - _TICK_SLACK <= start <= started[1] + _TICK_SLACK


# A process's start is kept in clock ticks (10 ms, as a rule): allow two either way.
_TICK_SLACK = 0.02


def _boot_clock() -> float:
    """Seconds since boot, the clock of a process's start in /proc (0.0 where there is none)."""
    clock = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(clock) if clock is not None else 0.0


class ObserverError(RuntimeError):
    """The observer could not connect or query; the message says why."""


class Observer:
    def __init__(
        self,
        url: str,
        dbname: str,
        connection_log: str | None = None,
        log_gone_after: float | None = None,
        prove: bool = True,
        own_side: bool = True,
    ) -> None:
        import psycopg

        self.dbname = dbname
        self.queries = 0  # snapshots taken from the server
        try:
            # Autocommit is essential: inside a transaction PostgreSQL freezes the first
            # pg_stat_activity snapshot it hands out, so later reads would never see a
            # connection open or close.
            connecting = _boot_clock()
            self._conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
            connected = _boot_clock()
        except psycopg.Error as error:
            raise ObserverError(f"cannot connect the observer: {error}".strip()) from None
        self.pid = self._conn.info.backend_pid
        self.last: dict[int, Backend] | None = None
        self.broken: str | None = None
        self._pending = False
        # Once per test: straight to libpq with a prepared statement and text results, which
        # is about half the time of a psycopg cursor round trip.
        self._pgconn = self._conn.pgconn
        self._dbname = dbname.encode()
        prepared = self._pgconn.prepare(_STATEMENT, _QUERY)
        if prepared.error_message:
            raise ObserverError(
                f"cannot prepare the observer query: "
                f"{prepared.error_message.decode(errors='replace').strip()}"
            )
        # What proves, without a round trip, that no backend came or went (see
        # detect._server_unchanged); without one, every test asks the server.
        self.proof: ConnectionLog | PostmasterChildren | OwnDescriptors | None = None
        if not prove:
            return
        if connection_log is not None:
            try:
                self.proof = ConnectionLog(connection_log, dbname, log_gone_after)
            except OSError:  # unreadable
                pass
        if self.proof is None:
            self.proof = PostmasterChildren.attach(
                self._pgconn, self.pid, self._others, (connecting, connected)
            )
        if self.proof is None and own_side:  # a server out of sight: what this process does
            self.proof = OwnDescriptors.attach()

    def send(self) -> None:
        """Ask for a snapshot now and collect it later: the round trip overlaps pytest's work."""
        if self.broken is not None or self._pending:
            return
        if self.proof is not None:
            self.proof.read()
        try:
            self._pgconn.send_query_prepared(_STATEMENT, [self._dbname])  # raises on failure
            while self._pgconn.flush():
                pass
        except Exception as error:
            self._broke(error)
            return
        self._pending = True

    def collect(self) -> dict[int, Backend]:
        """The snapshot asked for by send(), or a fresh one if none is pending."""
        if not self._pending:
            return self.snapshot()
        self._pending = False
        try:
            result = self._pgconn.get_result()
            while self._pgconn.get_result() is not None:
                pass
            return self._store(result)
        except Exception as error:
            self._broke(error)
            return {}

    def snapshot(self) -> dict[int, Backend]:
        """The client backends now; empty from the first failure on (see `broken`)."""
        if self._pending:
            self.collect()
        if self.broken is not None:
            return {}
        if self.proof is not None:
            self.proof.read()
        try:
            return self._store(self._pgconn.exec_prepared(_STATEMENT, [self._dbname]))
        except Exception as error:
            self._broke(error)
            return {}

    def _store(self, result) -> dict[int, Backend]:
        if result is None or result.error_message:
            message = result.error_message if result is not None else b"no result"
            raise ObserverError(message.decode(errors="replace").strip())
        value = result.get_value
        found = {}
        for row in range(result.ntuples):
            pid = int(value(row, 0))
            port = value(row, 3)
            found[pid] = Backend(
                pid,
                _text(value(row, 1)),
                _text(value(row, 2)),
                int(port) if port is not None else None,
                _text(value(row, 4)),
                _text(value(row, 5)),
            )
        self.last = found
        self.queries += 1
        if self.proof is not None:
            self.proof.listed(found)
        return found

    def _others(self, pids: set[int]) -> set[int]:
        """Which of `pids` are server processes that can never be client backends of ours."""
        result = self._pgconn.exec_params(_OTHERS, [self._dbname, _int_array(pids)])
        if result.error_message:
            raise ObserverError(result.error_message.decode(errors="replace").strip())
        return {int(result.get_value(row, 0)) for row in range(result.ntuples)}

    def started(self, pids: set[int]) -> dict[int, float]:
        """When these backends started, on this machine's clock (time.time()); ended ones are
        left out. The server's clock is read in the same query, so the two need not agree."""
        if self._pending:
            self.collect()
        if self.broken is not None:
            return {}
        before = time.time()
        try:
            result = self._pgconn.exec_params(_STARTED, [_int_array(pids)])
        except Exception as error:
            self._broke(error)
            return {}
        after = time.time()
        if result.error_message:
            return {}
        found = {}
        for row in range(result.ntuples):
            # The query ran about halfway through the round trip.
            offset = float(result.get_value(row, 2)) - (before + after) / 2
            found[int(result.get_value(row, 0))] = float(result.get_value(row, 1)) - offset
        return found

    def _broke(self, error: BaseException) -> None:
        # The server went away: from here on the ledger decides alone.
        self.broken = f"{type(error).__name__}: {error}".strip()
        self.last = {}
        self._pending = False

    def wait_gone(self, pids: set[int], unknown=None, budget: float = 0.2) -> dict[int, Backend]:
        """Poll until none of `pids` is listed, or `unknown(pid)` is false for those that are,
        or `budget` seconds pass.

        A backend whose client just closed lingers for a few milliseconds while it exits, and
        one a thread is still connecting becomes known when that connect returns; polling only
        while such pids remain keeps a clean test at one query.
        """
        deadline = time.monotonic() + budget
        current = self.snapshot()
        delay = 0.002
        while time.monotonic() < deadline and not self.broken:
            listed = pids & current.keys()
            if unknown is not None:
                listed = {pid for pid in listed if unknown(pid)}
            if not listed:
                break
            time.sleep(delay)
            delay = min(delay * 2, 0.02)
            current = self.snapshot()
        return current

    @property
    def pending(self) -> bool:
        return self._pending

    def close(self) -> None:
        if self.proof is not None:
            self.proof.close()
        try:
            self._conn.close()
        except Exception:
            pass


def _int_array(values) -> bytes:
    """A PostgreSQL int[] literal, as a text parameter."""
    return ("{" + ",".join(map(str, values)) + "}").encode()


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode(errors="replace")
