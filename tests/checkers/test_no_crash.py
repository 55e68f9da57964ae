"""The checker never crashes: every .py of the standard library and of the installed
site-packages is checked, and not one internal error (CG999) may come out. Files that do not
parse for this Python are CG000 findings, which is the expected answer for them."""

from __future__ import annotations

import json
import os
import sysconfig
import time
from pathlib import Path

import pytest
from engine_helpers import assert_no_traceback, run


def corpus() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    # the base interpreter's own site-packages sits inside the stdlib directory: not stdlib
    roots = [str(p) for p in sorted(stdlib.iterdir()) if p.name != "site-packages"]
    roots.append(sysconfig.get_paths()["purelib"])
    return roots


@pytest.mark.slow
def test_zero_internal_errors_over_stdlib_and_site_packages(tmp_path):
    started = time.monotonic()
    # --select CG000: every rule still runs (selection filters afterwards) but the output stays
    # small; CG999 can never be deselected, so it would show.
    result = run(
        "-j",
        str(min(2, os.cpu_count() or 1)),
        "--format",
        "json",
        "--select",
        "CG000",
        *corpus(),
        cwd=tmp_path,
    )
    elapsed = time.monotonic() - started
    assert_no_traceback(result)
    rows = json.loads(result.stdout)
    internal = [r for r in rows if r["code"] == "CG999"]
    assert internal == [], "\n".join(f"{r['path']}: {r['message']}" for r in internal[:20])
    assert result.returncode in (0, 2), result.stderr
    unparsable = [r for r in rows if r["code"] == "CG000"]
    # the stdlib ships deliberately broken files (lib2to3's Python 2 grammar samples, the
    # tests' badsyntax modules): they must come out as CG000, not be skipped or crash
    assert any("badsyntax" in r["path"] or "lib2to3" in r["path"] for r in unparsable), unparsable[
        :5
    ]
    print(f"\n{len(unparsable)} unparsable files, {elapsed:.1f}s")


def _analyse_unfiltered(path: str) -> str | None:
    """Every rule on one file, prefilter bypassed; an exception other than a parse error is
    returned as text (so a crash in a worker is reported, not lost)."""
    import libcst

    from connguard.checkers import analysis
    from connguard.checkers.config import Config
    from connguard.checkers.engine import read_file, resolver_for
    from connguard.checkers.rules import RULES

    config = Config()
    try:
        source = read_file(path)
    except (OSError, ValueError):
        return None
    resolver = resolver_for(config)
    try:
        module, _is_package = resolver.register_file(Path(path))
        analysis.check_module(
            source,
            path,
            table=config.table,
            imports=resolver,
            module_name=module,
            enabled=set(RULES),
        )
    except libcst.ParserSyntaxError:
        return None
    except RecursionError:
        return None  # absurd nesting: the engine reports it as CG000
    except Exception as exc:  # noqa: BLE001 - this is the point of the test
        return f"{path}: {type(exc).__name__}: {exc}"
    return None


@pytest.mark.slow
def test_analysis_survives_every_stdlib_module_without_the_prefilter():
    """The prefilter spares most files the analysis; here the analysis itself meets all of
    the standard library, so a crash it would hit in a user's odd module shows up now."""
    from concurrent.futures import ProcessPoolExecutor

    from connguard.checkers.config import Config
    from connguard.checkers.discovery import collect_files

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    roots = [str(p) for p in sorted(stdlib.iterdir()) if p.name != "site-packages"]
    files = collect_files(roots, Config())
    assert len(files) > 1000
    with ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        crashes = [c for c in pool.map(_analyse_unfiltered, files, chunksize=16) if c]
    assert crashes == [], "\n".join(crashes[:20])
