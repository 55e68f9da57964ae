"""Which files a run checks: command-line paths expanded, `.gitignore` and `exclude` honoured."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from connguard.checkers.config import DEFAULT_EXCLUDES, Config


class PathError(Exception):
    """A command-line path that cannot be checked (missing, unreadable)."""


def _spec(lines: list[str]) -> Any:
    import pathspec

    return pathspec.GitIgnoreSpec.from_lines(lines)


def _read_gitignore(directory: Path) -> Any:
    try:
        text = (directory / ".gitignore").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not lines:
        return None
    try:
        return _spec(lines)
    except Exception:
        return None  # a .gitignore we cannot understand filters nothing, like git on bad lines


def _walk(top: Path, config: Config, defaults: Any) -> list[str]:
    """`*.py` under `top`, pruning default-excluded names, `.gitignore`s met on the way, and
    the configured excludes (matched from the config root)."""
    out: list[str] = []
    # each entry: (absolute directory the .gitignore lives in, its spec)
    stack: list[tuple[Path, list[tuple[Path, Any]]]] = [(top, _ancestor_ignores(top))]
    while stack:
        directory, ignores = stack.pop()
        if (directory / ".gitignore").is_file():
            spec = _read_gitignore(directory)
            if spec is not None:
                ignores = [*ignores, (Path(os.path.abspath(directory)), spec)]
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            name = entry.name
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                continue
            if is_dir and defaults.match_file(name + "/"):
                continue
            if not is_dir and not name.endswith(".py"):
                continue
            path = Path(entry.path)
            if _ignored(Path(os.path.abspath(entry.path)), is_dir, ignores) or config.is_excluded(
                entry.path + ("/" if is_dir else "")
            ):
                continue
            if is_dir:
                stack.append((path, ignores))
            else:
                out.append(os.path.normpath(entry.path))
    return out


def _ancestor_ignores(top: Path) -> list[tuple[Path, Any]]:
    """The .gitignore files above `top` up to its git work tree's root, outermost first, as
    git applies them to `check-async-resources src/`. Outside a work tree: none."""
    absolute = Path(os.path.abspath(top))
    if (absolute / ".git").exists():
        return []
    chain = []
    for directory in absolute.parents:
        chain.append(directory)
        if (directory / ".git").exists():
            break
    else:
        return []
    out = []
    for directory in reversed(chain):
        if (directory / ".gitignore").is_file():
            spec = _read_gitignore(directory)
            if spec is not None:
                out.append((directory, spec))
    if _ignored(absolute, True, out):
        # the user named an ignored directory (a virtualenv, an installed package): they want
        # it checked, so the rules that ignore it do not apply below it
        return []
    return out


def _ignored(path: Path, is_dir: bool, ignores: list[tuple[Path, Any]]) -> bool:
    for base, spec in ignores:
        try:
            rel = path.relative_to(base).as_posix()
        except ValueError:
            continue
        if spec.match_file(rel + ("/" if is_dir else "")):
            return True
    return False


def collect_files(paths: list[str], config: Config) -> list[str]:
    """Files to check, in a stable order, each once. Directories are walked for `*.py`;
    files named explicitly are kept whatever their suffix unless `exclude` matches them
    (pre-commit passes explicit files, and users expect their excludes to hold there)."""
    defaults = None
    seen: set[str] = set()
    out: list[str] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            if defaults is None:
                defaults = _spec([f"{d}/" for d in DEFAULT_EXCLUDES])
            found = _walk(path, config, defaults)
        elif path.is_file():
            found = [] if config.is_excluded(raw) else [raw]
        elif path.exists():
            raise PathError(f"{raw}: not a regular file or directory")
        else:
            raise PathError(f"{raw}: no such file or directory")
        for item in found:
            key = os.path.normpath(os.path.abspath(item))
            if key not in seen:
                seen.add(key)
                out.append(item)
    return out
