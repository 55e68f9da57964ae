"""The leak detector: pytest hooks that decide, per test and per wider-scoped fixture, what leaked.

Registered by plugin.py only with --leak-check. Per test:

1. setup: the test becomes the fallback owner; each fixture being set up is the owner while it
   runs (and, through a context variable, for the tasks and threads it starts).
2. end of the call phase: a connection still held by a task the test started and that is still
   running is a leak, even if a later teardown cancels that task. The server snapshot is sent
   now and collected at step 3, so its round trip overlaps pytest's own teardown work; but
   while the test or one of its fixtures still holds a connection, it is asked for at step 3,
   after the fixtures let go. It is skipped when the server's connection log (local backend,
   container backend on a Linux engine of this machine) or, for a url server on this machine
   (in a container too), the postmaster's children in the process table prove that no backend
   came or went; or, for a server out of this machine's sight, when this process's own
   descriptors prove that none of its connections did (and the run's last test asks, for
   clients outside this process tree); unless --leak-check-server-proof=off (see
   _server_unchanged, and observer.ConnectionLog, observer.PostmasterChildren and
   observer.OwnDescriptors). Without such a proof, a snapshot held back is sent as soon as the
   last of those connections is back in its pool (SQLAlchemy, asyncpg, psycopg_pool) during
   the teardown.
3. after the test's function-scoped fixtures are finalized, and before any wider-scoped fixture
   is: the test's open records, plus checkouts whose proxy the garbage collector reclaimed, plus
   backends that appeared on the server that the ledger cannot explain, are its leaks.
   Ordering: our check is the first finalizer registered on the item, so pytest runs it last
   among the item's finalizers, i.e. after every function-scoped fixture's teardown (which may
   legitimately close what the test used) and before class/module/session fixtures and the
   provisioner's janitor (which might terminate backends).
4. a wider-scoped fixture is checked when pytest finalizes it, and blamed for what it opened.
"""

from __future__ import annotations

import bisect
import gc
import threading
import time
import weakref
from dataclasses import asdict
from typing import Any

import pytest

from . import settings
from .ledger import CURRENT_OWNER, Ledger, Owner, PoolInfo, Record, user_frames
from .observer import Backend, Observer, ObserverError
from .report import (
    Leak,
    Outcome,
    StaticCheck,
    Warning_,
    fill_backend,
    format_outcome,
    format_summary,
    locate,
    location,
    write_report,
)

ALLOW_MARKER = "allow_connection_leak"
_PROPERTY = "connguard_leak_check"


_UNSEEN = (
    "a backend of this run's database appeared during the test and no wrapped driver call "
    "opened it (an unwrapped driver, a subprocess, or a connect function bound before "
    "--leak-check)"
)
# Found by a later snapshot (see LeakDetector._by_start_time).
_FROM_OUTSIDE = (
    "a backend of this run's database started during the test, opened by no process of this "
    "test run (another host, or a process that left it); the server is out of this machine's "
    "sight, so a later snapshot found it"
)


def _unseen_leak(backend: Backend, owner: str, note: str = _UNSEEN) -> Leak:
    leak = Leak(
        kind="database connection (not seen by the client ledger)",
        owner=owner,
        note=note,
    )
    fill_backend(leak, backend)
    return leak


def _surfaced(leaks: list[Leak], current: str | None) -> list[Outcome]:
    """Leaks of earlier owners found during test `current` (None: after the last test), one
    outcome per owner: listed, and failing nothing."""
    by_owner: dict[str, list[Leak]] = {}
    for leak in leaks:
        by_owner.setdefault(leak.owner, []).append(leak)
    return [
        Outcome(owner=owner, nodeid=current or owner, surfaced_later=True, leaks=found)
        for owner, found in by_owner.items()
    ]


def _wider_than_a_test(owner: Owner | None) -> bool:
    return owner is not None and owner.scope != "function"


def _check_markers(item: pytest.Item) -> None:
    settings.check_marker(item)
    for marker in item.iter_markers(ALLOW_MARKER):
        reason = marker.kwargs.get("reason", marker.args[0] if marker.args else None)
        if not isinstance(reason, str) or not reason.strip():
            raise pytest.UsageError(
                f"@pytest.mark.{ALLOW_MARKER} on {item.nodeid} needs a reason: "
                f'@pytest.mark.{ALLOW_MARKER}(reason="why this test keeps a connection")'
            )


class ConnectionLeakWarning(pytest.PytestWarning):
    """A leak or finding reported without failing the test (mode warn or a warning category)."""


class _WorkerOutcomes:
    """On the xdist controller: the outcomes each worker attached to its teardown reports.

    A plugin of its own, registered only there: in the process that runs the tests the
    detector keeps its outcomes as it makes them, without a hook call per report.
    """

    def __init__(self, outcomes: list[dict[str, Any]]) -> None:
        self.outcomes = outcomes

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        for name, value in getattr(report, "user_properties", ()):
            if name == _PROPERTY:
                self.outcomes.append(value)

    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        # What a worker found when its run ended (LeakDetector.pytest_sessionfinish).
        self.outcomes += getattr(node, "workeroutput", {}).get(_PROPERTY, ())


class LeakDetector:
    def __init__(self, config: pytest.Config, database: Any, server: Any = None) -> None:
        self.config = config
        self.database = database
        self.root = str(config.rootpath)
        self.outcomes: list[dict[str, Any]] = []  # every outcome of the run, for summary/JSON
        self._static = StaticCheck()
        self._item: pytest.Item | None = None
        self._test_owner: Owner | None = None
        self._global_owner: Owner | None = None
        self._registered = False
        self._checked = False
        self._item_outcomes: list[Outcome] = []
        self._task_held: list[Record] = []
        self._wide: dict[Any, Owner] = {}
        self._before: dict[int, Backend] = {}
        # Backends set aside while wrapped connects were under way (see _defer): pid -> the
        # owner they would be blamed on.
        self._deferred: dict[int, str] = {}
        # Backends of earlier tests' leaks found at this test's check (_collect_surfaced):
        # their state is part of those leaks, not this test's.
        self._surfaced_pids: set[int] = set()
        # Undisposed engines and pools still reachable when their owners ended (_kept_elsewhere).
        self._kept_pools: list[PoolInfo] = []
        self._usage_errors: dict[str, str] = {}
        self._marked = False
        self._marked_ids: set[str] = set()  # tests with @pytest.mark.leak_check, from collection
        self._unchanged_at_call = False
        self._pools_at_begin = 0
        # With a proof blind to clients outside this process tree (observer.OwnDescriptors):
        # when each test since the last snapshot began (time.time(), nodeid), to blame what a
        # snapshot finds by its start time; and whether this test, the run's last, must look.
        self._starts: list[tuple[float, str]] = []
        self._queries_at_begin = 0
        self._last_look = False
        self._blind = False
        self._thread = threading.get_ident()  # where pytest runs the tests
        self.ledger: Ledger | None = None
        self.observer: Observer | None = None
        if database is None:  # the xdist controller runs no tests: it only summarizes
            config.pluginmanager.register(_WorkerOutcomes(self.outcomes), "connguard-leak-outcomes")
            return
        details = server.details if server is not None else {}
        try:
            self.observer = Observer(
                database.admin_url,
                database.dbname,
                details.get("connection_log"),
                details.get("connection_log_gone_after"),
                prove=settings.resolve(config, "leak_check_server_proof") == "auto",
                # Each test's database is dropped right after it, and with it whatever a
                # client outside this process tree left there, before a later snapshot
                # could see it: only a proof that sees every client will do.
                own_side=not settings.resolve(config, "leak_check_db_per_test"),
            )
        except ObserverError as error:
            raise pytest.UsageError(f"connguard: {error}") from None
        proof = self.observer.proof
        self._blind = proof is not None and not proof.sees_every_client
        self.ledger = Ledger(lambda: self._global_owner)
        self.ledger.install()

    # -- lifecycle

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        if self.ledger is not None:
            self.ledger.uninstall()
        if self.observer is not None:
            self.observer.close()

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        if self.ledger is not None:
            # --leak-check imports the drivers and the observer before collection, which
            # otherwise tips the interpreter into a full collection during the first test
            # (about 50 ms on this project's benchmark); one now is paid with the startup.
            gc.collect()

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        worker = hasattr(self.config, "workerinput")
        ours = (settings.MARKER, ALLOW_MARKER)
        for item in items:
            # Looked up once here, in one walk of the item's markers: walking them again at
            # every setup is per-test cost for the rare test that has one.
            names = {mark.name for mark in item.iter_markers() if mark.name in ours}
            if not names:
                continue
            if settings.MARKER in names:
                self._marked_ids.add(item.nodeid)
            try:
                _check_markers(item)
            except pytest.UsageError as error:
                if not worker:
                    raise
                # A usage error raised in an xdist worker crashes it with an internal error;
                # failing the test's setup with the same line is what the user can read.
                self._usage_errors[item.nodeid] = str(error)

    # -- per test

    # The per-test hooks are plain hooks or new-style wrappers (wrapper=True): pluggy runs an
    # old-style hookwrapper through a result object and a compatibility shim, a measurable
    # share of the per-test cost of a light test. A new-style wrapper sees the inner hooks'
    # exception at its yield, hence the try/finally wherever state must be restored.

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        if self.ledger is not None:
            self._begin(item)
        if self._usage_errors:
            usage_error = self._usage_errors.get(item.nodeid)
            if usage_error is not None:
                raise pytest.fail.Exception(f"usage error: {usage_error}", pytrace=False)

    def _setting(self, name: str, item: pytest.Item | None) -> Any:
        # Only a test with @pytest.mark.leak_check needs the per-test resolution.
        return settings.resolve(self.config, name, item if self._marked else None)

    def _begin(self, item: pytest.Item) -> None:
        self._marked = item.nodeid in self._marked_ids
        self._item = item
        self._test_owner = Owner("test", item.nodeid, "function", item.nodeid)
        self._global_owner = self._test_owner
        self._registered = False
        self._checked = False
        self._item_outcomes = []
        self._task_held = []
        self._unchanged_at_call = False
        self._last_look = False
        if self._blind:
            self._starts.append((time.time(), item.nodeid))
            self._queries_at_begin = self.observer.queries
        self.ledger.on_returned = None
        self._pools_at_begin = len(self.ledger.pools)
        for info in self.ledger.pools:
            info.peak = info.checked_out
        last = self.observer.last
        self._before = last if last is not None else self.observer.snapshot()

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(self, fixturedef: Any, request: Any):
        item = self._item
        if self.ledger is None or item is None:
            return (yield)
        if not self._registered:
            self._registered = True
            item.addfinalizer(self._check_item)
        scope = fixturedef.scope
        nodeid = item.nodeid if scope == "function" else (fixturedef.baseid or "")
        owner = Owner("fixture", fixturedef.argname, scope, nodeid)
        if scope != "function":
            self._wide[fixturedef] = owner
        previous = self._global_owner
        self._global_owner = owner
        token = CURRENT_OWNER.set(owner)
        try:
            result = yield
            if scope != "function":
                # What a wider fixture started (a live server in a subprocess, say) is the
                # fixture's, not this test's: the test is measured from after its setup.
                # (Nothing to ask when the proof shows that no backend came or went.)
                observer = self.observer
                if observer.proof is None or not observer.proof.unchanged():
                    self._before = {**self._before, **observer.snapshot()}
            return result
        finally:
            try:
                CURRENT_OWNER.reset(token)
            except ValueError:  # a plugin switched contexts under us; the value is still ours
                CURRENT_OWNER.set(None)
            self._global_owner = previous

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item):
        if self.ledger is None or self._test_owner is None:
            return (yield)
        token = CURRENT_OWNER.set(self._test_owner)
        try:
            return (yield)
        finally:
            try:
                CURRENT_OWNER.reset(token)
            except ValueError:
                CURRENT_OWNER.set(None)
            self._flag_running_tasks()
            self._ask_after_call()

    def _ask_after_call(self) -> None:
        """Send the server snapshot for this test now, or prove it unnecessary, or wait."""
        self._unchanged_at_call = False
        if self.ledger.open and self.ledger.open_records(self._function_scoped):
            # The test or one of its fixtures still holds a connection: a snapshot now would
            # show it in use (a fixture's transaction, say), and another would be needed once
            # the fixtures are torn down. _evaluate decides then, from the proof or from one
            # fresh snapshot. Without a proof, that snapshot is sent as soon as the last of
            # them is back in its pool, if that happens in this thread (_ask_when_returned),
            # so that the rest of the teardown overlaps its round trip.
            if self.observer.proof is None:
                self.ledger.on_returned = self._ask_when_returned
            return
        # The snapshot travels while pytest reports the call and tears the fixtures down;
        # _evaluate collects it. With a proof that no backend came or went (observer.proof)
        # it is often unnecessary instead.
        self._unchanged_at_call = self._server_unchanged()
        if not self._unchanged_at_call:
            self.observer.send()

    def _ask_when_returned(self) -> None:
        """A connection came back to its pool during the teardown: ask now if it was the last.

        The pool's reset has run, so the server shows that backend idle. What the teardown
        does after this moment is seen as it is after the call phase of a test that held
        nothing then: the ledger sees what it opens, the next test's snapshot the rest.
        """
        if threading.get_ident() != self._thread:
            return  # the observer's connection belongs to pytest's thread
        ledger = self.ledger
        if ledger.open and ledger.open_records(self._function_scoped):
            return
        ledger.on_returned = None
        self.observer.send()

    def _function_scoped(self, owner: Owner | None) -> bool:
        """Whether `owner` is the current test or one of its function-scoped fixtures."""
        return (
            owner is not None
            and owner.scope == "function"
            and self._item is not None
            and owner.nodeid == self._item.nodeid
        )

    def _flag_running_tasks(self) -> None:
        if not self.ledger.open:
            return
        owner = self._test_owner
        for record in self.ledger.open_records(lambda o: o is owner):
            task = record.task() if record.task is not None else None
            if task is not None and not task.done():
                record.held_by_task = task.get_name()
                self._task_held.append(record)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(self, item: pytest.Item, nextitem: pytest.Item | None):
        if self.ledger is None:
            return (yield)
        if nextitem is None and self._blind:
            # The run's last test: a client outside this process tree may have opened a
            # backend since the last snapshot, which only the server can show.
            self._last_look = True
            self._unchanged_at_call = False
        if self._item is item and not self._registered:
            # No fixture was set up for this test, so nothing function-scoped to wait for.
            self._check_item()
        try:
            return (yield)
        finally:
            self._global_owner = None
            self._item = None

    def _check_item(self) -> None:
        item = self._item
        if self._checked or item is None:
            return
        self._checked = True
        ledger = self.ledger
        ledger.on_returned = None
        collected: dict[int, Backend] | None = None
        if (
            not ledger.open
            and not ledger.reclaimed
            and not self._task_held
            and len(ledger.pools) == self._pools_at_begin
            and not self._deferred
            and not self._threshold_warnings(item)
        ):
            # The common clean test: nothing is held now and no pool was made. What is left
            # to ask is whether the server shows a backend, or a state, that the test could
            # have left. No: the proof showed nothing changed since the last snapshot (at the
            # end of the call phase; or now, when fixtures were torn down since).
            observer = self.observer
            if self._registered:
                if not observer.pending and self._server_unchanged():
                    return
            elif self._unchanged_at_call:
                return
            if observer.pending:
                collected = observer.collect()  # sent at the end of the call phase
                if not collected.keys() - self._before.keys():
                    if not self._newly_idle_in_transaction(collected):
                        return
                # Something to explain: _evaluate decides, from this same snapshot.
        nodeid = item.nodeid
        if collected is None and self.observer.pending:
            collected = self.observer.collect()  # what earlier tests' stragglers show, too
        # Earlier tests' stragglers first, so their backends are not counted as this test's.
        self._collect_surfaced(nodeid)
        outcome = self._evaluate(
            self._function_scoped, nodeid, nodeid, item, test_level=True, collected=collected
        )
        if outcome is not None:
            self._item_outcomes.append(outcome)

    def pytest_fixture_post_finalizer(self, fixturedef: Any, request: Any) -> None:
        owner = self._wide.pop(fixturedef, None)
        if owner is None or self.ledger is None:
            return
        nodeid = self._item.nodeid if self._item is not None else owner.label
        outcome = self._evaluate(
            lambda o: o is owner, owner.label, nodeid, self._item, test_level=False
        )
        if outcome is None:
            return
        if self._item is not None:
            self._item_outcomes.append(outcome)
        else:
            self.outcomes.append(self._as_dict(outcome))

    def _collect_surfaced(self, current: str) -> None:
        """Leaks of earlier tests found now: blamed on their owners, listed, not failed here.

        A task or thread a finished test started can check a connection out later, and a
        checkout can be reclaimed by the garbage collector after its test was counted.
        """

        def earlier(owner: Owner | None) -> bool:
            return owner is not None and owner.scope == "function" and owner.nodeid != current

        ledger = self.ledger
        late = self._unreleased(earlier)
        self._surfaced_pids = {r.pid for r in late if r.pid is not None}
        if not late:
            return
        snapshot = self.observer.last or {}
        self._item_outcomes += _surfaced([self._leak(r, snapshot) for r in late], current)
        ledger.forget(late)

    def _unreleased(self, belongs) -> list[Record]:
        """Records of these owners still open, and those the garbage collector reclaimed."""
        if not self.ledger.open and not self.ledger.reclaimed:
            return []
        records = self.ledger.open_records(belongs)
        if records:
            # A proxy that is garbage but not yet collected still looks open; collecting
            # turns it into what it is (a reclaimed leak). Costs tens of ms, so only here.
            gc.collect()
            records = self.ledger.open_records(belongs)
        return records + self.ledger.take_reclaimed(belongs)

    # -- the decision

    def _evaluate(
        self,
        belongs,
        label: str,
        nodeid: str,
        item: pytest.Item | None,
        test_level: bool,
        collected: dict[int, Backend] | None = None,
    ) -> Outcome | None:
        """What these owners leaked; `collected`: the call phase's snapshot, already collected."""
        ledger = self.ledger
        leaked = self._unreleased(belongs)
        if test_level:
            leaked += [r for r in self._task_held if r not in leaked]
        pools = [p for p in ledger.pools if belongs(p.owner) and not p.reported]

        snapshot: dict[int, Backend] | None = None
        unexplained: list[Backend] = []
        if test_level:
            # Sent at the end of the call phase (see pytest_runtest_call), or when the last
            # connection held then was back in its pool: a backend that a function-scoped
            # fixture closed since is still listed, and the ledger explains it; anything else
            # the ledger cannot explain, or any leak, gets a fresh look.
            observer = self.observer
            # Without function-scoped fixtures nothing ran since the end of the call phase but
            # pytest's reporting: the answer given then stands, as a snapshot sent then would.
            unchanged = self._server_unchanged() if self._registered else self._unchanged_at_call
            if collected is None and not observer.pending and unchanged:
                # Proven unchanged since the last snapshot (and so nothing is held: no leak).
                snapshot = observer.last
            else:
                # A snapshot sent before the fixtures' teardown ended predates some of it; one
                # asked for now does not, and needs no second look.
                fresh = collected is None and not observer.pending
                snapshot = collected if collected is not None else observer.collect()
                leaked_pids = {r.pid for r in leaked if r.pid is not None}
                new = set(snapshot) - set(self._before) - leaked_pids
                if new:
                    snapshot, unexplained = self._explain(new, snapshot, label)
                if unexplained and len(self._starts) > 1:
                    unexplained = self._by_start_time(unexplained, nodeid)
                if not fresh and (leaked or self._newly_idle_in_transaction(snapshot)):
                    snapshot = observer.snapshot()
            if self._deferred:
                self._item_outcomes += self._settle_deferred(snapshot, nodeid)
        elif leaked:
            snapshot = self.observer.snapshot()

        warnings_: list[Warning_] = []
        for info in pools:
            if info.undisposed():
                info.reported = True
                if self._kept_elsewhere(info):
                    self._kept_pools.append(info)  # judged when the run ends
                else:
                    warnings_.append(self._pool_warning(info))
        if test_level:
            warnings_ += self._threshold_warnings(item)
        if snapshot is not None:
            warnings_ += self._idle_in_transaction(snapshot, leaked)
        self._prune_pools()

        if not leaked and not unexplained and not warnings_:
            return None
        if warnings_:
            fail_on = self._setting("leak_check_fail_on", item)
            for warning in warnings_:
                warning.fails = warning.category in fail_on
        outcome = Outcome(owner=label, nodeid=nodeid)
        if item is not None:
            for marker in item.iter_markers(ALLOW_MARKER):
                outcome.allowed = marker.kwargs.get("reason") or (marker.args or ("",))[0]
                break
        outcome.leaks = [self._leak(r, snapshot or {}) for r in leaked]
        outcome.leaks += [_unseen_leak(backend, label) for backend in unexplained]
        outcome.warnings = warnings_
        ledger.forget(leaked)
        return outcome

    def _defer(self, unknown: set[int], snapshot: dict[int, Backend], label: str) -> set[int]:
        """Set aside, of these unknown backends, as many as wrapped connects are under way.

        Between tests the event loop does not run, so a connect it started (a pool filling
        itself in the background) cannot finish, though the server already lists its backend:
        one that has not run a query yet. Such a backend is settled at a later test, once the
        connects have finished (_settle_deferred). Returns the rest.
        """
        room = self.ledger.connecting
        rest = set()
        for pid in sorted(unknown):
            if room and not snapshot[pid].query:
                self._deferred[pid] = label
                room -= 1
            else:
                rest.add(pid)
        return rest

    def _settle_deferred(
        self, snapshot: dict[int, Backend], current: str | None, final: bool = False
    ) -> list[Outcome]:
        """Backends set aside by _defer: now explained, gone, or leaks of their owners.

        `final`: the run is over, and a connect still counted as under way never will be.
        """
        ledger = self.ledger
        late: list[Leak] = []
        for pid, label in list(self._deferred.items()):
            if pid not in snapshot or ledger.explains(pid) is not None:
                del self._deferred[pid]
            elif final or not ledger.connecting:
                del self._deferred[pid]
                late.append(_unseen_leak(snapshot[pid], label))
        return _surfaced(late, current)

    def _server_unchanged(self) -> bool:
        """Whether the server can show nothing the last snapshot did not; no round trip.

        Only with a proof that no backend came or went (observer.proof): the server's connection
        log (local and container backends), or the postmaster's children in this machine's
        process table (a url server on this machine, in a container or not); or, out of sight
        of the server, that none of this process's came or went (its own descriptors), except
        after the run's last test, which looks for what a client outside opened. What could
        change without a backend coming or going is a backend's state; that takes a connection
        in use, so the ledger must hold none, and every backend of the last snapshot must be an
        idle connection resting in a pool, outside a transaction.
        """
        observer = self.observer
        proof = observer.proof
        ledger = self.ledger
        if proof is None or ledger.reclaimed or self._task_held or self._last_look:
            return False
        if ledger.open and ledger.holds_any():
            return False
        last = observer.last
        if last is None or not proof.unchanged():
            return False
        for backend in last.values():
            if backend.state != "idle":
                return False
        if not ledger.idle_in_pools(last):
            ledger.scan_pools()  # learn the idle connections of asyncpg and psycopg pools
            return ledger.idle_in_pools(last)
        return True

    def _explain(self, new: set[int], snapshot: dict[int, Backend], label: str):
        """New backends the ledger cannot explain, after they had a moment to go away.

        A backend whose client closed it lingers for a few milliseconds; one the ledger knows
        as closed is explained, an unknown one is polled for (bounded) before it counts. While
        polling, a connect under way in another thread (a sync pool filling itself) may return
        and explain its backend; one under way in the event loop cannot, and is set aside
        (_defer).
        """
        ledger = self.ledger

        def unknown_now(pid: int) -> bool:
            return ledger.explains(pid) is None

        unknown = set(filter(unknown_now, new))
        if unknown:
            ledger.scan_pools()
            unknown = set(filter(unknown_now, unknown))
        if unknown and ledger.connecting:
            unknown = self._defer(unknown, snapshot, label)
        if unknown:
            snapshot = self.observer.wait_gone(unknown, unknown_now)
            unknown = set(filter(unknown_now, unknown))
        return snapshot, [snapshot[pid] for pid in sorted(unknown) if pid in snapshot]

    def _by_start_time(self, backends: list[Backend], current: str) -> list[Backend]:
        """Of these unexplained backends, those that started while this test ran; the others
        are leaks of the tests that were running when they started, found now.

        Only with a proof blind to clients outside this process tree (observer.OwnDescriptors),
        which let the tests since the last snapshot skip it: such a backend is seen by the
        first snapshot asked for after it started, maybe tests later.
        """
        started = self.observer.started({backend.pid for backend in backends})
        starts = self._starts
        times = [at for at, _ in starts]
        mine, earlier = [], []
        for backend in backends:
            at = started.get(backend.pid)
            index = len(starts) - 1 if at is None else max(bisect.bisect_right(times, at) - 1, 0)
            owner = starts[index][1]
            if owner == current:
                mine.append(backend)
            else:
                earlier.append(_unseen_leak(backend, owner, _FROM_OUTSIDE))
        if earlier:
            self._item_outcomes += _surfaced(earlier, current)
        return mine

    def _newly_idle_in_transaction(self, snapshot: dict[int, Backend]) -> list[Backend]:
        """Backends idle in a transaction that were not, in that state, before the test."""
        if snapshot is self._before:  # the same snapshot: no state changed
            return []
        before = self._before
        found = []
        for pid, backend in snapshot.items():
            if (backend.state or "").startswith("idle in transaction"):
                previous = before.get(pid)
                if previous is None or previous.state != backend.state:
                    found.append(backend)
        return found

    def _leak(self, record: Record, snapshot: dict[int, Backend]) -> Leak:
        opened, checked_out, outer = locate(record)
        leak = Leak(
            kind=record.kind,
            owner=record.owner.label if record.owner else "?",
            opened_at=opened,
            checked_out_at=checked_out,
            called_from=outer,
            pid=record.pid,
        )
        backend = snapshot.get(record.pid) if record.pid is not None else None
        fill_backend(leak, backend)
        if record.state == "reclaimed":
            leak.note = (
                "never returned: the garbage collector reclaimed it after the test "
                "dropped its last reference (SQLAlchemy cleaned it up silently)"
            )
            if backend is None:
                leak.state = "closed by the garbage collector"
        elif record.held_by_task:
            leak.note = f"held by task {record.held_by_task!r}, still running when the test ended"
            if backend is None:
                leak.state = "closed after the test ended (the task was cancelled)"
        leak.static_check = self._static.verdict(opened)
        return leak

    @staticmethod
    def _kept_elsewhere(info: PoolInfo) -> bool:
        """Whether an undisposed engine or pool outlives its owner: still reachable after a
        full collection (a full collection costs tens of milliseconds, and this is the rare
        case). Such a one is an application's own (an @lru_cache'd get_engine(), a module
        global, app state), which may well be disposed when the run ends; one made per call
        is garbage by now. An asyncpg pool, held by the ledger itself, cannot be told."""
        if not isinstance(info.ref, weakref.ref) or info.target() is None:
            return False
        gc.collect()
        return info.target() is not None

    def _never_disposed(self) -> list[Outcome]:
        """Engines and pools kept past their owners (see _kept_elsewhere) and still not disposed
        now that every fixture is torn down: one outcome per owner, as found after its test."""
        fail_on = self._setting("leak_check_fail_on", None)
        outcomes: dict[str, Outcome] = {}
        for info in self._kept_pools:
            if not info.undisposed():
                continue
            owner = info.owner.label if info.owner is not None else "?"
            outcome = outcomes.setdefault(
                owner, Outcome(owner=owner, nodeid=owner, surfaced_later=True)
            )
            warning = self._pool_warning(info)
            warning.fails = warning.category in fail_on
            outcome.warnings.append(warning)
        self._kept_pools = []
        return list(outcomes.values())

    def _pool_warning(self, info: PoolInfo) -> Warning_:
        frames = user_frames(info.frames)
        where = location(*frames[0]) if frames else None
        noun = {
            "SQLAlchemy engine": "engine",
            "asyncpg pool": "asyncpg pool",
            "psycopg pool": "psycopg pool",
        }.get(info.kind, info.kind)
        verb = "disposed" if noun == "engine" else "closed"
        return Warning_(
            "engine",
            f"{noun} created by {info.owner.label if info.owner else '?'} was never {verb}; "
            f"its connections stay open on the server",
            where,
        )

    def _threshold_warnings(self, item: pytest.Item | None) -> list[Warning_]:
        # A pool of one is full whenever it is used: no early warning to give there.
        busy = [p for p in self.ledger.pools if p.peak and p.capacity and p.capacity > 1]
        if not busy:
            return []
        threshold = self._setting("leak_check_pool_threshold", item)
        found = []
        for info in busy:
            capacity = info.capacity
            if info.peak > threshold * capacity:
                frames = user_frames(info.frames)
                found.append(
                    Warning_(
                        "pool-threshold",
                        f"peak {info.peak} of {capacity} connections of a {info.kind} checked "
                        f"out at once ({info.peak / capacity:.0%} > {threshold:.0%})",
                        location(*frames[0]) if frames else None,
                    )
                )
        return found

    def _idle_in_transaction(
        self, snapshot: dict[int, Backend], leaked: list[Record]
    ) -> list[Warning_]:
        found: list[Warning_] = []
        fixtures_own: set[int] | None = None
        for backend in self._newly_idle_in_transaction(snapshot):
            pid = backend.pid
            if pid in self._surfaced_pids:
                continue
            if fixtures_own is None:
                # A session- or module-scoped fixture's connection, in a transaction it holds
                # on purpose (SQLAlchemy's "join into an external transaction" recipe, an
                # autobegun Connection): the fixture's business, not this test's.
                fixtures_own = {
                    r.pid for r in self.ledger.open_records(_wider_than_a_test) if r.pid is not None
                }
            if pid in fixtures_own:
                continue
            record = next((r for r in leaked if r.pid == pid), None)
            where = locate(record)[0] if record is not None else None
            found.append(
                Warning_(
                    "idle-in-transaction",
                    f"connection (backend pid {pid}) left {backend.state}; it holds its locks and "
                    f"snapshot until closed",
                    where,
                )
            )
        return found

    def _prune_pools(self) -> None:
        self.ledger.pools = [
            p
            for p in self.ledger.pools
            if p.live > 0 or p.checked_out > 0 or p.target() is not None
        ]

    # -- reporting

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo):
        report = yield
        if call.when != "teardown" or self.ledger is None:
            return report
        outcomes, self._item_outcomes = self._item_outcomes, []
        self._before = self.observer.last or {}
        if self._blind and self.observer.queries != self._queries_at_begin:
            # A snapshot since this test began: what started before it, it has seen.
            self._starts = self._starts[-1:]
        if not outcomes:
            return report
        mode = self._setting("leak_check_mode", item)
        # What fails goes first: the short summary line shows the text's first line.
        outcomes.sort(key=lambda o: not o.fails)
        text = "\n\n".join(format_outcome(o, self.root) for o in outcomes)
        failing = mode == "fail" and any(o.fails and not o.surfaced_later for o in outcomes)
        reported = []
        for outcome in outcomes:
            data = self._as_dict(outcome, mode)
            reported.append(data)
            self.outcomes.append(data)
            report.user_properties.append((_PROPERTY, data))  # for the xdist controller
        if not failing:
            try:
                item.warn(ConnectionLeakWarning(text))
            except ConnectionLeakWarning:
                # `-W error` or `filterwarnings = error`: the user made warnings errors, and an
                # exception out of this hook would stop the whole run. It fails this test,
                # unless all it says is what @allow_connection_leak allowed, or an earlier
                # test's leak found now (that one fails the run instead, see _late_failures).
                for outcome, data in zip(outcomes, reported, strict=True):
                    if not outcome.surfaced_later and (outcome.allowed is None or outcome.warnings):
                        data["fails"] = failing = True
        if failing:
            if report.passed:
                report.outcome = "failed"
                report.longrepr = text
            else:
                report.sections.append(("connguard leak check", text))
        return report

    def _as_dict(self, outcome: Outcome, mode: str = "fail") -> dict[str, Any]:
        data = asdict(outcome)
        data["fails"] = mode == "fail" and outcome.fails and not outcome.surfaced_later
        return data

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        broken = self.observer.broken if self.observer is not None else None
        if not self.outcomes and not broken:
            return
        terminalreporter.section("connguard leak check")
        if broken:
            terminalreporter.line(
                f"the server observer stopped ({broken}); "
                f"later tests were checked by the client ledger alone"
            )
        for line in format_summary(self.outcomes, self.root):
            terminalreporter.line(line)
        late = self._late_failures()
        if late:
            terminalreporter.line(
                f"the run fails: {late} LATE finding(s) above fail, and their tests had "
                f"already passed",
                red=True,
            )

    def _late_failures(self) -> int:
        """Leaks found while a later test ran, not allowed: their tests had already passed, so
        in fail mode the run fails instead."""
        if settings.resolve(self.config, "leak_check_mode") != "fail":
            return 0
        return sum(
            1
            for o in self.outcomes
            if o.get("surfaced_later")
            and (
                (o["leaks"] and o.get("allowed") is None) or any(w["fails"] for w in o["warnings"])
            )
        )

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        late: list[Outcome] = []
        if self._deferred and self.observer is not None:
            # Set aside at the last tests while connects were under way; none will finish now.
            late += self._settle_deferred(self.observer.snapshot(), None, final=True)
        if self._kept_pools:
            late += self._never_disposed()
        if late:
            found = [self._as_dict(outcome) for outcome in late]
            self.outcomes += found
            workeroutput = getattr(self.config, "workeroutput", None)
            if workeroutput is not None:
                # An xdist worker's test reports are over: these travel with its goodbye.
                workeroutput[_PROPERTY] = found
        if session.exitstatus == pytest.ExitCode.OK and self._late_failures():
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        target = settings.report_path(self.config)
        if target is None or hasattr(self.config, "workerinput"):
            return
        write_report(
            session,
            str(target),
            self.outcomes,
            {
                "tests_with_leaks": sorted(
                    {o["owner"] for o in self.outcomes if o["leaks"] and "::" in o["owner"]}
                ),
                "fixtures_with_leaks": sorted(
                    {o["owner"] for o in self.outcomes if o["leaks"] and "::" not in o["owner"]}
                ),
                # How often the server was asked; None on the xdist controller (no observer).
                "server_snapshots": self.observer.queries if self.observer is not None else None,
                # What let tests skip the server round trip: "connection log", "process
                # table", or None (every test asked).
                "server_proof": self.observer.proof.kind
                if self.observer is not None and self.observer.proof is not None
                else None,
            },
        )


__all__ = ["ConnectionLeakWarning", "LeakDetector"]
