"""The one path from source text to findings: prefilter, parse once, all rules, noqa, selection.

Every adapter (CLI, flake8, pre-commit hooks, the fixer, the leak detector) comes through here.
Each file has one error boundary: a file that does not parse becomes a CG000 finding, a bug in
our own code becomes one CG999 line, and neither stops the other files.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from connguard.checkers.config import (
    ENGINE_CODES,
    INTERNAL_ERROR,
    PARSE_ERROR,
    Config,
    ConfigError,
    Selection,
    config_from_table,
    find_pyproject,
)
from connguard.checkers.findings import Finding
from connguard.checkers.imports import (
    ProjectImports,
    binds_table_name,
    code_only,
    decode_source,
    module_name_for,
)

# flake8's spelling: a bare "noqa" comment, or "noqa" with a colon and a list of codes.
# flake8's form: a code is letters then digits (CG101, E501), so a list naming another code
# suppresses nothing of ours, and one naming ours among others suppresses it.
_NOQA = re.compile(
    r"#\s*noqa(?::[\s]?(?P<codes>[A-Z]+[0-9]+(?:[,\s]+[A-Z]+[0-9]+)*))?", re.IGNORECASE
)
_LINE_BREAK = re.compile(r"\r\n|\r|\n")

# With automatic -j, less source than this is checked in-process: a pool (fork, then LibCST
# imported in every worker) costs more than it saves on the few files a pre-commit run hands us.
_POOL_MIN_BYTES = 256 * 1024


@dataclass
class Report:
    """The outcome of a run over many files."""

    findings: list[Finding] = field(default_factory=list)  # rule findings and CG000, sorted
    errors: list[Finding] = field(default_factory=list)  # CG999: our bugs, one per file
    files: int = 0
    lines: int = 0

    @property
    def parse_errors(self) -> list[Finding]:
        return [f for f in self.findings if f.code == PARSE_ERROR]

    @property
    def all(self) -> list[Finding]:
        return sorted([*self.findings, *self.errors])

    def exit_code(self, exit_zero: bool = False) -> int:
        """1 for findings; 2 for an internal error, or when the only findings are CG000."""
        if self.errors:
            return 2
        if exit_zero:
            return 0
        if any(f.code not in ENGINE_CODES for f in self.findings):
            return 1
        if self.findings:
            return 2
        return 0


# -- per-process state --------------------------------------------------------------------
_RESOLVERS: dict[int, tuple[Config, ProjectImports]] = {}


def may_hold_finding(source: str, path: str, config: Config) -> bool:
    """The prefilter, no parse: a resource name in the text (resources.may_hold_resource) AND an
    import that binds a table name, or else an import of a project module's maker/factory."""
    from connguard.checkers import resources

    table = config.table
    resolver = resolver_for(config)
    module, is_package = _module_of(path, resolver)
    if "import" not in source:
        return False
    code = source
    if resources.may_hold_resource(source, table):
        code = code_only(source)
        if binds_table_name(
            code,
            resolver.table_names,
            module,
            is_package,
            types=resolver.table_types,
            factories=resolver.table_factories,
            used=True,
            source_types=resolver.table_source_types,
        ):
            return True
    if resolver.imports_factory(code, module, is_package):
        return True
    return _NAMED_SOURCE_USE.search(source) is not None


# `await bot.pool.acquire()`, `await async_engine.connect()`: a source from elsewhere, known by
# its name (resources.NAMED_SOURCES).
_NAMED_SOURCE_USE = re.compile(
    r"await\s+[\w.]*(?:pool\s*\.\s*acquire|engine\s*\.\s*connect)\s*\(", re.IGNORECASE
)


def resolver_for(config: Config) -> ProjectImports:
    """The cross-module resolver of this config, shared by all files of this process."""
    entry = _RESOLVERS.get(id(config))
    if entry is None or entry[0] is not config:
        resolver = ProjectImports(config.table)
        if config.root is not None:
            resolver.add_project_roots(config.root)
        resolver.add_project_roots(Path.cwd())
        entry = (config, resolver)
        _RESOLVERS[id(config)] = entry
    return entry[1]


_DEFAULT_CONFIG = Config()
_CONFIGS: dict[Path, Config] = {}


@lru_cache(maxsize=256)
def _config_for_dir(directory: str) -> Config:
    # one Config object per pyproject.toml, so every file under it shares one resolver cache
    found = find_pyproject(Path(directory))
    if found is None:
        return _DEFAULT_CONFIG
    path, data = found
    if path not in _CONFIGS:
        _CONFIGS[path] = config_from_table(data["tool"]["connguard"], path)
    return _CONFIGS[path]


def config_for_path(path: str | Path) -> Config:
    """The config that applies to `path` (nearest pyproject.toml), cached per directory."""
    directory = os.path.dirname(os.path.abspath(str(path))) or "."
    return _config_for_dir(directory)


_DERIVED: dict[tuple[int, Selection], tuple[Config, Config]] = {}


def reset_caches() -> None:
    """Forget configs, resolvers and module summaries: a run starts from what is on disk.
    (Within a process they are kept; a long-lived caller that edits files calls this.)"""
    _config_for_dir.cache_clear()
    _CONFIGS.clear()
    _DERIVED.clear()
    _RESOLVERS.clear()


def file_config(path: str | Path, selection: Selection) -> Config:
    """The nearest pyproject.toml's config for `path` with the command line's selection on
    top; one object per (pyproject, selection), so files of one project share a resolver."""
    base = config_for_path(path)
    key = (id(base), selection)
    entry = _DERIVED.get(key)
    if entry is None or entry[0] is not base:
        entry = (base, selection.apply(base))
        _DERIVED[key] = entry
    return entry[1]


# -- one file -----------------------------------------------------------------------------
def _internal_error(path: str, exc: BaseException) -> Finding:
    where = ""
    tb = exc.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if "connguard" in filename:
            where = f" ({os.path.basename(filename)}:{tb.tb_lineno})"
        tb = tb.tb_next
    detail = " ".join(str(exc).split())[:200]
    message = f"internal error: {type(exc).__name__}: {detail}{where}"
    return Finding(path, 1, 1, INTERNAL_ERROR, message)


def _is_parse_error(exc: BaseException) -> bool:
    names = {cls.__name__ for cls in type(exc).__mro__}
    return "ParserSyntaxError" in names or "ParseError" in names


def _parse_error(path: str, exc: BaseException) -> Finding:
    line = getattr(exc, "editor_line", None) or getattr(exc, "lineno", None) or 1
    col = getattr(exc, "editor_column", None) or 1
    message = getattr(exc, "message", None) or str(exc)
    message = " ".join(str(message).split())[:200].removeprefix("parser error: ")
    return Finding(path, int(line), max(int(col), 1), PARSE_ERROR, f"cannot parse: {message}")


def _syntax_error(source: str, path: str) -> Finding | None:
    """CPython's verdict on a file the prefilter let pass unparsed (its C parser costs about a
    twentieth of a LibCST parse), so that a broken file is CG000 whatever it contains."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compile(source, path, "exec", flags=_ONLY_AST, dont_inherit=True)
    except SyntaxError as exc:
        if _newer_syntax(source):
            return None
        line, col = exc.lineno or 1, exc.offset or 1
        message = " ".join(str(exc.msg).split())[:200]
        return Finding(path, max(line, 1), max(col, 1), PARSE_ERROR, f"cannot parse: {message}")
    except (ValueError, RecursionError, MemoryError) as exc:
        message = " ".join(str(exc).split())[:200] or type(exc).__name__
        return Finding(path, 1, 1, PARSE_ERROR, f"cannot parse: {message}")
    return None


def _newer_syntax(source: str) -> bool:
    """Code written for a newer Python than the one running us (`type X = ...`, `class C[T]:`,
    `except A, B:`) is valid to its authors; LibCST's grammar knows it, so only its verdict makes
    a file CG000. Paid only for files CPython rejects."""
    import libcst as cst

    try:
        cst.parse_module(source)
    except Exception:
        return False
    return True


_ONLY_AST = 0x400  # ast.PyCF_ONLY_AST, without importing ast


def analyse(
    source: str, path: str, config: Config, *, syntax_check: bool = True, select: bool = True
) -> list[Finding]:
    """Raw findings (no noqa). Never raises for any input: a parse error is one CG000
    finding, an internal error one CG999 finding. `syntax_check` also reports CG000 for files
    the prefilter skips; `select=False` runs every rule that is on by default or named in the
    config, ignoring the config's ignores (flake8 does both of those itself)."""
    try:
        table = config.table
        resolver = resolver_for(config)
        module, is_package = _module_of(path, resolver)
        if not may_hold_finding(source, path, config):
            if syntax_check:
                error = _syntax_error(source, path)
                return [error] if error is not None else []
            return []
        if "\x00" in source:
            return [Finding(path, 1, 1, PARSE_ERROR, "cannot parse: source contains a null byte")]
        from connguard.checkers import analysis

        return list(
            analysis.check_module(
                source,
                path,
                table=table,
                imports=resolver,
                module_name=module,
                enabled=rule_codes(config, path) if select else flake8_rule_codes(config),
            )
        )
    except RecursionError as exc:
        # LibCST recurses per nesting level; pathologically nested code is unparsable to us.
        if _is_parse_error(exc):
            return [_parse_error(path, exc)]
        return [Finding(path, 1, 1, PARSE_ERROR, "cannot parse: nesting too deep to analyse")]
    except Exception as exc:
        if _is_parse_error(exc):
            return [_parse_error(path, exc)]
        return [_internal_error(path, exc)]


def rule_codes(config: Config, path: str | None = None) -> frozenset[str]:
    """The rules to run: selected, not ignored, and on by default unless named explicitly."""
    from connguard.checkers.rules import RULES

    return frozenset(
        code
        for code, rule in RULES.items()
        if config.enabled(code, path)
        and (getattr(rule, "DEFAULT_ENABLED", True) or config.named(code))
    )


def flake8_rule_codes(config: Config) -> frozenset[str]:
    from connguard.checkers.rules import RULES

    return frozenset(
        code
        for code, rule in RULES.items()
        if getattr(rule, "DEFAULT_ENABLED", True) or config.named(code)
    )


def _module_of(path: str, resolver: ProjectImports) -> tuple[str | None, bool]:
    if path in ("-", "<stdin>", "stdin", ""):
        return None, False
    try:
        return resolver.register_file(Path(path))
    except (OSError, ValueError):
        return module_name_for(Path(path))[0], False


def _noqa_codes(line_text: str) -> frozenset[str] | None:
    """None: no noqa; empty set: bare `# noqa` (everything); else the listed codes."""
    match = _NOQA.search(line_text)
    if match is None:
        return None
    codes = match.group("codes")
    if not codes:
        return frozenset()
    return frozenset(c.upper() for c in re.split(r"[,\s]+", codes) if c)


def apply_noqa(findings: list[Finding], source: str) -> list[Finding]:
    if not findings or "noqa" not in source.lower():
        return findings
    lines = _LINE_BREAK.split(source)
    kept = []
    for finding in findings:
        if finding.code not in ENGINE_CODES and 0 < finding.line <= len(lines):
            codes = _noqa_codes(lines[finding.line - 1])
            if codes is not None and (not codes or finding.code in codes):
                continue
        kept.append(finding)
    return kept


def check_source(
    source: str, path: str, config: Config | None = None, *, noqa: bool = True
) -> list[Finding]:
    """Findings for one file's text: selection, per-file-ignores and (unless told) `# noqa`
    applied, sorted. `config=None` uses the pyproject.toml nearest to `path`."""
    if config is None:
        config = config_for_path(path) if path not in ("-", "") else Config()
    findings = analyse(source, path, config)
    if findings:
        codes = rule_codes(config, path)
        findings = [
            f
            for f in findings
            if f.code in codes or (f.code in ENGINE_CODES and config.enabled(f.code, path))
        ]
    if noqa:
        findings = apply_noqa(findings, source)
    return sorted(findings)


def read_file(path: str | Path) -> str:
    """A file's text as Python reads it; raises OSError / ValueError (undecodable)."""
    with open(path, "rb") as fh:
        data = fh.read()
    return decode_source(data)


def check_file(path: str | Path, config: Config | None = None) -> list[Finding]:
    """Findings for one file on disk; an unreadable or undecodable file is one CG000."""
    path = str(path)
    if config is None:
        config = config_for_path(path)
    try:
        source = read_file(path)
    except OSError as exc:
        finding = Finding(path, 1, 1, PARSE_ERROR, f"cannot read: {exc.strerror or exc}")
        return [finding] if config.enabled(PARSE_ERROR, path) else []
    except ValueError as exc:
        finding = Finding(path, 1, 1, PARSE_ERROR, f"cannot parse: cannot decode: {exc}")
        return [finding] if config.enabled(PARSE_ERROR, path) else []
    return check_source(source, path, config)


def _check_one(path: str, config: Config) -> tuple[list[Finding], int]:
    try:
        source = read_file(path)
    except (OSError, ValueError):
        return check_file(path, config), 0
    return check_source(source, path, config), source.count("\n") + 1


# -- many files ---------------------------------------------------------------------------
_WORKER_CONFIG: Config | None = None
_WORKER_SELECTION: Selection | None = None


def _worker_init(config: Config, selection: Selection | None) -> None:
    global _WORKER_CONFIG, _WORKER_SELECTION
    _WORKER_CONFIG, _WORKER_SELECTION = config, selection


def _check_guarded(
    path: str, config: Config, selection: Selection | None
) -> tuple[list[Finding], int]:
    """One file inside its error boundary; a bad pyproject.toml is a usage error, not ours."""
    try:
        if selection is not None:
            config = file_config(path, selection)
        return _check_one(path, config)
    except ConfigError:
        raise
    except Exception as exc:  # the boundary holds in workers too
        return [_internal_error(path, exc)], 0


def _worker_check(path: str) -> tuple[list[Finding], int]:
    assert _WORKER_CONFIG is not None
    return _check_guarded(path, _WORKER_CONFIG, _WORKER_SELECTION)


def default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def check_files(
    files: Sequence[str], config: Config, jobs: int = 1, *, selection: Selection | None = None
) -> Report:
    """Check already-discovered files, in parallel processes when worth it (jobs=0: as many
    as there are cores, and only for enough source; an explicit jobs > 1 always uses them).
    With `selection`, each file gets its nearest pyproject.toml's config plus `selection`
    (a monorepo's subprojects keep their own settings); without, `config` for every file."""
    auto = jobs <= 0
    jobs = default_jobs() if auto else jobs
    jobs = min(jobs, len(files)) if files else 1
    if auto and jobs > 1 and sum(_size(f) for f in files) < _POOL_MIN_BYTES:
        jobs = 1
    results: list[tuple[list[Finding], int]]
    if jobs <= 1:
        results = [_check_guarded(path, config, selection) for path in files]
    else:
        results = _run_pool(files, config, jobs, selection)
    report = Report(files=len(files))
    for findings, lines in results:
        report.lines += lines
        for finding in findings:
            (report.errors if finding.code == INTERNAL_ERROR else report.findings).append(finding)
    report.findings.sort()
    report.errors.sort()
    return report


def _run_pool(
    files: Sequence[str], config: Config, jobs: int, selection: Selection | None
) -> list[tuple[list[Finding], int]]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # fork shares the parent's imports and config; elsewhere the default start method works.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context(
        "fork" if sys.platform == "linux" and "fork" in methods else None
    )
    config.table  # noqa: B018 - build once, before forking, so workers inherit it
    # big files first, so one large module does not end the run alone on one core
    order = sorted(range(len(files)), key=lambda i: -_size(files[i]))
    ordered = [files[i] for i in order]
    chunk = max(1, min(16, len(files) // (jobs * 8)))
    with ProcessPoolExecutor(
        max_workers=jobs, mp_context=context, initializer=_worker_init, initargs=(config, selection)
    ) as pool:
        outcome = list(pool.map(_worker_check, ordered, chunksize=chunk))
    results: list[tuple[list[Finding], int]] = [([], 0)] * len(files)
    for index, result in zip(order, outcome, strict=True):
        results[index] = result
    return results


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def check_paths(
    paths: Sequence[str], config: Config, jobs: int = 1, *, selection: Selection | None = None
) -> Report:
    """Expand `paths` (files and directories) and check every Python file found.
    Raises discovery.PathError for a path that does not exist. With `selection`, see
    check_files; a subproject's `exclude` then applies to its own files as well."""
    from connguard.checkers.discovery import collect_files

    files = collect_files(list(paths), config)
    if selection is not None:
        files = [f for f in files if not file_config(f, selection).is_excluded(f)]
    return check_files(files, config, jobs, selection=selection)
