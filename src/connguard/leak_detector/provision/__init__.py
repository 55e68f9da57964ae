"""Database provisioning: the Provider protocol, the Server and Database values, URL helpers.

A provider (external, container, local) brings up a server and returns a `Server`: an admin URL
to its maintenance database. The plugin then creates one `Database` per run and xdist worker on
it. Everything here is plain data and string handling; drivers are imported only by the janitor.
"""

from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass, field, replace
from typing import Protocol, runtime_checkable
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit


class ProvisionError(Exception):
    """A backend cannot provide a server; the message is one line saying why."""


@runtime_checkable
class Provider(Protocol):
    name: str

    def unavailable_reason(self) -> str | None:
        """Cheap check before choosing this backend: None if it can start, else why not."""

    def start(self) -> Server:
        """Bring the server up (raises ProvisionError) and return its admin URL and version."""

    def stop(self) -> None:
        """Tear down everything start() created; safe to call twice or after a failed start."""


@dataclass(frozen=True)
class Server:
    backend: str  # "url" | "container" | "local"
    url: str  # admin libpq URL to the maintenance database, credentials included
    version: str  # e.g. "15.18"
    max_connections: int = 100
    details: dict[str, str] = field(default_factory=dict)  # e.g. data dir, container id, image

    @property
    def masked_url(self) -> str:
        return mask_password(self.url)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Server:
        return cls(**data)

    def __repr__(self) -> str:
        return (
            f"Server(backend={self.backend!r}, url={self.masked_url!r}, version={self.version!r})"
        )


@dataclass(frozen=True)
class Database:
    """The database this run (or xdist worker, or test) works in."""

    url: str  # libpq URL; its query names application_name (works with psycopg and asyncpg)
    dbname: str
    application_name: str  # tags every connection of this run and worker
    admin_url: str  # for the observer/janitor: same server, maintenance database
    server_version: str
    backend: str

    @property
    def plain_url(self) -> str:
        """The URL without query parameters, for code that rewrites URLs naively."""
        return without_query(self.url)

    @property
    def masked_url(self) -> str:
        return mask_password(self.url)

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or 5432

    @property
    def user(self) -> str:
        return unquote(urlsplit(self.url).username or "")

    @property
    def password(self) -> str | None:
        password = urlsplit(self.url).password
        return None if password is None else unquote(password)

    def sqlalchemy_url(self, driver: str = "asyncpg") -> str:
        """`postgresql+<driver>://...` for SQLAlchemy's create_engine / create_async_engine.

        asyncpg's dialect hands query keys to asyncpg.connect() as keyword arguments, and that
        rejects application_name, so that form carries no query; the database name alone
        identifies the run there.
        """
        scheme = f"postgresql+{driver}"
        base = self.plain_url if driver == "asyncpg" else self.url
        return scheme + base[base.index("://") :]

    def __repr__(self) -> str:
        return f"Database(url={self.masked_url!r}, backend={self.backend!r})"

    def derive(self, dbname: str) -> Database:
        return replace(self, dbname=dbname, url=with_database(self.url, dbname))


# -- URL helpers (libpq URLs: postgresql://user:password@host:port/dbname?key=value)


def first_line(error: BaseException) -> str:
    """An error as one line, as every provisioning message is: the first line of its text (a
    server's DETAIL and HINT lines follow it), or its type when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def mask_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo = f"{parts.username or ''}:***"
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{host}"))


def with_database(url: str, dbname: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + quote(dbname)))


def database_of(url: str) -> str:
    return unquote(urlsplit(url).path.lstrip("/")) or "postgres"


def with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.update(params)
    return urlunsplit(parts._replace(query=urlencode(query)))


def without_query(url: str) -> str:
    return urlunsplit(urlsplit(url)._replace(query=""))


def normalize_scheme(url: str) -> str:
    """postgres:// and postgresql+driver:// both become postgresql:// (the libpq form)."""
    scheme, rest = url.split("://", 1)
    return "postgresql://" + rest if scheme.startswith("postgres") else url


def make_url(user: str, password: str | None, host: str, port: int, dbname: str) -> str:
    auth = quote(user, safe="")
    if password is not None:
        auth += ":" + quote(password, safe="")
    return f"postgresql://{auth}@{host}:{port}/{quote(dbname)}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (callers retry on a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_tag(pid: int | None = None) -> str:
    """A short tag unique to this run: pid plus randomness (pids are reused)."""
    return f"{pid or os.getpid()}_{os.urandom(3).hex()}"
