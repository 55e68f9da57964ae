"""The client-side ledger: every pool checkout and raw driver connection, who opened it and where.

While the leak check is active the ledger listens to SQLAlchemy pool events (class-level, on
``Pool``) and wraps the raw entry points of asyncpg, psycopg and psycopg_pool. Each checkout or
connection becomes a :class:`Record` with its owner (the test, or the fixture being set up),
the raw frames that opened it and the server backend pid. Recording must stay cheap, so frames
are kept as ``(code, lineno)`` pairs and only turned into file lines when a leak is reported.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import importlib.util
import os
import sys
import sysconfig
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import CodeType
from typing import Any

# One frame of an acquisition stack: the code object and the offset of its current instruction.
Frame = tuple[CodeType, int]

_MAX_FRAMES = 48
_getframe = sys._getframe

OPEN, CLOSED, RECLAIMED = "open", "closed", "reclaimed"


@dataclass(eq=False, slots=True)
class Owner:
    """Who a connection belongs to: a test, or a fixture (with its scope)."""

    kind: str  # "test" | "fixture"
    name: str  # the test's nodeid, or the fixture's name
    scope: str = "function"
    nodeid: str = ""  # the test a function-scoped owner belongs to; the fixture's baseid otherwise

    @property
    def label(self) -> str:
        if self.kind == "test":
            return self.name
        return f"fixture '{self.name}' ({self.scope} scope)"


# The owner of code running in the current context. asyncio tasks and asyncio.to_thread copy
# the context they were created in, so a background task started by a session fixture keeps
# the fixture as its owner while it runs during later tests.
CURRENT_OWNER: contextvars.ContextVar[Owner | None] = contextvars.ContextVar(
    "connguard_owner", default=None
)


@dataclass(eq=False, slots=True)
class Record:
    """One checkout from a pool or one raw connection, from open to release."""

    kind: str  # "SQLAlchemy session", "asyncpg connection", ...
    owner: Owner | None
    frames: list[Frame]
    pid: int | None = None
    state: str = OPEN
    # Weak reference to the SQLAlchemy proxy (its death without a check-in is the GC-hidden
    # leak), or a strong reference to a raw driver connection (probed with `probe`).
    ref: Any = None
    probe: Callable[[Any], bool] | None = None  # object -> still open?
    task: Any = None  # weakref to the asyncio task that opened it
    created_frames: list[Frame] | None = None  # where the ORM session holding it was made
    held_by_task: str | None = None  # set when a still-running task held it at test end
    pool: PoolInfo | None = None

    def is_open(self) -> bool:
        if self.state != OPEN:
            return False
        if self.probe is not None:
            target = self.ref
            try:
                still_open = bool(self.probe(target))
            except Exception:  # a half-torn-down driver object: treat as closed
                still_open = False
            if not still_open:
                self.state = CLOSED
                self.ref = None
            return still_open
        return True


@dataclass(eq=False, slots=True)
class PoolInfo:
    """A pool or engine created while the check was active."""

    kind: str  # "SQLAlchemy engine", "asyncpg pool", "psycopg pool"
    owner: Owner | None
    frames: list[Frame]
    ref: Any  # weakref (SQLAlchemy, psycopg_pool) or the pool itself (asyncpg has no weakref)
    capacity: int | None = None
    checked_out: int = 0
    peak: int = 0
    live: int = 0  # physical connections open (SQLAlchemy pools)
    is_closed: Callable[[Any], bool] | None = None
    reported: bool = False
    disposed: bool = False

    def target(self) -> Any:
        return self.ref() if isinstance(self.ref, weakref.ref) else self.ref

    def undisposed(self) -> bool:
        """Still holding server connections: created, used and never disposed/closed."""
        pool = self.target()
        if self.is_closed is None:  # SQLAlchemy: disposal closes every pooled connection
            return not self.disposed and self.live > 0
        if pool is None:
            return False
        try:
            return not self.is_closed(pool)
        except Exception:
            return False


@dataclass(slots=True)
class Physical:
    """A server connection the ledger knows, by backend pid."""

    pid: int
    pool: PoolInfo | None = None
    closed: bool = False
    # Returned to a SQLAlchemy pool inside a transaction: its reset did not end it (with
    # reset_on_return=None, or a transaction begun on the driver behind SQLAlchemy's back).
    in_transaction: bool = False


def _stop_codes() -> tuple[CodeType, CodeType | None]:
    """Frames past which no user code can lie: the event loop's callback runner, pluggy."""
    try:
        from pluggy import _callers

        multicall: CodeType | None = _callers._multicall.__code__
    except (ImportError, AttributeError):
        multicall = None
    return asyncio.events.Handle._run.__code__, multicall


# Compared by identity: `code in a_set` hashes the code object, which hashes its constants
# and names again at every frame, several times the cost of the rest of the step.
_STOP_LOOP, _STOP_PLUGGY = _stop_codes()


def capture_frames(skip: int = 1, depth: int = _MAX_FRAMES) -> list[Frame]:
    """The caller's stack as (code, instruction offset) pairs, continued through parent greenlets.

    SQLAlchemy's asyncio layer runs the sync pool code inside a greenlet whose stack ends at
    the greenlet's start; the user's coroutine frames are in the parent greenlet, suspended
    in its switch(). Inside such a greenlet the walk starts in the parent: the child's frames
    are SQLAlchemy's own (about twenty at a checkout), and reading a frame's f_back makes
    CPython create a frame object for the caller, which that function then pays for when it
    returns; skipping them halves what a checkout costs the test. Code the user hands to
    run_sync() is then located at its run_sync() call.

    The walk stops at the event loop or pluggy, and keeps the instruction offset rather than
    the line: computing f_lineno scans a line table, which on pytest's large functions costs
    more than the whole walk.
    """
    glet = None
    greenlet = sys.modules.get("greenlet")
    if greenlet is not None:
        current = greenlet.getcurrent()
        if getattr(current, "__sqlalchemy_greenlet_provider__", False) and current.parent:
            glet = current.parent
    f = glet.gr_frame if glet is not None else _getframe(skip + 1)
    frames: list[Frame] = []
    append = frames.append
    loop, pluggy = _STOP_LOOP, _STOP_PLUGGY
    while True:
        while f is not None:
            code = f.f_code
            if code is loop or code is pluggy:
                return frames
            append((code, f.f_lasti))
            if len(frames) >= depth:
                return frames
            f = f.f_back
        if greenlet is None:
            return frames
        glet = (glet or greenlet.getcurrent()).parent
        if glet is None:
            return frames
        f = glet.gr_frame


def line_of(code: CodeType, offset: int) -> int:
    """The source line of the instruction at `offset` (what f_lineno would have said)."""
    for start, end, line in code.co_lines():
        if start <= offset < end and line is not None:
            return line
    return code.co_firstlineno


# -- which frames belong to the user

_LIBRARY_PACKAGES = (
    "sqlalchemy",
    "asyncpg",
    "psycopg",
    "psycopg_pool",
    "greenlet",
    "asyncio",
    "pluggy",
    "_pytest",
    "pytest",
    "pytest_asyncio",
    "xdist",
    "execnet",
    "connguard",
    "anyio",
    "concurrent",
    "threading",
    "contextlib",
    # web frameworks and HTTP clients that carry a request to the user's handler
    "starlette",
    "fastapi",
    "httpx",
    "httpcore",
    "sniffio",
    "uvicorn",
    "h11",
)
_STDLIB = sysconfig.get_paths().get("stdlib", "") or "\0"


def _installed_at(packages: Iterable[str]) -> tuple[str, ...]:
    """Where these packages are installed (directories end with a slash), found without
    importing them: a frame is a library's when its file is there, and a user's own
    `store/sqlalchemy/` directory is not."""
    found = []
    for name in packages:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is None:
            continue
        if spec.submodule_search_locations:
            found += [os.path.join(path, "") for path in spec.submodule_search_locations]
        elif spec.origin:
            found.append(spec.origin)
    return tuple(path.replace("\\", "/") for path in found)


# Also by the path an installation has, for a library installed where this interpreter does
# not look (another virtualenv's site-packages on a subprocess's stack, say).
_LIBRARY_DIRS = tuple(
    f"/{where}/{pkg}/" for where in ("site-packages", "dist-packages") for pkg in _LIBRARY_PACKAGES
)
_LIBRARY_LOCATIONS = _installed_at(_LIBRARY_PACKAGES)
# Console scripts (.venv/bin/pytest) and the interpreter's own tree are never the user's code.
_SCRIPTS = tuple({os.path.join(prefix, "bin") + os.sep for prefix in (sys.prefix, sys.base_prefix)})
_is_library_cache: dict[str, bool] = {}


def is_library_file(filename: str) -> bool:
    cached = _is_library_cache.get(filename)
    if cached is not None:
        return cached
    norm = filename.replace("\\", "/")
    result = (
        (norm.startswith("<") and not norm.startswith("<doctest "))
        or (norm.startswith(_STDLIB) and "site-packages" not in norm)
        or norm.startswith(_SCRIPTS)
        or norm.startswith(_LIBRARY_LOCATIONS)
        or any(directory in norm for directory in _LIBRARY_DIRS)
    )
    _is_library_cache[filename] = result
    return result


def user_frames(frames: list[Frame] | None) -> list[tuple[str, int, str]]:
    """(filename, line, function) of the frames outside libraries, innermost first."""
    return [
        (code.co_filename, line_of(code, offset), code.co_name)
        for code, offset in frames or ()
        if not is_library_file(code.co_filename)
    ]


# -- driver helpers


def _backend_pid(driver_connection: Any) -> int | None:
    try:
        if hasattr(driver_connection, "get_server_pid"):  # asyncpg
            return int(driver_connection.get_server_pid())
        info = getattr(driver_connection, "info", None)  # psycopg 3
        if info is not None and hasattr(info, "backend_pid"):
            return int(info.backend_pid)
        if hasattr(driver_connection, "get_backend_pid"):  # psycopg2
            return int(driver_connection.get_backend_pid())
    except Exception:
        return None
    return None


def _in_transaction(dbapi_connection: Any) -> bool:
    """Whether a driver connection is inside a transaction; True when the driver cannot say."""
    driver = getattr(dbapi_connection, "driver_connection", None) or dbapi_connection
    try:
        check = getattr(driver, "is_in_transaction", None)  # asyncpg
        if check is not None:
            return bool(check())
        status = getattr(getattr(driver, "info", None), "transaction_status", None)  # psycopg 3
        if status is None and hasattr(driver, "get_transaction_status"):  # psycopg2
            status = driver.get_transaction_status()
        return status is None or int(status) != 0  # 0: idle, outside a transaction
    except Exception:
        return True


def _current_task_ref() -> Any:
    # Finding the running loop costs a getpid() system call (a check against a fork); given
    # the loop, current_task() does not look it up again.
    loop = asyncio._get_running_loop()
    if loop is None:
        return None
    task = asyncio.current_task(loop)
    return weakref.ref(task) if task is not None else None


def _caller_module(depth: int) -> str:
    try:
        return _getframe(depth + 1).f_globals.get("__name__", "") or ""
    except ValueError:
        return ""


# Code inside these packages opens connections on behalf of a pool the ledger already tracks.
_POOL_INTERNAL = ("sqlalchemy", "psycopg_pool", "asyncpg", "connguard")


_pool_listener: Callable[[Any], None] | None = None


def _watch_pool_creation(
    pool_cls: type, listener: Callable[[Any], None] | None, replacing: Any = None
) -> None:
    """Call `listener` with every SQLAlchemy pool created from now on (None: stop).

    Pools are seen at creation through __new__, not __init__: create_engine() reads the names
    of Pool.__init__'s parameters to route pool_recycle, pool_pre_ping, pool_reset_on_return,
    ... and a (*args, **kwargs) wrapper would hide them. The replacement __new__ stays for the
    life of the process: once a class's __new__ was assigned, CPython cannot give it back the
    object.__new__ it inherited (deleting the attribute leaves a slot that hands the
    constructor's arguments to object.__new__, which rejects them), so uninstalling only
    drops the listener.
    """
    global _pool_listener
    if replacing is not None and _pool_listener != replacing:
        return  # another ledger was installed since
    _pool_listener = listener
    current = pool_cls.__dict__.get("__new__")
    if listener is None or getattr(current, "connguard_watch", False):
        return
    original = current.__func__ if isinstance(current, staticmethod) else current

    def pool_new(cls: type, *args: Any, **kwargs: Any) -> Any:
        pool = original(cls, *args, **kwargs) if original is not None else object.__new__(cls)
        if _pool_listener is not None:
            _pool_listener(pool)
        return pool

    pool_new.connguard_watch = True  # type: ignore[attr-defined]
    pool_cls.__new__ = staticmethod(pool_new)  # type: ignore[method-assign,assignment]


class Ledger:
    """Records connections while installed; `install()` / `uninstall()` bracket the run."""

    def __init__(self, fallback_owner: Callable[[], Owner | None]) -> None:
        self._fallback_owner = fallback_owner
        self.open: dict[int, Record] = {}  # key -> record (key: id of rec / connection)
        self.reclaimed: list[Record] = []  # SQLAlchemy proxies that died without check-in
        self.pools: list[PoolInfo] = []
        self.physical: dict[int, Physical] = {}  # pid -> Physical
        self._sa_pid: dict[int, int] = {}  # id(dbapi connection) -> pid
        self._sa_pools: dict[int, PoolInfo] = {}  # id(Pool) -> info
        self._detached: dict[int, Record] = {}  # id(dbapi connection) -> record
        self._undo: list[Callable[[], None]] = []
        self._installed: set[str] = set()
        self._lock = threading.Lock()
        # Called when a recorded connection is back in its pool (SQLAlchemy, asyncpg,
        # psycopg_pool), after the pool's reset has run; the detector sets it while it waits
        # for connections to come back.
        self.on_returned: Callable[[], None] | None = None
        # Wrapped async connects under way. Between tests the event loop does not run, so
        # one whose backend the server already lists cannot finish, and that backend stays
        # unexplained until the loop runs again (a pool filling itself in the background).
        self.connecting = 0

    # -- owner

    def owner(self) -> Owner | None:
        owner = CURRENT_OWNER.get()
        return owner if owner is not None else self._fallback_owner()

    # -- install / uninstall

    def install(self) -> None:
        """Listen and wrap, for the drivers the user's code can import (never import others)."""
        self._install_sqlalchemy()
        self._install_asyncpg()
        self._install_psycopg()
        self._install_psycopg_pool()

    def uninstall(self) -> None:
        while self._undo:
            undo = self._undo.pop()
            try:
                undo()
            except Exception:
                pass
        self._installed = set()

    def _patch(self, owner: Any, name: str, replacement: Any) -> None:
        original = owner.__dict__[name]
        setattr(owner, name, replacement)
        self._undo.append(lambda: setattr(owner, name, original))

    def _importable(self, name: str) -> bool:
        if name in self._installed:
            return False
        if name in sys.modules:
            return True
        import importlib.util

        try:
            return importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            return False

    # -- SQLAlchemy

    def _install_sqlalchemy(self) -> None:
        if not self._importable("sqlalchemy"):
            return
        self._installed.add("sqlalchemy")
        from sqlalchemy import event
        from sqlalchemy.orm import Session
        from sqlalchemy.pool import Pool

        listeners = {
            "connect": self._sa_connect,
            "checkout": self._sa_checkout,
            "checkin": self._sa_checkin,
            "close": self._sa_close,
            "detach": self._sa_detach,
            "close_detached": self._sa_close_detached,
            "invalidate": self._sa_invalidate,
        }
        for name, fn in listeners.items():
            event.listen(Pool, name, fn)
            self._undo.append(functools.partial(event.remove, Pool, name, fn))
        event.listen(Session, "after_begin", self._sa_after_begin)
        self._undo.append(
            functools.partial(event.remove, Session, "after_begin", self._sa_after_begin)
        )

        ledger = self
        _watch_pool_creation(Pool, self._sa_pool_created)
        self._undo.append(
            functools.partial(_watch_pool_creation, Pool, None, self._sa_pool_created)
        )

        original_session_init = Session.__dict__["__init__"]

        def session_init(session_self: Any, *args: Any, **kwargs: Any) -> None:
            original_session_init(session_self, *args, **kwargs)
            session_self.__dict__["_connguard_frames"] = capture_frames(depth=12)

        self._patch(Session, "__init__", session_init)

        from sqlalchemy.engine import Engine

        original_dispose = Engine.__dict__["dispose"]

        def dispose(engine_self: Any, *args: Any, **kwargs: Any) -> None:
            info = ledger._sa_pools.get(id(engine_self.pool))
            if info is not None:
                info.disposed = True
            original_dispose(engine_self, *args, **kwargs)

        self._patch(Engine, "dispose", dispose)

    def _sa_pool_created(self, pool: Any) -> None:
        # Called from Pool.__new__, before any __init__ ran: the capacity is read at the
        # first checkout, the reset style when it is needed.
        info = PoolInfo(
            "SQLAlchemy engine", self.owner(), capture_frames(2), weakref.ref(pool), capacity=-1
        )
        self._sa_pools[id(pool)] = info
        self.pools.append(info)

    def _sa_pool_info(self, rec: Any) -> PoolInfo | None:
        pool = getattr(rec, "_ConnectionRecord__pool", None)
        if pool is None:
            return None
        info = self._sa_pools.get(id(pool))
        if info is None or info.ref() is not pool:  # SQLAlchemy pools are held weakly
            # A pool created before the check was installed (at import, by a conftest).
            info = PoolInfo("SQLAlchemy engine", None, [], weakref.ref(pool), capacity=-1)
            self._sa_pools[id(pool)] = info
        return info

    def _sa_connect(self, dbapi_connection: Any, rec: Any) -> None:
        pid = _backend_pid(getattr(rec, "driver_connection", None) or dbapi_connection)
        if pid is None:
            return  # no PostgreSQL backend (SQLite, say): nothing a server keeps open
        info = self._sa_pool_info(rec)
        if info is not None:
            info.live += 1  # (counted down in _sa_forget, by pid)
        self._sa_pid[id(dbapi_connection)] = pid
        self.physical[pid] = Physical(pid, pool=info)
        # SQLAlchemy opened it through a wrapped raw connect: the pool owns it now.
        for key, record in list(self.open.items()):
            if record.pid == pid and record.probe is not None:
                self.open.pop(key, None)

    def _sa_forget(self, dbapi_connection: Any, rec: Any) -> None:
        pid = self._sa_pid.pop(id(dbapi_connection), None)
        if pid is not None:
            physical = self.physical.get(pid)
            if physical is not None and not physical.closed:
                physical.closed = True
                if physical.pool is not None:
                    physical.pool.live -= 1

    def _sa_checkout(self, dbapi_connection: Any, rec: Any, proxy: Any) -> None:
        info = self._sa_pool_info(rec)
        if info is not None and info.capacity == -1:
            info.capacity = _sa_capacity(getattr(rec, "_ConnectionRecord__pool", None))
        record = Record(
            "SQLAlchemy connection",
            self.owner(),
            capture_frames(),
            pid=self._sa_pid.get(id(dbapi_connection)),
            ref=weakref.ref(proxy),
            task=_current_task_ref(),
            pool=info,
        )
        self.open[id(rec)] = record
        if info is not None:
            info.checked_out += 1
            if info.checked_out > info.peak:
                info.peak = info.checked_out

    def _sa_after_begin(self, session: Any, transaction: Any, connection: Any) -> None:
        fairy = getattr(connection, "_dbapi_connection", None)
        rec = getattr(fairy, "_connection_record", None)
        record = self.open.get(id(rec)) if rec is not None else None
        if record is not None and record.created_frames is None:
            record.kind = "SQLAlchemy session"
            record.created_frames = session.__dict__.get("_connguard_frames")

    def _sa_release(self, record: Record) -> None:
        # The proxy is already dead when SQLAlchemy's garbage-collection path checks it in:
        # the user never released it, so it stays a leak of its owner.
        if record.ref is not None and record.ref() is None:
            record.state = RECLAIMED
            self.reclaimed.append(record)
        else:
            record.state = CLOSED
        if record.pool is not None:
            record.pool.checked_out -= 1

    def _sa_checkin(self, dbapi_connection: Any, rec: Any) -> None:
        record = self.open.pop(id(rec), None)
        if record is not None:
            self._sa_release(record)
        pid = self._sa_pid.get(id(dbapi_connection))
        physical = self.physical.get(pid) if pid is not None else None
        if physical is not None:  # the pool's reset has run by now
            physical.in_transaction = _in_transaction(dbapi_connection)
        if record is not None:
            self._returned()

    def _sa_detach(self, dbapi_connection: Any, rec: Any) -> None:
        record = self.open.pop(id(rec), None)
        if record is not None:
            self.open[id(dbapi_connection)] = record
            self._detached[id(dbapi_connection)] = record
        self._sa_forget(dbapi_connection, rec)

    def _sa_close_detached(self, dbapi_connection: Any) -> None:
        record = self._detached.pop(id(dbapi_connection), None)
        if record is not None:
            self.open.pop(id(dbapi_connection), None)
            self._sa_release(record)

    def _sa_close(self, dbapi_connection: Any, rec: Any) -> None:
        self._sa_forget(dbapi_connection, rec)

    def _sa_invalidate(self, dbapi_connection: Any, rec: Any, exception: Any) -> None:
        self._sa_forget(dbapi_connection, rec)

    # -- raw drivers

    def _raw(
        self,
        kind: str,
        connection: Any,
        probe: Callable[[Any], bool],
        frames: list[Frame],
        pool: PoolInfo | None = None,
    ) -> Record:
        record = Record(
            kind,
            self.owner(),
            frames,
            pid=_backend_pid(connection),
            ref=connection,
            probe=probe,
            task=_current_task_ref(),
            pool=pool,
        )
        self.open[id(connection)] = record
        if record.pid is not None:
            self.physical[record.pid] = Physical(record.pid, pool=pool)
        if pool is not None:
            pool.checked_out += 1
            if pool.checked_out > pool.peak:
                pool.peak = pool.checked_out
        return record

    def _connected(
        self, kind: str, connection: Any, probe: Callable[[Any], bool], frames: list[Frame] | None
    ) -> None:
        """A wrapped driver connect returned: the user's connection (`frames`: where it was
        opened) gets a record; a pool's own (`frames` None) is only known as pooled."""
        if frames is not None:
            self._raw(kind, connection, probe, frames)
        else:
            self.note_pooled(connection)

    async def _await_connect(
        self,
        pending: Any,
        kind: str,
        probe: Callable[[Any], bool],
        frames: list[Frame] | None,
    ) -> Any:
        """Await a wrapped async connect, counted in `connecting` until it returns."""
        self.connecting += 1
        try:
            connection = await pending
        finally:
            self.connecting -= 1
        self._connected(kind, connection, probe, frames)
        return connection

    def note_pooled(self, connection: Any) -> None:
        """A connection a pool opened for itself: its pid is explained while it lives."""
        pid = _backend_pid(connection)
        if pid is not None and pid not in self.physical:
            self.physical[pid] = Physical(pid)

    def _released(self, connection: Any) -> bool:
        """A raw pool is given a recorded connection back (its reset is still to come)."""
        record = self.open.pop(id(connection), None)
        if record is None:
            return False
        record.state = CLOSED
        record.ref = None
        if record.pool is not None:
            record.pool.checked_out -= 1
        return True

    def _returned(self) -> None:
        # A recorded connection is back in its pool, the pool's reset done; except in a
        # psycopg_pool with a reset callback, whose worker task resets it later: a snapshot
        # sent now may show it in a transaction still, and then gets a second look.
        if self.on_returned is not None:
            self.on_returned()

    def _install_asyncpg(self) -> None:
        if not self._importable("asyncpg"):
            return
        self._installed.add("asyncpg")
        import asyncpg
        import asyncpg.connection
        import asyncpg.pool

        ledger = self
        original_connect = asyncpg.connect

        @functools.wraps(original_connect)
        async def connect(*args: Any, **kwargs: Any) -> Any:
            internal = _caller_module(1).startswith(_POOL_INTERNAL)
            frames = None if internal else capture_frames()
            pending = original_connect(*args, **kwargs)
            return await ledger._await_connect(pending, "asyncpg connection", _asyncpg_open, frames)

        self._patch(asyncpg, "connect", connect)
        # asyncpg pools bind asyncpg.connection.connect when created; through the wrapper
        # their own connections become known (as pooled) without a record.
        if asyncpg.connection.__dict__.get("connect") is original_connect:
            self._patch(asyncpg.connection, "connect", connect)

        pool_cls = asyncpg.pool.Pool
        original_create_pool = asyncpg.create_pool

        @functools.wraps(original_create_pool)
        def create_pool(*args: Any, **kwargs: Any) -> Any:
            pool = original_create_pool(*args, **kwargs)
            capacity = getattr(pool, "_maxsize", None)
            ledger.pools.append(
                PoolInfo(
                    "asyncpg pool",
                    ledger.owner(),
                    capture_frames(),
                    pool,
                    capacity=capacity,
                    is_closed=lambda p: p._closed or p._closing,
                )
            )
            return pool

        self._patch(asyncpg, "create_pool", create_pool)
        if asyncpg.pool.__dict__.get("create_pool") is original_create_pool:
            self._patch(asyncpg.pool, "create_pool", create_pool)

        original_acquire = pool_cls.__dict__["_acquire"]
        original_release = pool_cls.__dict__["release"]

        async def _acquire(pool_self: Any, timeout: Any) -> Any:
            frames = capture_frames()
            proxy = await original_acquire(pool_self, timeout)
            info = next((p for p in ledger.pools if p.ref is pool_self), None)
            ledger._raw("asyncpg pool connection", proxy, _asyncpg_proxy_open, frames, info)
            return proxy

        async def release(pool_self: Any, connection: Any, *, timeout: Any = None) -> Any:
            recorded = ledger._released(connection)
            result = await original_release(pool_self, connection, timeout=timeout)
            if recorded:
                ledger._returned()
            return result

        self._patch(pool_cls, "_acquire", _acquire)
        self._patch(pool_cls, "release", release)

    def _install_psycopg(self) -> None:
        if not self._importable("psycopg"):
            return
        self._installed.add("psycopg")
        import psycopg

        ledger = self
        sync_connect = psycopg.Connection.__dict__["connect"].__func__

        def connect(cls: Any, *args: Any, **kwargs: Any) -> Any:
            internal = _caller_module(1).startswith(_POOL_INTERNAL)
            frames = None if internal else capture_frames()
            connection = sync_connect(cls, *args, **kwargs)
            ledger._connected("psycopg connection", connection, _psycopg_open, frames)
            return connection

        self._patch(psycopg.Connection, "connect", classmethod(connect))
        if psycopg.__dict__.get("connect") is not None:
            self._patch(psycopg, "connect", psycopg.Connection.connect)

        async_connect = psycopg.AsyncConnection.__dict__["connect"].__func__

        async def aconnect(cls: Any, *args: Any, **kwargs: Any) -> Any:
            internal = _caller_module(1).startswith(_POOL_INTERNAL)
            frames = None if internal else capture_frames()
            pending = async_connect(cls, *args, **kwargs)
            kind = "psycopg async connection"
            return await ledger._await_connect(pending, kind, _psycopg_open, frames)

        self._patch(psycopg.AsyncConnection, "connect", classmethod(aconnect))

    def _install_psycopg_pool(self) -> None:
        if not self._importable("psycopg_pool"):
            return
        self._installed.add("psycopg_pool")
        import psycopg_pool

        ledger = self
        for cls, kind in (
            (psycopg_pool.ConnectionPool, "psycopg pool connection"),
            (psycopg_pool.AsyncConnectionPool, "psycopg async pool connection"),
        ):
            original_init = cls.__dict__["__init__"]
            is_async = cls is psycopg_pool.AsyncConnectionPool

            def init(pool_self: Any, *args: Any, _orig: Any = original_init, **kwargs: Any) -> None:
                _orig(pool_self, *args, **kwargs)
                ledger.pools.append(
                    PoolInfo(
                        "psycopg pool",
                        ledger.owner(),
                        capture_frames(),
                        weakref.ref(pool_self),
                        capacity=getattr(pool_self, "max_size", None),
                        is_closed=lambda p: p.closed,
                    )
                )

            self._patch(cls, "__init__", init)
            original_get = cls.__dict__["getconn"]
            original_put = cls.__dict__["putconn"]

            if is_async:

                async def getconn(
                    pool_self: Any,
                    timeout: Any = None,
                    *,
                    _orig: Any = original_get,
                    _kind: str = kind,
                ) -> Any:
                    frames = capture_frames()
                    connection = await _orig(pool_self, timeout=timeout)
                    ledger._raw(
                        _kind, connection, _psycopg_open, frames, ledger._pool_info(pool_self)
                    )
                    return connection

                async def putconn(
                    pool_self: Any, connection: Any, *, _orig: Any = original_put
                ) -> None:
                    recorded = ledger._released(connection)
                    await _orig(pool_self, connection)
                    if recorded:
                        ledger._returned()
            else:

                def getconn(
                    pool_self: Any,
                    timeout: Any = None,
                    *,
                    _orig: Any = original_get,
                    _kind: str = kind,
                ) -> Any:
                    frames = capture_frames()
                    connection = _orig(pool_self, timeout=timeout)
                    ledger._raw(
                        _kind, connection, _psycopg_open, frames, ledger._pool_info(pool_self)
                    )
                    return connection

                def putconn(pool_self: Any, connection: Any, *, _orig: Any = original_put) -> None:
                    recorded = ledger._released(connection)
                    _orig(pool_self, connection)
                    if recorded:
                        ledger._returned()

            self._patch(cls, "getconn", getconn)
            self._patch(cls, "putconn", putconn)

    def _pool_info(self, pool: Any) -> PoolInfo | None:
        for info in self.pools:
            if info.target() is pool:
                return info
        return None

    # -- queries used by the detector

    def records(self) -> Iterator[Record]:
        return iter(list(self.open.values()))

    def open_records(self, belongs: Callable[[Owner | None], bool]) -> list[Record]:
        """Open records of matching owners; raw connections found closed are dropped."""
        found = []
        for key, record in list(self.open.items()):
            if not belongs(record.owner):
                continue
            if record.is_open():
                found.append(record)
            else:
                self.open.pop(key, None)
        return found

    def take_reclaimed(self, belongs: Callable[[Owner | None], bool]) -> list[Record]:
        taken = [r for r in self.reclaimed if belongs(r.owner)]
        if taken:
            self.reclaimed = [r for r in self.reclaimed if not belongs(r.owner)]
        return taken

    def forget(self, records: list[Record]) -> None:
        """Stop tracking reported records (and drop strong references to their connections)."""
        for record in records:
            for key, value in list(self.open.items()):
                if value is record:
                    del self.open[key]
            record.ref = None

    def explains(self, pid: int) -> str | None:
        """Why a backend pid exists, as far as the client side knows: None if unknown."""
        physical = self.physical.get(pid)
        for record in list(self.open.values()):  # (a thread may be adding one)
            if record.pid == pid:
                return "held"
        if physical is None:
            return None
        if physical.closed:
            return "closed"
        return "pooled"

    def holds_any(self) -> bool:
        """Whether any connection is checked out or open, whoever owns it."""
        return bool(self.open_records(lambda owner: True))

    def idle_in_pools(self, pids: Iterable[int]) -> bool:
        """Whether every one of these backends rests in a pool, outside any transaction.

        Each must be known to the ledger, not closed and not held by an open record (as
        explains() would say "pooled"). asyncpg and psycopg_pool roll back whatever a
        returned connection left open; for a SQLAlchemy pool the driver was asked at check-in.
        """
        held = {record.pid for record in self.open.values()} if self.open else ()
        physical = self.physical
        for pid in pids:
            known = physical.get(pid)
            if known is None or known.closed or known.in_transaction or pid in held:
                return False
        return True

    def scan_pools(self) -> None:
        """Learn the pids of idle connections inside asyncpg and psycopg_pool pools."""
        for info in self.pools:
            pool = info.target()
            if pool is None:
                continue
            if info.is_closed is None:  # SQLAlchemy pools report through events
                continue
            connections: list[Any] = []
            holders = getattr(pool, "_holders", None)
            if holders is not None:  # asyncpg
                connections = [h._con for h in holders if getattr(h, "_con", None) is not None]
            else:
                queue = getattr(pool, "_pool", None)  # psycopg_pool's idle deque
                if queue is not None:
                    connections = list(queue)
            for connection in connections:
                pid = _backend_pid(connection)
                if pid is not None and pid not in self.physical:
                    self.physical[pid] = Physical(pid, pool=info)


def _sa_capacity(pool: Any) -> int | None:
    """pool_size + max_overflow of a QueuePool; None when unbounded or not a QueuePool."""
    overflow = getattr(pool, "_max_overflow", None)
    size = getattr(pool, "size", None)
    if overflow is None or overflow < 0 or not callable(size):
        return None
    try:
        return int(size()) + int(overflow)
    except Exception:
        return None


def _asyncpg_open(connection: Any) -> bool:
    return not connection.is_closed()


def _asyncpg_proxy_open(proxy: Any) -> bool:
    con = getattr(proxy, "_con", None)
    return con is not None and not con.is_closed()


def _psycopg_open(connection: Any) -> bool:
    return not connection.closed


__all__ = [
    "CURRENT_OWNER",
    "Ledger",
    "Owner",
    "PoolInfo",
    "Record",
    "capture_frames",
    "is_library_file",
    "user_frames",
]
