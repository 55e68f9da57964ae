"""`python -m connguard`: the same as `check-async-resources`."""

from __future__ import annotations

import sys

from connguard.checkers.cli import main

if __name__ == "__main__":
    sys.exit(main())
