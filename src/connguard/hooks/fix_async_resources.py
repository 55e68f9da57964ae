"""pre-commit entry of the fix hook: rewrite leaked creations into `async with`, say what was left.

Exit status follows pre-commit's convention for fixers: 1 when a file was rewritten (the commit
must be re-staged), and also 1 when a fixable finding had to be declined, because pre-commit
hides the output of a passing hook and a declined leak must not pass unseen. 2: usage error or
a file that cannot be read.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fix-async-resources",
        description="Rewrite database resources that are never safely closed into `async with`.",
    )
    parser.add_argument("files", nargs="*", help="Python files to fix (pre-commit passes these)")
    parser.add_argument(
        "--select", help="only these codes (comma separated), as in [tool.connguard]"
    )
    parser.add_argument("--ignore", help="skip these codes (comma separated)")
    parser.add_argument("--extend-select", help="codes added to the configured selection")
    parser.add_argument("--extend-ignore", help="codes added to the configured ignores")
    parser.add_argument(
        "--diff", action="store_true", help="print a unified diff and write nothing"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))

    from connguard.checkers.config import ConfigError, parse_codes
    from connguard.checkers.engine import config_for_path
    from connguard.checkers.fixes import fix_file, render_diff

    def codes(value: str | None, option: str) -> frozenset[str] | None:
        return None if value is None else parse_codes(value, option)

    try:
        selection = {
            "select": codes(args.select, "--select"),
            "ignore": codes(args.ignore, "--ignore"),
            "extend_select": codes(args.extend_select, "--extend-select"),
            "extend_ignore": codes(args.extend_ignore, "--extend-ignore"),
        }
    except ConfigError as exc:
        print(f"fix-async-resources: {exc}", file=sys.stderr)
        return 2

    status = 0
    for path in args.files:
        try:
            config = config_for_path(path)
            if config.is_excluded(path):
                continue
            config = config.with_selection(**selection)
            outcome = fix_file(path, config, write=not args.diff)
        except ConfigError as exc:
            print(f"fix-async-resources: {exc}", file=sys.stderr)
            return 2
        except (OSError, ValueError) as exc:  # ValueError: undecodable, or a bad coding cookie
            reason = getattr(exc, "strerror", None) or str(exc)
            print(f"{path}: cannot fix: {reason}", file=sys.stderr)
            status = 2
            continue
        if args.diff:
            sys.stdout.write(render_diff(outcome.original or "", outcome.source, path))
        verb = "can be fixed" if args.diff else "fixed"
        for finding in outcome.applied:
            where = f"{finding.path}:{finding.line}:{finding.col}"
            print(f"{where}: {finding.code} {verb}: now a `with`/`async with` block")
        for finding, reason in outcome.declined:
            where = f"{finding.path}:{finding.line}:{finding.col}"
            print(f"{where}: {finding.code} not fixed: {reason}")
        if outcome.changed or outcome.declined:
            status = max(status, 1)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
