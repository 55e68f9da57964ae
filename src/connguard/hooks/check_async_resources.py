"""pre-commit entry of the check hook: `check-async-resources` on the files pre-commit passes.

pre-commit runs hooks from the repository root with the staged file names as arguments, so the
CLI's own discovery of the nearest pyproject.toml ([tool.connguard]) and its options (the
hook's `args:`) apply unchanged; this module exists so the hook has the name reviewers know.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from connguard.checkers.cli import main as cli_main

    return cli_main(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    raise SystemExit(main())
