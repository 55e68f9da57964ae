"""`[tool.connguard]` settings: where they are found, what they mean, which codes apply where."""

from __future__ import annotations

import fnmatch
import os
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any

# Codes that are not rules: the engine's own verdicts on a file. They cannot be deselected by
# `select` (a file we could not read must never pass silently), only by an explicit `ignore`.
PARSE_ERROR = "CG000"
INTERNAL_ERROR = "CG999"
ENGINE_CODES = frozenset({PARSE_ERROR, INTERNAL_ERROR})

_CODE_RE = re.compile(r"^CG[0-9]{0,3}$")
_KNOWN_KEYS = {
    "select",
    "ignore",
    "extend-select",
    "extend-ignore",
    "per-file-ignores",
    "exclude",
    "extend-exclude",
    "extra-factories",
}

# Directories nobody wants linted; a user's `exclude` adds to these, it does not replace them.
DEFAULT_EXCLUDES = (
    ".git",
    ".hg",
    ".svn",
    ".venv",
    "venv",
    ".tox",
    ".nox",
    "__pycache__",
    "build",
    "dist",
    "node_modules",
    ".mypy_cache",
    ".pytest_cache",
    ".ruff_cache",
    ".eggs",
    "*.egg-info",
)


class ConfigError(Exception):
    """A setting that cannot be used; the message names the file and the key."""


def _codes(value: object, where: str) -> frozenset[str]:
    if isinstance(value, str):
        items: Iterable[object] = [part for part in re.split(r"[,\s]+", value) if part]
    elif isinstance(value, (list, tuple)):
        items = value
    else:
        raise ConfigError(f"{where}: expected a list of codes, got {type(value).__name__}")
    out = set()
    for item in items:
        if not isinstance(item, str) or not _CODE_RE.match(item.strip().upper()):
            raise ConfigError(f"{where}: {item!r} is not a connguard code (CG followed by digits)")
        out.add(item.strip().upper())
    return frozenset(out)


def parse_codes(text: str, where: str) -> frozenset[str]:
    """Codes from a command line value such as "CG101,CG102"."""
    return _codes(text, where)


def _matches(code: str, prefixes: frozenset[str]) -> bool:
    return any(code.startswith(prefix) for prefix in prefixes)


@dataclass(frozen=True)
class Config:
    """What to check and how; the defaults check every rule with the built-in factory table."""

    select: frozenset[str] | None = None  # None: every rule that is on by default
    ignore: frozenset[str] = frozenset()
    extend_select: frozenset[str] = frozenset()
    per_file_ignores: tuple[tuple[str, frozenset[str]], ...] = ()
    exclude: tuple[str, ...] = ()
    extra_factories: Mapping[str, str] = field(default_factory=dict)
    root: Path | None = None  # directory of the pyproject.toml the settings came from
    source: Path | None = None  # that pyproject.toml

    def with_selection(
        self,
        select: frozenset[str] | None = None,
        ignore: frozenset[str] | None = None,
        extend_select: frozenset[str] | None = None,
        extend_ignore: frozenset[str] | None = None,
    ) -> Config:
        """Command line selection over the file's: `select`/`ignore` replace, `extend-*` add."""
        new_select = self.select if select is None else select
        new_extend = self.extend_select | (extend_select or frozenset())
        new_ignore = self.ignore if ignore is None else ignore
        if extend_ignore:
            new_ignore = new_ignore | extend_ignore
        return replace(self, select=new_select, ignore=new_ignore, extend_select=new_extend)

    def relative(self, path: str) -> str:
        """`path` as a posix path relative to the config root when it lies under it."""
        p = Path(path)
        if self.root is not None:
            try:
                return p.resolve().relative_to(self.root).as_posix()
            except (ValueError, OSError):
                pass
        text = p.as_posix()
        while text.startswith("./"):
            text = text[2:]
        return text

    def file_ignores(self, path: str) -> frozenset[str]:
        if not self.per_file_ignores:
            return frozenset()
        rel = self.relative(path)
        name = PurePosixPath(rel).name
        out: set[str] = set()
        for pattern, codes in self.per_file_ignores:
            pat = pattern.rstrip("/")
            if (
                fnmatch.fnmatchcase(rel, pat)
                or fnmatch.fnmatchcase(name, pat)
                or rel.startswith(pat + "/")
                or fnmatch.fnmatchcase(rel, pat + "/*")
            ):
                out |= codes
        return frozenset(out)

    def enabled(self, code: str, path: str | None = None) -> bool:
        """Is `code` reported for `path`? Longest matching prefix wins between select and ignore."""
        ignored = self.ignore | (self.file_ignores(path) if path is not None else frozenset())
        if code in ENGINE_CODES:
            return code not in ignored
        best_ignore = max((len(p) for p in ignored if code.startswith(p)), default=-1)
        selected = self.extend_select | (self.select if self.select is not None else {"CG"})
        best_select = max((len(p) for p in selected if code.startswith(p)), default=-1)
        if best_select < 0:
            return False
        return best_select > best_ignore

    def named(self, code: str) -> bool:
        """Is `code` selected by its full name? (rules that are off by default need this)"""
        return code in self.extend_select or (self.select is not None and code in self.select)

    @cached_property
    def table(self) -> Any:
        """The factory table with `extra-factories` merged in (built once per config)."""
        from connguard.checkers import resources

        try:
            return resources.build_table(dict(self.extra_factories) or None)
        except (ValueError, KeyError, TypeError) as exc:
            where = self.source or "configuration"
            detail = str(exc).removeprefix("extra-factories: ")
            raise ConfigError(f"{where}: [tool.connguard] extra-factories: {detail}") from None

    @cached_property
    def exclude_spec(self) -> Any:
        """gitignore-style spec of `exclude`, matched against paths relative to the root."""
        if not self.exclude:
            return None
        import pathspec

        try:
            return pathspec.GitIgnoreSpec.from_lines(self.exclude)
        except Exception as exc:  # pathspec raises several types for bad patterns
            raise ConfigError(f"{self.source or 'configuration'}: exclude: {exc}") from None

    def is_excluded(self, path: str | Path) -> bool:
        spec = self.exclude_spec
        if spec is None:
            return False
        text = str(path)
        rel = self.relative(text)
        if text.endswith(("/", os.sep)) and not rel.endswith("/"):
            rel += "/"  # a directory: lets `generated/` prune the walk instead of each file
        return bool(spec.match_file(rel))


@dataclass(frozen=True)
class Selection:
    """The command line's selection, applied on top of each file's own configuration."""

    select: frozenset[str] | None = None
    ignore: frozenset[str] | None = None
    extend_select: frozenset[str] | None = None
    extend_ignore: frozenset[str] | None = None

    def apply(self, config: Config) -> Config:
        return config.with_selection(
            self.select, self.ignore, self.extend_select, self.extend_ignore
        )


def _load_toml(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on 3.10 only
        import tomli as tomllib
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def _may_configure_us(path: Path) -> bool:
    """Whether a pyproject.toml that does not parse could hold [tool.connguard]: any spelling
    of that table names us."""
    try:
        return b"connguard" in path.read_bytes()
    except OSError:
        return True


def find_pyproject(start: Path) -> tuple[Path, dict[str, Any]] | None:
    """The nearest pyproject.toml above `start` that has a [tool.connguard] table, parsed."""
    try:
        here = start.resolve()
    except OSError:
        here = start.absolute()
    if not here.is_dir():
        here = here.parent
    for directory in (here, *here.parents):
        candidate = directory / "pyproject.toml"
        if candidate.is_file():
            try:
                data = _load_toml(candidate)
            except ConfigError:
                if not _may_configure_us(candidate):
                    continue  # not TOML yet (a cookiecutter template's), and nothing of ours
                raise
            tool = data.get("tool")
            if isinstance(tool, dict) and "connguard" in tool:
                return candidate, data
    return None


def config_from_table(table: object, source: Path | None = None) -> Config:
    """A Config from the contents of a [tool.connguard] table; strict about names and types."""
    where = f"{source}: [tool.connguard]" if source else "[tool.connguard]"
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table")
    values = {}
    for key, value in table.items():
        norm = key.replace("_", "-")
        if norm not in _KNOWN_KEYS:
            known = ", ".join(sorted(_KNOWN_KEYS))
            raise ConfigError(f"{where}: unknown key {key!r} (known: {known})")
        values[norm] = value

    select = _codes(values["select"], f"{where} select") if "select" in values else None
    ignore = _codes(values.get("ignore", []), f"{where} ignore")
    extend_select = _codes(values.get("extend-select", []), f"{where} extend-select")
    extend_ignore = _codes(values.get("extend-ignore", []), f"{where} extend-ignore")

    pfi_raw = values.get("per-file-ignores", {})
    if not isinstance(pfi_raw, dict):
        raise ConfigError(f"{where} per-file-ignores: expected a table of glob = [codes]")
    per_file = tuple(
        (str(glob), _codes(codes, f"{where} per-file-ignores {glob!r}"))
        for glob, codes in pfi_raw.items()
    )

    exclude: list[str] = []
    for key in ("exclude", "extend-exclude"):
        raw = values.get(key, [])
        if isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
            raise ConfigError(f"{where} {key}: expected a list of gitignore-style patterns")
        exclude.extend(raw)

    extra = values.get("extra-factories", {})
    if not isinstance(extra, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in extra.items()
    ):
        raise ConfigError(
            f'{where} extra-factories: expected a table of "qualified.name" = "kind" strings'
        )

    config = Config(
        select=select,
        ignore=ignore | extend_ignore,
        extend_select=extend_select,
        per_file_ignores=per_file,
        exclude=tuple(exclude),
        extra_factories=dict(extra),
        root=source.parent if source else None,
        source=source,
    )
    if extra:
        config.table  # noqa: B018 - validate the factory kinds now, not in the middle of a run
    if config.exclude:
        config.exclude_spec  # noqa: B018
    return config


def load_config(start: Path | str) -> Config:
    """[tool.connguard] of the nearest pyproject.toml at or above `start`; defaults without one."""
    found = find_pyproject(Path(start))
    if found is None:
        return Config()
    path, data = found
    return config_from_table(data["tool"]["connguard"], path)
