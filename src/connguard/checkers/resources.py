"""The known resource factories, as data: what each call creates and how that thing is released."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType


@dataclass(frozen=True)
class ResourceSpec:
    """What calling a factory yields.

    A spec with ``managed=False`` is not a resource itself (a session maker, a sync engine) but a
    *source*: calling it (``call``) or one of its ``methods`` yields a resource.
    """

    name: str  # as shown in messages: "AsyncSession", "asyncpg connection"
    kind: str  # session | connection | pool | engine | maker
    is_async: bool
    managed: bool = True  # must be released by its creator (False for makers and sync engines)
    release_async: tuple[str, ...] = ()  # coroutine methods that release it: must be awaited
    release_sync: tuple[str, ...] = ()  # plain methods that release it
    release_on_source: tuple[
        str, ...
    ] = ()  # pool.release(conn): methods of the object it came from
    async_cm: bool = False  # `async with F() as x:` releases it
    sync_cm: bool = False  # `with F() as x:` releases it
    awaited: bool = False  # the creating call is awaited: `x = await F()`
    call: ResourceSpec | None = None  # calling the object yields this (makers)
    methods: tuple[tuple[str, ResourceSpec], ...] = ()  # source.method() yields a resource
    cm_methods: tuple[str, ...] = ()  # `async with source.method() as x:` yields a managed resource
    class_kwarg: str = ""  # sessionmaker(class_=AsyncSession): the keyword that swaps the product
    mistaken_release: tuple[str, ...] = ()  # methods people take for a release (begin, commit)
    scoped: bool = False  # a scoped-session registry product: cleanup is registry.remove()
    var: str = "session"  # the variable name used in the suggested fix
    safe_form: str = 'use "async with {call} as {var}:"'  # the advice in messages

    @property
    def release_methods(self) -> tuple[str, ...]:
        return self.release_async + self.release_sync

    def product(self, method: str) -> ResourceSpec | None:
        for name, spec in self.methods:
            if name == method:
                return spec
        return None

    def suggestion(self, call: str, var: str = "") -> str:
        return self.safe_form.format(call=call, var=var or self.var)


# ---------------------------------------------------------------- SQLAlchemy asyncio
ASYNC_SESSION = ResourceSpec(
    "AsyncSession",
    "session",
    True,
    release_async=("close", "aclose", "invalidate"),
    async_cm=True,
    mistaken_release=("begin", "commit", "rollback"),
)
ASYNC_SCOPED_SESSION = replace(ASYNC_SESSION, release_on_source=("remove",), scoped=True)
ASYNC_CONNECTION = ResourceSpec(
    "AsyncConnection",
    "connection",
    True,
    release_async=("close", "invalidate"),
    async_cm=True,
    awaited=True,
    mistaken_release=("begin", "commit", "rollback"),
    var="conn",
)
ASYNC_SESSIONMAKER = ResourceSpec(
    "async_sessionmaker",
    "maker",
    True,
    managed=False,
    call=ASYNC_SESSION,
    cm_methods=("begin",),
)
ASYNC_SCOPED_REGISTRY = ResourceSpec(
    "async_scoped_session",
    "maker",
    True,
    managed=False,
    call=ASYNC_SCOPED_SESSION,
)
ASYNC_ENGINE = ResourceSpec(
    "AsyncEngine",
    "engine",
    True,
    release_async=("dispose",),
    methods=(("connect", ASYNC_CONNECTION),),
    cm_methods=("begin", "connect"),
    var="engine",
    safe_form=(
        'dispose it in a finally block ("await {var}.dispose()") or create it once at module level'
    ),
)

# ---------------------------------------------------------------- SQLAlchemy sync
SESSION = ResourceSpec(
    "Session",
    "session",
    False,
    release_sync=("close", "invalidate"),
    sync_cm=True,
    mistaken_release=("begin", "commit", "rollback"),
    safe_form='use "with {call} as {var}:"',
)
SCOPED_SESSION = replace(SESSION, release_on_source=("remove",), scoped=True)
CONNECTION = ResourceSpec(
    "Connection",
    "connection",
    False,
    release_sync=("close", "invalidate"),
    sync_cm=True,
    mistaken_release=("begin", "commit", "rollback"),
    var="conn",
    safe_form='use "with {call} as {var}:"',
)
SESSIONMAKER = ResourceSpec(
    "sessionmaker",
    "maker",
    False,
    managed=False,
    call=SESSION,
    cm_methods=("begin",),
    class_kwarg="class_",
)
SCOPED_REGISTRY = ResourceSpec("scoped_session", "maker", False, managed=False, call=SCOPED_SESSION)
# A sync engine is a source, not a resource we require disposing: its pooled connections are
# returned when the process ends and scripts rarely dispose it; async engines are different.
RAW_CONNECTION = ResourceSpec(
    "DBAPI connection",
    "connection",
    False,
    release_sync=("close", "invalidate", "detach"),
    var="conn",
    safe_form='close it in a finally block: "{var}.close()"',
)
ENGINE = ResourceSpec(
    "Engine",
    "engine",
    False,
    managed=False,
    methods=(("connect", CONNECTION), ("raw_connection", RAW_CONNECTION)),
    cm_methods=("begin", "connect"),
    var="engine",
)

# ---------------------------------------------------------------- asyncpg
ASYNCPG_CONNECTION = ResourceSpec(
    "asyncpg connection",
    "connection",
    True,
    release_async=("close",),
    release_sync=("terminate",),
    awaited=True,
    var="conn",
    safe_form='close it in a finally block: "await {var}.close()"',
)
ASYNCPG_POOLED = ResourceSpec(
    "asyncpg pooled connection",
    "connection",
    True,
    release_on_source=("release",),
    release_async=("close",),
    release_sync=("terminate",),
    async_cm=True,
    awaited=True,
    var="conn",
)
ASYNCPG_POOL = ResourceSpec(
    "asyncpg pool",
    "pool",
    True,
    release_async=("close",),
    release_sync=("terminate",),
    async_cm=True,
    awaited=True,
    methods=(("acquire", ASYNCPG_POOLED),),
    cm_methods=("acquire",),
    var="pool",
)

# ---------------------------------------------------------------- psycopg 3 and psycopg_pool
PSYCOPG_ASYNC_CONNECTION = ResourceSpec(
    "psycopg AsyncConnection",
    "connection",
    True,
    release_async=("close",),
    async_cm=True,
    awaited=True,
    mistaken_release=("commit", "rollback"),
    var="conn",
    safe_form='use "async with await {call} as {var}:"',
)
PSYCOPG_CONNECTION = ResourceSpec(
    "psycopg Connection",
    "connection",
    False,
    release_sync=("close",),
    sync_cm=True,
    mistaken_release=("commit", "rollback"),
    var="conn",
    safe_form='use "with {call} as {var}:"',
)
PSYCOPG_POOLED_ASYNC = ResourceSpec(
    "psycopg pooled connection",
    "connection",
    True,
    release_on_source=("putconn",),
    awaited=True,
    var="conn",
    safe_form='use "async with pool.connection() as conn:"',
)
PSYCOPG_POOLED = ResourceSpec(
    "psycopg pooled connection",
    "connection",
    False,
    release_on_source=("putconn",),
    var="conn",
    safe_form='use "with pool.connection() as conn:"',
)
PSYCOPG_ASYNC_POOL = ResourceSpec(
    "AsyncConnectionPool",
    "pool",
    True,
    release_async=("close",),
    async_cm=True,
    methods=(("getconn", PSYCOPG_POOLED_ASYNC),),
    cm_methods=("connection",),
    var="pool",
)
PSYCOPG_POOL = ResourceSpec(
    "ConnectionPool",
    "pool",
    False,
    release_sync=("close",),
    sync_cm=True,
    methods=(("getconn", PSYCOPG_POOLED),),
    cm_methods=("connection",),
    var="pool",
    safe_form='use "with {call} as {var}:"',
)

# ---------------------------------------------------------------- aiosqlite, aiomysql, aiopg
AIOSQLITE_CONNECTION = ResourceSpec(
    "aiosqlite connection",
    "connection",
    True,
    release_async=("close", "stop"),
    async_cm=True,
    awaited=True,
    mistaken_release=("commit",),
    var="db",
)
AIOMYSQL_CONNECTION = ResourceSpec(
    "aiomysql connection",
    "connection",
    True,
    release_async=("ensure_closed",),
    release_sync=("close",),
    async_cm=True,
    awaited=True,
    mistaken_release=("commit",),
    var="conn",
)
AIOMYSQL_POOLED = ResourceSpec(
    "aiomysql pooled connection",
    "connection",
    True,
    release_on_source=("release",),
    async_cm=True,
    awaited=True,
    var="conn",
)
AIOMYSQL_POOL = ResourceSpec(
    "aiomysql pool",
    "pool",
    True,
    release_sync=("close", "terminate"),
    async_cm=True,
    awaited=True,
    methods=(("acquire", AIOMYSQL_POOLED),),
    cm_methods=("acquire",),
    var="pool",
)
# aiopg's close() returns an awaitable but also closes when not awaited: accept both.
AIOPG_CONNECTION = replace(
    AIOMYSQL_CONNECTION, name="aiopg connection", release_async=(), release_sync=("close",)
)
# asyncmy mirrors aiomysql's API (sync close(), async ensure_closed(), pool.release(conn)).
ASYNCMY_CONNECTION = replace(AIOMYSQL_CONNECTION, name="asyncmy connection")
ASYNCMY_POOLED = replace(AIOMYSQL_POOLED, name="asyncmy pooled connection")
ASYNCMY_POOL = replace(AIOMYSQL_POOL, name="asyncmy pool", methods=(("acquire", ASYNCMY_POOLED),))
AIOPG_POOLED = replace(AIOMYSQL_POOLED, name="aiopg pooled connection")
AIOPG_POOL = replace(AIOMYSQL_POOL, name="aiopg pool", methods=(("acquire", AIOPG_POOLED),))

# `conn = await self.bot.pool.acquire()` on a pool whose type we cannot see (made in another
# project's module, a framework attribute, a fixture): the receiver's name is the evidence.
# aiopg/aiomysql release synchronously, asyncpg by awaiting: accept either form.
POOLED_BY_NAME = replace(
    AIOMYSQL_POOLED, name="pooled connection", release_sync=("close", "terminate")
)
# (receiver name suffix, method, what the awaited call yields): `await async_engine.connect()` on
# an unannotated fixture parameter is an AsyncConnection whatever the engine's origin.
# Only the awaited call is taken: a plain `with engine.connect()` is a sync engine's, not a trap.
NAMED_SOURCES: tuple[tuple[str, str, ResourceSpec], ...] = (
    ("pool", "acquire", replace(POOLED_BY_NAME, sync_cm=True)),
    ("engine", "connect", replace(ASYNC_CONNECTION, sync_cm=True)),
)

_ASYNC_ENGINE_FACTORIES = ("create_async_engine", "async_engine_from_config")

DEFAULT_FACTORIES: Mapping[str, ResourceSpec] = MappingProxyType(
    {
        # SQLAlchemy asyncio (public names and where they are defined)
        "sqlalchemy.ext.asyncio.AsyncSession": ASYNC_SESSION,
        "sqlalchemy.ext.asyncio.session.AsyncSession": ASYNC_SESSION,
        "sqlalchemy.ext.asyncio.async_sessionmaker": ASYNC_SESSIONMAKER,
        "sqlalchemy.ext.asyncio.session.async_sessionmaker": ASYNC_SESSIONMAKER,
        "sqlalchemy.ext.asyncio.async_scoped_session": ASYNC_SCOPED_REGISTRY,
        "sqlalchemy.ext.asyncio.scoping.async_scoped_session": ASYNC_SCOPED_REGISTRY,
        **{f"sqlalchemy.ext.asyncio.{n}": ASYNC_ENGINE for n in _ASYNC_ENGINE_FACTORIES},
        **{f"sqlalchemy.ext.asyncio.engine.{n}": ASYNC_ENGINE for n in _ASYNC_ENGINE_FACTORIES},
        # SQLAlchemy sync
        "sqlalchemy.orm.Session": SESSION,
        "sqlalchemy.orm.session.Session": SESSION,
        "sqlalchemy.orm.sessionmaker": SESSIONMAKER,
        "sqlalchemy.orm.session.sessionmaker": SESSIONMAKER,
        "sqlalchemy.orm.scoped_session": SCOPED_REGISTRY,
        "sqlalchemy.orm.scoping.scoped_session": SCOPED_REGISTRY,
        "sqlalchemy.create_engine": ENGINE,
        "sqlalchemy.engine.create_engine": ENGINE,
        "sqlalchemy.engine.create.create_engine": ENGINE,
        "sqlalchemy.engine_from_config": ENGINE,
        "sqlalchemy.engine.engine_from_config": ENGINE,
        # SQLModel re-exports SQLAlchemy's sessions and engines under its own names
        "sqlmodel.Session": SESSION,
        "sqlmodel.orm.session.Session": SESSION,
        "sqlmodel.create_engine": ENGINE,
        "sqlmodel.ext.asyncio.session.AsyncSession": ASYNC_SESSION,
        # asyncpg
        "asyncpg.connect": ASYNCPG_CONNECTION,
        "asyncpg.connection.connect": ASYNCPG_CONNECTION,
        "asyncpg.create_pool": ASYNCPG_POOL,
        "asyncpg.pool.create_pool": ASYNCPG_POOL,
        # psycopg 3
        "psycopg.AsyncConnection.connect": PSYCOPG_ASYNC_CONNECTION,
        "psycopg.connection_async.AsyncConnection.connect": PSYCOPG_ASYNC_CONNECTION,
        "psycopg.connect": PSYCOPG_CONNECTION,
        "psycopg.Connection.connect": PSYCOPG_CONNECTION,
        "psycopg.connection.Connection.connect": PSYCOPG_CONNECTION,
        "psycopg_pool.AsyncConnectionPool": PSYCOPG_ASYNC_POOL,
        "psycopg_pool.pool_async.AsyncConnectionPool": PSYCOPG_ASYNC_POOL,
        "psycopg_pool.ConnectionPool": PSYCOPG_POOL,
        "psycopg_pool.pool.ConnectionPool": PSYCOPG_POOL,
        # aiosqlite, aiomysql, aiopg
        "aiosqlite.connect": AIOSQLITE_CONNECTION,
        "aiosqlite.core.connect": AIOSQLITE_CONNECTION,
        "aiomysql.connect": AIOMYSQL_CONNECTION,
        "aiomysql.connection.connect": AIOMYSQL_CONNECTION,
        "aiomysql.create_pool": AIOMYSQL_POOL,
        "aiomysql.pool.create_pool": AIOMYSQL_POOL,
        "asyncmy.connect": ASYNCMY_CONNECTION,
        "asyncmy.connection.connect": ASYNCMY_CONNECTION,
        "asyncmy.create_pool": ASYNCMY_POOL,
        "asyncmy.pool.create_pool": ASYNCMY_POOL,
        "aiopg.connect": AIOPG_CONNECTION,
        "aiopg.connection.connect": AIOPG_CONNECTION,
        "aiopg.create_pool": AIOPG_POOL,
        "aiopg.pool.create_pool": AIOPG_POOL,
    }
)

# Annotations that tell us a parameter is a source: `async def f(pool: asyncpg.Pool)` then
# `await pool.acquire()` creates a connection the function must release. The parameter itself
# belongs to the caller, so these specs are used as sources only.
DEFAULT_TYPES: Mapping[str, ResourceSpec] = MappingProxyType(
    {
        "asyncpg.Pool": ASYNCPG_POOL,
        "asyncpg.pool.Pool": ASYNCPG_POOL,
        # only the public spelling: SQLAlchemy's own modules import Engine relatively everywhere,
        # and the prefilter must keep skipping them
        "sqlalchemy.Engine": ENGINE,
        "sqlalchemy.ext.asyncio.AsyncEngine": ASYNC_ENGINE,
        "sqlalchemy.ext.asyncio.engine.AsyncEngine": ASYNC_ENGINE,
        "sqlalchemy.ext.asyncio.async_sessionmaker": ASYNC_SESSIONMAKER,
        "sqlalchemy.ext.asyncio.session.async_sessionmaker": ASYNC_SESSIONMAKER,
        "sqlalchemy.orm.sessionmaker": SESSIONMAKER,
        "psycopg_pool.AsyncConnectionPool": PSYCOPG_ASYNC_POOL,
        "psycopg_pool.ConnectionPool": PSYCOPG_POOL,
        "aiomysql.Pool": AIOMYSQL_POOL,
        "aiopg.Pool": AIOPG_POOL,
        "asyncmy.Pool": ASYNCMY_POOL,
        "asyncmy.pool.Pool": ASYNCMY_POOL,
    }
)

# The kinds a user may name in [tool.connguard] extra-factories.
EXTRA_KINDS: Mapping[str, ResourceSpec] = MappingProxyType(
    {
        "session": replace(ASYNC_SESSION, name="session"),
        "async-session": replace(ASYNC_SESSION, name="session"),
        "sync-session": replace(SESSION, name="session"),
        "connection": replace(
            ASYNC_CONNECTION, name="connection", awaited=False, release_sync=("terminate",)
        ),
        "async-connection": replace(ASYNC_CONNECTION, name="connection", awaited=False),
        "sync-connection": replace(CONNECTION, name="connection"),
        "pool": replace(ASYNCPG_POOL, name="pool", awaited=False, methods=()),
        "sync-pool": replace(PSYCOPG_POOL, name="pool", methods=()),
        "engine": replace(ASYNC_ENGINE, name="engine"),
        "sessionmaker": ASYNC_SESSIONMAKER,
        "async-sessionmaker": ASYNC_SESSIONMAKER,
        "sync-sessionmaker": replace(SESSIONMAKER, class_kwarg=""),
    }
)


@dataclass(frozen=True)
class FactoryTable:
    """Qualified callable name -> the spec of what calling it yields, plus annotation types."""

    factories: Mapping[str, ResourceSpec]
    types: Mapping[str, ResourceSpec] = field(default_factory=dict)
    needles: tuple[str, ...] = ()

    def lookup(self, qualified: str) -> ResourceSpec | None:
        return self.factories.get(qualified)

    def lookup_type(self, qualified: str) -> ResourceSpec | None:
        return self.types.get(qualified)

    @property
    def roots(self) -> frozenset[str]:
        """Top-level modules that appear in the table (imports of anything else are irrelevant)."""
        return frozenset(q.split(".", 1)[0] for q in (*self.factories, *self.types))


# Last name components too common to use alone as a prefilter needle: a file using
# `asyncpg.connect` always spells "asyncpg" (the only exception, relative imports inside the
# driver's own package, is not code we aim at).
_GENERIC_LAST = frozenset({"connect", "Pool"})


def _needles(names: Iterable[str]) -> tuple[str, ...]:
    out: set[str] = set()
    for qualified in names:
        parts = qualified.split(".")
        last = parts[-1]
        out.add(parts[0] if last in _GENERIC_LAST and len(parts) > 1 else last)
    # Drop needles that contain another needle: the shorter one already matches.
    ordered = sorted(out, key=len)
    kept: list[str] = []
    for needle in ordered:
        if not any(k in needle for k in kept):
            kept.append(needle)
    return tuple(kept)


def _make(factories: Mapping[str, ResourceSpec], types: Mapping[str, ResourceSpec]) -> FactoryTable:
    return FactoryTable(
        MappingProxyType(dict(factories)),
        MappingProxyType(dict(types)),
        _needles([*factories, *types]),
    )


DEFAULT_TABLE = _make(DEFAULT_FACTORIES, DEFAULT_TYPES)


class TableError(ValueError):
    """An extra factory in the configuration names an unknown kind."""


def build_table(extra: Mapping[str, str] | None = None) -> FactoryTable:
    """The default table plus ``[tool.connguard] extra-factories`` ({qualified name: kind}).

    A kind is one of EXTRA_KINDS or the qualified name of a table entry to copy
    (``"myapp.db.Session" = "sqlalchemy.ext.asyncio.AsyncSession"``).
    """
    if not extra:
        return DEFAULT_TABLE
    factories = dict(DEFAULT_FACTORIES)
    for qualified, kind in extra.items():
        if not isinstance(qualified, str) or not qualified or not isinstance(kind, str):
            raise TableError(f"extra-factories: {qualified!r} = {kind!r} is not a name = kind pair")
        spec = EXTRA_KINDS.get(kind) or DEFAULT_FACTORIES.get(kind)
        if spec is None:
            known = ", ".join(sorted(EXTRA_KINDS))
            raise TableError(
                f"extra-factories: {qualified!r} has unknown kind {kind!r} (known: {known})"
            )
        factories[qualified] = spec
    return _make(factories, DEFAULT_TYPES)


def may_hold_resource(text: str, table: FactoryTable = DEFAULT_TABLE) -> bool:
    """Cheap text test: False means the file names nothing in the table, so it cannot hold a
    finding by itself (project-local makers imported from elsewhere are the engine's check)."""
    for needle in table.needles:
        if needle in text:
            return True
    return False
