"""The hook entry points and the codemod command, run the way pre-commit and users run them."""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from connguard.hooks import check_async_resources, fix_async_resources

GOLDEN = Path(__file__).resolve().parents[1] / "fixes" / "golden"
LEAK = (GOLDEN / "seed_outage.in.py").read_text()
FIXED = (GOLDEN / "seed_outage.out.py").read_text()
ESCAPES = """\
from sqlalchemy.ext.asyncio import async_sessionmaker

AsyncSessionLocal = async_sessionmaker()


async def list_agents(repo):
    session = AsyncSessionLocal()
    return await repo.list(session)
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "p"\nversion = "0"\n')
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_fix_hook_rewrites_and_exits_1_then_0(project, capsys):
    (project / "routes.py").write_text(LEAK)
    assert fix_async_resources.main(["routes.py"]) == 1
    out = capsys.readouterr().out
    assert "routes.py:12:15: CG101 fixed" in out
    assert (project / "routes.py").read_text() == FIXED

    assert fix_async_resources.main(["routes.py"]) == 0
    assert capsys.readouterr().out == ""


def test_fix_hook_diff_writes_nothing(project, capsys):
    (project / "routes.py").write_text(LEAK)
    assert fix_async_resources.main(["--diff", "routes.py"]) == 1
    out = capsys.readouterr().out
    assert "+++ b/routes.py" in out
    assert "+    async with AsyncSessionLocal() as session:" in out
    assert (project / "routes.py").read_text() == LEAK


def test_fix_hook_reports_what_it_declined_and_leaves_the_file(project, capsys):
    (project / "deps.py").write_text(ESCAPES)
    assert fix_async_resources.main(["deps.py"]) == 1
    out = capsys.readouterr().out
    assert "deps.py:7:" in out and "not fixed: `session` is passed on to other code" in out
    assert (project / "deps.py").read_text() == ESCAPES


def test_fix_hook_honours_selection_and_config(project, capsys):
    (project / "routes.py").write_text(LEAK)
    assert fix_async_resources.main(["--select", "CG102", "routes.py"]) == 0
    assert (project / "routes.py").read_text() == LEAK

    (project / "pyproject.toml").write_text('[tool.connguard]\nexclude = ["generated/"]\n')
    (project / "generated").mkdir()
    (project / "generated" / "routes.py").write_text(LEAK)
    assert fix_async_resources.main(["generated/routes.py"]) == 0
    assert (project / "generated" / "routes.py").read_text() == LEAK
    capsys.readouterr()


def test_fix_hook_bad_input_is_one_line_and_exit_2(project, capsys):
    assert fix_async_resources.main(["missing.py"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("missing.py: cannot fix:")
    (project / "cookie.py").write_text("# -*- coding: no-such-codec -*-\n" + LEAK)
    assert fix_async_resources.main(["cookie.py"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cookie.py: cannot fix:")
    assert fix_async_resources.main(["--select", "nonsense", "x.py"]) == 2
    assert "nonsense" in capsys.readouterr().err


def test_check_hook_reports_and_honours_args_and_config(project, capsys):
    (project / "routes.py").write_text(LEAK)
    assert check_async_resources.main(["routes.py"]) == 1
    assert "routes.py:12:15: CG101" in capsys.readouterr().out
    assert check_async_resources.main(["--select", "CG102", "routes.py"]) == 0
    capsys.readouterr()
    (project / "pyproject.toml").write_text('[tool.connguard]\nignore = ["CG101"]\n')
    assert check_async_resources.main(["routes.py"]) == 0


def _cold(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess[str], float, float]:
    """Run a fresh interpreter; return its result, wall seconds and CPU seconds (user + sys)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return proc, wall, cpu


def test_check_hook_module_runs_cold_and_fast(project):
    (project / "routes.py").write_text(LEAK)
    args = ["-m", "connguard.hooks.check_async_resources", "routes.py"]
    _cold(args, project)  # warm the OS file cache, as a developer's machine is
    proc, wall, cpu = _cold(args, project)
    assert proc.returncode == 1, proc.stderr
    assert "routes.py:12:15: CG101" in proc.stdout
    # The budget is 0.5 s wall on an idle machine. CPU time is what the hook costs whatever
    # else the machine is doing (a loaded CI runner stretches wall time, not CPU time).
    assert cpu < 0.5, f"cold check of one file used {cpu:.2f}s CPU ({wall:.2f}s wall)"
    assert wall < 5, f"cold check of one file took {wall:.2f}s wall"


def test_libcst_codemod_command(project):
    (project / "pkg").mkdir()
    leak, escapes = project / "pkg" / "routes.py", project / "pkg" / "deps.py"
    leak.write_text(LEAK)
    escapes.write_text(ESCAPES)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "libcst.tool",
            "codemod",
            "-x",  # the command by module path: no .libcst.codemod.yaml needed
            "--no-format",  # else libcst.tool pipes every changed file through black
            "--jobs=2",  # `-j 2` would be taken for the command by libcst.tool's first parser
            "--hide-progress",
            "connguard.checkers.codemod.AsyncWithCommand",
            "pkg",
        ],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert leak.read_text() == FIXED
    assert escapes.read_text() == ESCAPES
    assert "7:15: CG101 not fixed: `session` is passed on to other code" in proc.stderr


REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("command", "name"),
    [
        ("validate-manifest", ".pre-commit-hooks.yaml"),
        ("validate-config", ".pre-commit-config.yaml"),
    ],
)
def test_pre_commit_files_are_valid(command, name):
    proc = subprocess.run(
        [sys.executable, "-m", "pre_commit", command, str(REPO / name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_offered_hooks_are_the_documented_ones():
    import yaml

    hooks = {h["id"]: h for h in yaml.safe_load((REPO / ".pre-commit-hooks.yaml").read_text())}
    assert set(hooks) == {"check-async-resources", "fix-async-resources"}
    for hook_id, hook in hooks.items():
        assert hook["entry"] == hook_id
        assert hook["language"] == "python"
        assert hook["types"] == ["python"]


def test_connguard_passes_its_own_dogfood_hook():
    # What `pre-commit run check-async-resources --all-files` checks in this repository: every
    # Python file outside the hook's `exclude` (the deliberate leaks) is clean.
    import re

    import yaml

    from connguard.checkers.engine import check_file

    config = yaml.safe_load((REPO / ".pre-commit-config.yaml").read_text())
    hook = next(
        h for repo in config["repos"] for h in repo["hooks"] if h["id"] == "check-async-resources"
    )
    exclude = re.compile(hook["exclude"])
    listed = subprocess.run(
        ["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, check=False
    )
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    files = [f for f in listed.stdout.split() if not exclude.search(f)]
    assert files
    findings = [f.text() for path in files for f in check_file(REPO / path)]
    assert findings == []
