"""`check-async-resources`: the command-line adapter over the engine (and the fixer)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from connguard.checkers.config import (
    Config,
    ConfigError,
    Selection,
    config_from_table,
    load_config,
    parse_codes,
)

if TYPE_CHECKING:
    from connguard.checkers.findings import Finding

PROG = "check-async-resources"
EXIT_CLEAN, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2


class UsageError(Exception):
    """A bad command line or environment; printed as one line, exit 2."""


def _jobs(value: str) -> int:
    if value == "auto":
        return 0
    try:
        jobs = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {value!r}") from None
    if jobs < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return jobs


def build_parser() -> argparse.ArgumentParser:
    from connguard import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Find async database sessions, connections, pools and engines that are "
        "not released on every path (codes CG1xx).",
    )
    parser.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="files or directories to check ('-' for stdin; default: .)",
    )
    parser.add_argument(
        "--select", metavar="CODES", help="only these codes or prefixes, comma separated"
    )
    parser.add_argument("--ignore", metavar="CODES", help="skip these codes or prefixes")
    parser.add_argument("--extend-select", metavar="CODES", help="add to the configured selection")
    parser.add_argument("--extend-ignore", metavar="CODES", help="add to the configured ignores")
    parser.add_argument(
        "--format",
        choices=("text", "json", "sarif", "github"),
        default="text",
        help="output format (default: text)",
    )
    parser.add_argument(
        "--exit-zero",
        action="store_true",
        help="exit 0 even when findings are reported (internal errors still exit 2)",
    )
    parser.add_argument("--statistics", action="store_true", help="count findings per code")
    parser.add_argument(
        "-j",
        "--jobs",
        type=_jobs,
        default=0,
        metavar="N",
        help="parallel processes (default: auto)",
    )
    parser.add_argument(
        "--explain", metavar="CODE", help="print the documentation of a rule and exit"
    )
    parser.add_argument(
        "--fix", action="store_true", help="rewrite what can safely become `async with`"
    )
    parser.add_argument(
        "--diff", action="store_true", help="print the fixes as a diff; write nothing"
    )
    parser.add_argument(
        "--stdin-filename",
        metavar="PATH",
        help="the path to report (and configure) for source read from '-'",
    )
    parser.add_argument(
        "--config",
        metavar="PYPROJECT",
        help="read [tool.connguard] from this file instead of searching",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return parser


# -- explain ------------------------------------------------------------------------------
def explain(code: str) -> str:
    """The documentation of one rule, generated from its class."""
    import inspect

    from connguard.checkers.rules import RULES

    rule = RULES.get(code.strip().upper())
    if rule is None:
        known = ", ".join(sorted(RULES)) or "none"
        raise UsageError(f"unknown rule code {code!r} (known: {known})")
    documentation = getattr(rule, "documentation", None)
    if callable(documentation):
        text = str(documentation())
        if not getattr(rule, "DEFAULT_ENABLED", True):
            text += f"\nThis rule is off by default: enable it with --extend-select {rule.CODE}.\n"
        return text
    name = getattr(rule, "NAME", "")
    out = [f"{rule.CODE} ({name})" if name else rule.CODE, ""]
    message = getattr(rule, "MESSAGE", "")
    if message:
        out += [f"Message: {message}", ""]
    doc = inspect.cleandoc(rule.__doc__ or "")
    if doc:
        out += [doc, ""]
    return "\n".join(out)


# -- configuration ------------------------------------------------------------------------
def _load(args: argparse.Namespace) -> tuple[Config, Selection | None]:
    """The run's config (discovery, stdin) and, unless --config fixes one config for all, the
    command line's selection to lay over each file's nearest pyproject.toml."""
    if args.config:
        path = Path(args.config)
        from connguard.checkers.config import _load_toml

        if not path.is_file():
            raise UsageError(f"--config {args.config}: no such file")
        data = _load_toml(path)
        table = data.get("tool", {}).get("connguard", {})
        config = config_from_table(table, path.resolve())
    else:
        config = load_config(_config_start(args))

    def codes(value: str | None, flag: str) -> frozenset[str] | None:
        return None if value is None else parse_codes(value, flag)

    selection = Selection(
        select=codes(args.select, "--select"),
        ignore=codes(args.ignore, "--ignore"),
        extend_select=codes(args.extend_select, "--extend-select"),
        extend_ignore=codes(args.extend_ignore, "--extend-ignore"),
    )
    return selection.apply(config), (None if args.config else selection)


def _config_of(path: str, config: Config, selection: Selection | None) -> Config:
    from connguard.checkers import engine

    if selection is None or path == "-":
        return config
    return engine.file_config(path, selection)


def _config_start(args: argparse.Namespace) -> Path:
    candidates = [p for p in args.paths if p != "-"]
    if "-" in args.paths and args.stdin_filename:
        candidates.append(args.stdin_filename)
    if not candidates:
        return Path.cwd()
    try:
        common = os.path.commonpath([os.path.abspath(p) for p in candidates])
    except ValueError:  # different drives
        return Path.cwd()
    return Path(common)


# -- running ------------------------------------------------------------------------------
def _read_stdin() -> str:
    from connguard.checkers.imports import decode_source

    data = sys.stdin.buffer.read()
    try:
        return decode_source(data)
    except ValueError as exc:
        raise UsageError(f"stdin: cannot decode: {exc}") from None


def _emit(
    args: argparse.Namespace, findings: list, successful: bool, notes: dict | None = None
) -> None:
    """Print `findings` in the chosen format; `notes`: text to add to some (text format)."""
    from connguard.checkers import output

    if args.format == "sarif":
        sys.stdout.write(output.format_sarif(findings, successful=successful))
    elif notes:
        sys.stdout.write(output.format_text(findings, notes))
    else:
        sys.stdout.write(output.FORMATTERS[args.format](findings))
    if args.statistics:
        stream = sys.stdout if args.format in ("text", "github") else sys.stderr
        stream.write(output.format_statistics(findings))


def _run_check(args: argparse.Namespace, config: Config, selection: Selection | None) -> int:
    from connguard.checkers import engine

    paths = args.paths or ["."]
    if "-" in paths:
        if len(paths) > 1:
            raise UsageError("'-' (stdin) cannot be combined with other paths")
        name = args.stdin_filename or "-"
        source = _read_stdin()
        report = engine.Report(files=1, lines=source.count("\n") + 1)
        for finding in engine.check_source(source, name, _config_of(name, config, selection)):
            (report.errors if finding.code == "CG999" else report.findings).append(finding)
    else:
        from connguard.checkers.discovery import PathError

        try:
            report = engine.check_paths(paths, config, jobs=args.jobs, selection=selection)
        except PathError as exc:
            raise UsageError(str(exc)) from None
    _emit(args, report.all, successful=not report.errors)
    if report.errors:
        print(
            f"{PROG}: {len(report.errors)} internal error(s) (CG999): those files were not "
            "fully checked; please report them",
            file=sys.stderr,
        )
    return report.exit_code(exit_zero=args.exit_zero)


def _run_fix(args: argparse.Namespace, config: Config, selection: Selection | None) -> int:
    """--fix / --diff: hand each file to the fixer, then report what is left."""
    try:
        from connguard.checkers import fixes
    except ImportError as exc:
        raise UsageError(f"--fix/--diff are not available: {exc}") from None
    from connguard.checkers import engine

    paths = args.paths or ["."]
    changed = 0
    remaining: list = []
    # What the fixer left, in order: (finding, why it was not fixed), or (None, a file's line)
    left: list[tuple[Finding | None, str]] = []
    if "-" in paths:
        if len(paths) > 1:
            raise UsageError("'-' (stdin) cannot be combined with other paths")
        name = args.stdin_filename or "-"
        source = _read_stdin()
        config = _config_of(name, config, selection)
        outcome = fixes.fix_source(source, name, config)
        if args.diff:
            sys.stdout.write(fixes.render_diff(source, outcome.source, name))
        else:
            sys.stdout.write(outcome.source)
        changed += outcome.source != source
        remaining = engine.check_source(outcome.source, name, config)
        # --fix prints the fixed text: positions are that text's; --diff's are the input's.
        left += outcome.declined if args.diff else fixes.declined_after(outcome, remaining)
    else:
        from connguard.checkers.discovery import PathError, collect_files

        try:
            files = collect_files(list(paths), config)
        except PathError as exc:
            raise UsageError(str(exc)) from None
        if selection is not None:
            files = [f for f in files if not engine.file_config(f, selection).is_excluded(f)]
        for path in files:
            file_config = _config_of(path, config, selection)
            try:
                outcome = fixes.fix_file(path, file_config, write=not args.diff)
            except (OSError, ValueError) as exc:
                left.append((None, f"{path}:1:1: not fixed: cannot read: {exc}"))
                remaining += engine.check_file(path, file_config)
                continue
            if outcome.source != (
                outcome.original if outcome.original is not None else outcome.source
            ):
                changed += 1
                if args.diff:
                    sys.stdout.write(
                        fixes.render_diff(outcome.original or "", outcome.source, path)
                    )
            # Every position printed is one of the file as the run leaves it on disk: --diff
            # writes nothing, so the fixer's own (pre-fix) positions; --fix, the re-check's.
            if args.diff:
                left += outcome.declined
                remaining += engine.check_source(outcome.source, path, file_config)
            else:
                after = engine.check_file(path, file_config)
                left += fixes.declined_after(outcome, after)
                remaining += after
    remaining = sorted(remaining)
    notes: dict = {}
    if not args.diff and "-" not in paths:  # stdout lists what is left
        if args.format == "text":
            # Each finding left once, with why it was not fixed, as ruff prints it (not again
            # on stderr).
            notes = {finding: why for finding, why in left if finding is not None}
        _emit(
            args, remaining, successful=not any(f.code == "CG999" for f in remaining), notes=notes
        )
    for finding, why in left:
        if finding is None:
            print(why, file=sys.stderr)
        elif finding not in notes:
            print(f"{finding.text()} (not fixed: {why})", file=sys.stderr)
    verb = "would fix" if args.diff else "fixed"
    print(f"{verb} {changed} file(s); {len(left)} finding(s) left for a person", file=sys.stderr)
    report = engine.Report(
        findings=[f for f in remaining if f.code != "CG999"],
        errors=[f for f in remaining if f.code == "CG999"],
    )
    code = report.exit_code(exit_zero=args.exit_zero)
    if args.diff and changed and not args.exit_zero:
        code = max(code, EXIT_FINDINGS)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.explain:
            sys.stdout.write(explain(args.explain))
            return EXIT_CLEAN
        from connguard.checkers import engine

        engine.reset_caches()  # main() may run many times in one process (hooks, tests)
        config, selection = _load(args)
        if args.fix or args.diff:
            return _run_fix(args, config, selection)
        return _run_check(args, config, selection)
    except (UsageError, ConfigError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`| head`); stay quiet, as Unix tools do
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keep the interpreter's flush quiet
        except OSError:
            pass
        return EXIT_ERROR
    except Exception as exc:  # the last boundary: one line, never a traceback
        print(f"{PROG}: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
