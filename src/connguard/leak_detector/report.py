"""The leak report: what a leaking test or fixture left open, where it was opened, as text and JSON.

Values here are plain data built by the detector; formatting (source lines, the static check's
verdict) happens only for leaks, never on the clean path.
"""

from __future__ import annotations

import json
import linecache
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .ledger import Record, user_frames
from .observer import Backend


@dataclass
class Location:
    path: str
    line: int
    function: str
    source: str

    def text(self, root: str | None = None) -> str:
        return f"{_relative(self.path, root)}:{self.line}"


@dataclass
class Leak:
    kind: str
    owner: str
    opened_at: Location | None = None  # the user's line that opened it
    checked_out_at: Location | None = None  # for sessions: where the session took its connection
    called_from: list[Location] = field(default_factory=list)
    pid: int | None = None
    state: str | None = None
    last_query: str | None = None
    backend_start: str | None = None
    client_port: int | None = None
    application_name: str | None = None
    note: str | None = None
    static_check: str = "unavailable"


@dataclass
class Warning_:
    category: str  # "engine" | "idle-in-transaction" | "pool-threshold"
    message: str
    location: Location | None = None
    fails: bool = False


@dataclass
class Outcome:
    """What one test (or one wider-scoped fixture) left behind."""

    owner: str  # nodeid, or "fixture 'x' (session scope)"
    nodeid: str  # the test whose report carries it
    leaks: list[Leak] = field(default_factory=list)
    warnings: list[Warning_] = field(default_factory=list)
    allowed: str | None = None  # the allow_connection_leak reason
    surfaced_later: bool = False  # a GC-reclaimed leak found while a later test ran

    @property
    def fails(self) -> bool:
        return bool(self.leaks and self.allowed is None) or any(w.fails for w in self.warnings)


def _relative(path: str, root: str | None) -> str:
    if root:
        try:
            return os.path.relpath(path, root) if os.path.isabs(path) else path
        except ValueError:
            return path
    return path


def location(filename: str, line: int, function: str) -> Location:
    return Location(filename, line, function, linecache.getline(filename, line).strip())


def locate(record: Record) -> tuple[Location | None, Location | None, list[Location]]:
    """(opening line, checkout line for sessions, outer user frames) of a record."""
    chain = [location(*frame) for frame in user_frames(record.frames)]
    checked_out = chain[0] if chain else None
    if record.created_frames is not None:
        created = [location(*frame) for frame in user_frames(record.created_frames)]
        if created:
            opened = created[0]
            return opened, checked_out if checked_out != opened else None, _callers(created)
    return checked_out, None, _callers(chain)


def _callers(chain: list[Location]) -> list[Location]:
    """Up to three outer frames of the project's own code (installed packages left out)."""
    return [where for where in chain[1:] if not _installed(where.path)][:3]


def _installed(path: str) -> bool:
    return "/site-packages/" in path or "/dist-packages/" in path


class StaticCheck:
    """Whether connguard's static checker flags a line; one check per file, cached."""

    def __init__(self) -> None:
        self._cache: dict[str, dict[int, list[str]] | None] = {}

    def verdict(self, where: Location | None) -> str:
        if where is None:
            return "unavailable"
        lines = self._cache.get(where.path, ...)
        if lines is ...:
            lines = self._cache[where.path] = self._check(where.path)
        if lines is None:
            return "unavailable"
        codes = lines.get(where.line)
        if codes:
            return f"{', '.join(sorted(set(codes)))} flags this line"
        return "not flagged"

    @staticmethod
    def _check(path: str) -> dict[int, list[str]] | None:
        try:
            from connguard.checkers.engine import check_file

            findings = check_file(path)
        except Exception:
            return None
        lines: dict[int, list[str]] = {}
        for finding in findings:
            if finding.code in ("CG000",) or finding.code.startswith("CG9"):
                return None  # the checker could not analyse the file: no verdict
            lines.setdefault(finding.line, []).append(finding.code)
        return lines


def fill_backend(leak: Leak, backend: Backend | None) -> None:
    if backend is None:
        return
    leak.pid = backend.pid
    leak.state = backend.state
    leak.last_query = backend.query
    leak.backend_start = backend.backend_start
    leak.client_port = backend.client_port
    leak.application_name = backend.application_name


def _query_text(query: str | None, width: int = 120) -> str:
    if not query:
        return "(none)"
    text = " ".join(query.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def format_outcome(outcome: Outcome, root: str | None = None) -> str:
    """The failure text of a test's teardown."""
    lines: list[str] = []
    if outcome.leaks:
        count = len(outcome.leaks)
        noun = "connection" if count == 1 else "connections"
        who = outcome.owner if outcome.owner != outcome.nodeid else outcome.nodeid.split("::")[-1]
        lines.append(f"connguard: {who} leaked {count} database {noun}")
        if outcome.surfaced_later:
            lines.append("  (found while this later test ran; blamed on the test that opened it)")
        if outcome.allowed is not None:
            lines.append(f"  (allowed: {outcome.allowed})")
        for number, leak in enumerate(outcome.leaks, 1):
            lines.append("")
            lines.extend(_format_leak(number, leak, root))
    for warning in outcome.warnings:
        if lines:
            lines.append("")
        verb = "error" if warning.fails else "warning"
        lines.append(f"connguard {verb} [{warning.category}]: {warning.message}")
        if warning.location is not None:
            lines.append(f"    at {warning.location.text(root)}: {warning.location.source}")
    return "\n".join(lines)


def _format_leak(number: int, leak: Leak, root: str | None) -> list[str]:
    out = []
    if leak.opened_at is not None:
        out.append(f"  {number}. {leak.kind} opened at {leak.opened_at.text(root)}")
        out.append(f"       {leak.opened_at.source}")
    else:
        out.append(f"  {number}. {leak.kind} (opening line unknown)")
    if leak.checked_out_at is not None:
        out.append(
            f"     connection checked out at {leak.checked_out_at.text(root)}: "
            f"{leak.checked_out_at.source}"
        )
    for outer in leak.called_from:
        out.append(f"     called from {outer.text(root)} in {outer.function}")
    if leak.note:
        out.append(f"     {leak.note}")
    state = leak.state or "unknown"
    pid = f", backend pid {leak.pid}" if leak.pid is not None else ""
    out.append(f"     state: {state}{pid}")
    if leak.backend_start is not None:
        out.append(f"     last query: {_query_text(leak.last_query)}")
    if leak.client_port is not None or leak.backend_start is not None:
        out.append(f"     backend start {leak.backend_start}, client port {leak.client_port}")
    out.append(f"     static check: {leak.static_check}")
    return out


def format_summary(outcomes: list[dict[str, Any]], root: str | None = None) -> list[str]:
    """Lines of the terminal summary section, from outcomes as dicts (they cross xdist)."""
    lines = []
    for outcome in outcomes:
        if outcome.get("fails"):
            status = "FAIL"
        elif outcome.get("surfaced_later"):
            status = "LATE"
        elif outcome.get("allowed") is not None:
            status = "ALLOWED"
        else:
            status = "WARN"
        parts = []
        if outcome["leaks"]:
            parts.append(f"{len(outcome['leaks'])} leaked")
        parts += [warning["category"] for warning in outcome["warnings"]]
        where = ""
        first = next((leak["opened_at"] for leak in outcome["leaks"] if leak["opened_at"]), None)
        made = next((w["location"] for w in outcome["warnings"] if w.get("location")), None)
        if first is not None:
            where = f" (opened at {_relative(first['path'], root)}:{first['line']})"
        elif made is not None:  # an engine or pool: where it was created
            where = f" (at {_relative(made['path'], root)}:{made['line']})"
        later = ""
        if outcome.get("surfaced_later"):
            found = outcome["nodeid"]
            later = (
                " [found when the run ended]"
                if found == outcome["owner"]
                else f" [found during {found}]"
            )
        lines.append(f"{status} {outcome['owner']}: {', '.join(parts)}{where}{later}")
    return lines


def write_json(path: str | Path, outcomes: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    data = {
        "version": 1,
        **meta,
        "leaking": sum(1 for outcome in outcomes if outcome["leaks"]),
        "results": outcomes,
    }
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
        tmp.replace(target)
    except OSError:
        # A half-written report must not be mistaken for one (nor left next to the target).
        tmp.unlink(missing_ok=True)
        raise


def write_report(
    session: pytest.Session, path: str, outcomes: list[dict[str, Any]], meta: dict[str, Any]
) -> None:
    """write_json after the last test; a path that fails now (it was checked before the run)
    is one line on the terminal and a failed run, not a traceback after the results."""
    try:
        write_json(path, outcomes, meta)
    except OSError as error:
        line = f"ERROR: connguard: cannot write the leak report {path}: {error.strerror or error}"
        terminal = session.config.pluginmanager.get_plugin("terminalreporter")
        if terminal is not None:
            terminal.ensure_newline()
            terminal.write_line(line, red=True, bold=True)
        else:
            print(line, file=sys.stderr)
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.USAGE_ERROR
