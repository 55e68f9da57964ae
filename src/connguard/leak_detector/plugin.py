"""pytest hooks of `--leak-check`: provision PostgreSQL, give each worker a database, clean up.

Silent until asked: without --leak-check this module registers options and markers and nothing
else (no driver import, no server). With it:

1. pytest_load_initial_conftests (tryfirst, before any conftest.py is imported; pytest_configure
   when that hook did not run): the process that owns the run (plain pytest, or the xdist
   controller) chooses a backend and starts a server; xdist workers receive it through the
   environment they inherit (and `workerinput["connguard"]`). Every process that runs tests
   creates its own database and, if `leak_check_url_env` names a variable, sets it to that
   database's URL, so an app imported by a conftest.py already sees it.
2. It registers `connguard.leak_detector.detect.LeakDetector(config, database, server)` as plugin
   "connguard-leak-detector". On the xdist controller, which runs no tests, `database` is
   None.
3. pytest_unconfigure (trylast), after the detector has counted: drop the databases, stop the
   server, remove the temporary directory or container.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
from pathlib import Path

import pytest

from . import settings

RUN_KEY = pytest.StashKey["LeakCheckRun"]()
WORKERINPUT_KEY = "connguard"
SHARED_ENV = "CONNGUARD_LEAK_CHECK_SHARED"  # controller -> xdist workers, before their conftests
BACKEND_ORDER = ("url", "container", "local")


def pytest_addoption(parser: pytest.Parser) -> None:
    settings.add_options(parser)


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    # Before the first conftest.py is imported: an app imported there reads its URL already.
    _begin(early_config)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "leak_check(mode=..., pool_threshold=..., fail_on=...): "
        "override connguard leak-check settings for one test",
    )
    config.addinivalue_line(
        "markers",
        "allow_connection_leak(reason): this test leaves a connection open on purpose",
    )
    run = _begin(config)
    if run is not None:
        _register_detector(config, run.database, run.server)


def _begin(config: pytest.Config) -> LeakCheckRun | None:
    """Start this process's share of the run once; None when --leak-check is off."""
    if RUN_KEY in config.stash:
        return config.stash[RUN_KEY]
    option = getattr(config, "known_args_namespace", None) or config.option
    if getattr(option, "help", False) or getattr(option, "version", False):
        return None
    if not settings.resolve(config, "leak_check"):
        return None
    settings.validate_all(config)
    run = LeakCheckRun(config)
    config.stash[RUN_KEY] = run
    config.pluginmanager.register(run, "connguard-provision")
    run.start()
    return run


def _register_detector(config: pytest.Config, database, server) -> None:
    # The detector also checks the tests' markers (settings.check_marker) at collection.
    from .detect import LeakDetector

    config.pluginmanager.register(LeakDetector(config, database, server), "connguard-leak-detector")


def _proof_of(config: pytest.Config) -> str:
    """What lets tests skip the server round trip, for the header ("" on the xdist controller,
    whose workers each have their own)."""
    detector = config.pluginmanager.get_plugin("connguard-leak-detector")
    observer = getattr(detector, "observer", None)
    if observer is None:
        return ""
    if observer.proof is None:
        return "server asked after every test, "
    return f"server proof: {observer.proof.kind}, "


def _run_of(config: pytest.Config) -> LeakCheckRun | None:
    return config.stash.get(RUN_KEY, None)


@pytest.fixture(scope="session")
def connguard_server(request: pytest.FixtureRequest):
    """The provisioned server: `.url` (admin URL), `.version`, `.backend`."""
    run = _run_of(request.config)
    if run is None or run.server is None:
        pytest.fail("connguard_server needs --leak-check (or CONNGUARD_LEAK_CHECK=1)", False)
    return run.server


def _database_scope(fixture_name: str, config: pytest.Config) -> str:
    # Session scope lets a session-scoped engine fixture build on it; a fresh database per
    # test can only be handed out per test.
    run = _run_of(config)
    return "function" if run is not None and run.per_test else "session"


@pytest.fixture(scope=_database_scope)
def connguard_database(request: pytest.FixtureRequest):
    """The run's (or xdist worker's) database, session-scoped; with --leak-check-db-per-test,
    a fresh clone per test. `.url` (libpq), `.sqlalchemy_url("asyncpg" | "psycopg")`."""
    run = _run_of(request.config)
    if run is None or run.database is None:
        pytest.fail("connguard_database needs --leak-check (or CONNGUARD_LEAK_CHECK=1)", False)
    if run.per_test:
        return run.database_for_test(request.node)
    return run.database


class LeakCheckRun:
    """One process's share of a --leak-check run: its server (if it owns one) and database."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.shared = _shared_run(config)
        self.worker_id = os.environ.get("PYTEST_XDIST_WORKER", "gw") if self.shared else "main"
        planned = 0 if self.shared else _planned_workers(config)
        self.is_controller = planned > 0
        self.workers = max(1, planned)
        self.per_test = settings.resolve(config, "leak_check_db_per_test")
        self.url_env = settings.resolve(config, "leak_check_url_env")
        self.provider = None
        self.server = None
        self.database = None
        self.tag: str | None = None
        self._template: str | None = None
        self._test_dbs: dict[str, list[str]] = {}
        self._test_counter = 0
        self._records: list[Path] = []
        self._saved_env: tuple[str, str | None] | None = None
        self._saved_sigterm = None
        self._saved_shared: str | None = None
        self._done = False

    # -- start

    def start(self) -> None:
        from .provision import ProvisionError, Server, run_tag

        _require_psycopg()
        atexit.register(self.finish)
        self._convert_sigterm()
        if self.shared:
            self.server = Server.from_dict(self.shared["server"])
            self.tag = self.shared["tag"]
        else:
            self.tag = run_tag()
            self.server = self._provision()
        if self.is_controller:
            # xdist workers are our children and inherit this before they read any conftest.
            self._saved_shared = os.environ.get(SHARED_ENV)
            os.environ[SHARED_ENV] = json.dumps(self._shared_info())
        if not self.is_controller:
            try:
                self.database = self._create_database()
            except ProvisionError as error:
                raise pytest.UsageError(
                    f"connguard: the {self.server.backend} backend failed: {error}"
                ) from None
        if self.url_env:
            # The xdist controller runs no test but still imports conftest files, and apps read
            # their URL at import: give it the server's maintenance database so imports work.
            self._saved_env = (self.url_env, os.environ.get(self.url_env))
            os.environ[self.url_env] = (
                self.server.url if self.database is None else self.database.plain_url
            )

    def _provision(self):
        from .provision import ProvisionError, janitor

        janitor.reap_stale()
        choice = settings.resolve(self.config, "leak_check_db")
        if choice == "auto" and settings.resolve(self.config, "leak_check_db_url"):
            # A URL the user gave is the server they mean: falling back to a local cluster
            # would turn a wrong password or host into a green run against something else.
            choice = "url"
        names = BACKEND_ORDER if choice == "auto" else (choice,)
        failures: list[str] = []
        for name in names:
            provider = self._make_provider(name)
            try:
                reason = provider.unavailable_reason()
                if reason is None:
                    self.provider = provider
                    server = provider.start()
                    janitor.reap_stale(admin_url=server.url)
                    return server
            except ProvisionError as error:
                reason = str(error)
                provider.stop()
                self.provider = None
            failures.append(f"{name}: {reason}")
        if len(names) == 1:
            raise pytest.UsageError(
                f"connguard: the {names[0]} backend failed: " + failures[0].split(": ", 1)[1]
            )
        raise pytest.UsageError(
            "connguard: no PostgreSQL server for --leak-check; tried\n  " + "\n  ".join(failures)
        )

    def _make_provider(self, name: str):
        max_connections = min(1000, max(100, 50 * self.workers + 20))
        if name == "url":
            from .provision.external import ExternalProvider

            return ExternalProvider(settings.resolve(self.config, "leak_check_db_url"))
        if name == "container":
            from .provision.container import ContainerProvider

            return ContainerProvider(
                image=settings.resolve(self.config, "leak_check_image"),
                network=settings.resolve(self.config, "leak_check_network"),
                max_connections=max_connections,
                # auto must stay quick and offline: a pull can take minutes.
                allow_pull=settings.resolve(self.config, "leak_check_db") == "container",
            )
        from .provision.local import LocalProvider

        bindir = settings.resolve(self.config, "leak_check_pg_bindir")
        return LocalProvider(
            max_connections=max_connections, bindir=Path(bindir) if bindir else None
        )

    def _create_database(self):
        from .provision import Database, janitor, with_database, with_query

        worker = self.worker_id.replace("-", "_")
        dbname = f"connguard_{self.tag}_{worker}".lower()
        application_name = f"connguard-{self.tag}-{worker}"
        self._remember_database(dbname)
        janitor.create_database(self.server.url, dbname)
        if self.per_test:
            self._template = dbname + "_tpl"
            self._remember_database(self._template)
            janitor.create_database(self.server.url, self._template)
        url = with_query(with_database(self.server.url, dbname), application_name=application_name)
        return Database(
            url=url,
            dbname=dbname,
            application_name=application_name,
            admin_url=with_query(self.server.url, application_name=application_name + "-admin"),
            server_version=self.server.version,
            backend=self.server.backend,
        )

    def _remember_database(self, dbname: str) -> None:
        # Only a server that outlives us needs its databases reaped after a kill -9; a local
        # or container server goes away with everything in it.
        from .provision import janitor

        if self.server.backend == "url":
            self._records.append(
                janitor.register(
                    f"db-{dbname}",
                    kind="database",
                    dbname=dbname,
                    server=janitor.server_identity(self.server.url),
                )
            )

    def database_for_test(self, item: pytest.Item):
        """A fresh clone of the (empty) template database, dropped after the test's report."""
        from .provision import janitor

        self._test_counter += 1
        dbname = f"{self.database.dbname}_t{self._test_counter}"
        janitor.create_database(self.server.url, dbname, template=self._template)
        self._test_dbs.setdefault(item.nodeid, []).append(dbname)
        return self.database.derive(dbname)

    # -- hooks

    def _shared_info(self) -> dict:
        return {"server": self.server.to_dict(), "tag": self.tag, "controller_pid": os.getpid()}

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node) -> None:
        node.workerinput[WORKERINPUT_KEY] = self._shared_info()

    def pytest_report_header(self, config: pytest.Config) -> str:
        server = self.server
        mode = settings.resolve(config, "leak_check_mode")
        extra = ""
        if server.backend == "local":
            extra = f" (initdb cache {server.details.get('initdb_cache', '?')})"
        elif server.backend == "container":
            extra = f" ({server.details.get('image', '?')}, {server.details.get('network', '?')})"
        where = self.database.masked_url if self.database else server.masked_url
        return (
            f"connguard: leak check on, backend {server.backend}{extra}, "
            f"PostgreSQL {server.version}, mode {mode}, {_proof_of(config)}{where}"
        )

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_logfinish(self, nodeid: str) -> None:
        # After the test's teardown report: the detector has counted its connections.
        dbnames = self._test_dbs.pop(nodeid, None)
        if dbnames:
            from .provision import janitor

            with contextlib.suppress(Exception):
                janitor.drop_databases(self.server.url, dbnames)

    @pytest.hookimpl(trylast=True)
    def pytest_unconfigure(self, config: pytest.Config) -> None:
        self.finish()

    # -- the janitor

    def finish(self) -> None:
        """Drop our databases and stop our server; idempotent, never raises."""
        if self._done:
            return
        self._done = True
        from .provision import janitor

        if self.server is not None and self.database is not None:
            dbnames = [self.database.dbname]
            dbnames += [name for names in self._test_dbs.values() for name in names]
            if self._template:
                dbnames.append(self._template)
            with contextlib.suppress(Exception):
                janitor.drop_databases(self.server.url, dbnames)
        for record in self._records:
            janitor.unregister(record)
        if self.provider is not None:
            with contextlib.suppress(Exception):
                self.provider.stop()
        if self.is_controller:
            if self._saved_shared is None:
                os.environ.pop(SHARED_ENV, None)
            else:
                os.environ[SHARED_ENV] = self._saved_shared
        if self._saved_env is not None:
            name, value = self._saved_env
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if self._saved_sigterm is not None:
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGTERM, self._saved_sigterm)
        atexit.unregister(self.finish)

    def _convert_sigterm(self) -> None:
        # A CI runner cancels with SIGTERM; as KeyboardInterrupt it unwinds through
        # pytest's own cleanup, and so through ours.
        with contextlib.suppress(ValueError):  # not the main thread
            if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
                self._saved_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)


def _require_psycopg() -> None:
    # Every backend is reached through psycopg, which only the `leak` extra installs; without
    # it the first connect would end the run in a traceback from the janitor.
    from .provision import first_line

    try:
        import psycopg  # noqa: F401
    except ImportError as error:
        raise pytest.UsageError(
            f"connguard: --leak-check needs psycopg 3 ({first_line(error)}); "
            "install it with: pip install 'connguard[leak]'"
        ) from None


def _shared_run(config: pytest.Config) -> dict | None:
    """The server an xdist controller shares with this worker, or None if we are not one."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None and WORKERINPUT_KEY in workerinput:
        return workerinput[WORKERINPUT_KEY]
    if "PYTEST_XDIST_WORKER" not in os.environ or SHARED_ENV not in os.environ:
        return None
    with contextlib.suppress(ValueError, TypeError, KeyError):
        shared = json.loads(os.environ[SHARED_ENV])
        # A pytest started from inside a worker (pytester) inherits both variables; only
        # the controller's direct children are its workers.
        if int(shared["controller_pid"]) == os.getppid():
            return shared
    return None


def _option(config: pytest.Config, name: str):
    value = getattr(config.option, name, None)
    if value is None:
        value = getattr(getattr(config, "known_args_namespace", None), name, None)
    return value


def _planned_workers(config: pytest.Config) -> int:
    """How many xdist workers this run will start (0 without xdist)."""
    if getattr(config, "workerinput", None) is not None or _option(config, "usepdb"):
        return 0
    numprocesses = _option(config, "numprocesses")
    if numprocesses in (None, 0, "0"):
        return 0
    if isinstance(numprocesses, str) and not numprocesses.isdigit():
        return os.cpu_count() or 1  # "auto" / "logical" are resolved later by xdist
    return int(numprocesses)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
