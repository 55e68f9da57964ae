"""`check-async-resources` as users and CI run it: the installed console script, real files."""

from __future__ import annotations

import json
import re

import pytest
from engine_helpers import (
    EXTRA_FACTORY_PROJECT,
    LEAK,
    LEAK_COL,
    LEAK_LINE,
    PLAIN,
    SAFE,
    assert_no_traceback,
    run,
    write,
)

LINE_RE = re.compile(r"^(?P<path>[^:]+):(?P<line>\d+):(?P<col>\d+): (?P<code>CG\d{3}) (?P<msg>.+)$")


def codes_at(stdout: str) -> set[tuple[str, int, str]]:
    out = set()
    for line in stdout.splitlines():
        m = LINE_RE.match(line)
        assert m, f"not a finding line: {line!r}"
        out.add((m["path"], int(m["line"]), m["code"]))
    return out


def test_leak_is_reported_at_the_creating_call_with_exit_1(tmp_path):
    write(tmp_path, {"app/routes.py": LEAK})
    result = run("app/routes.py", cwd=tmp_path)
    assert_no_traceback(result)
    assert result.returncode == 1
    assert f"app/routes.py:{LEAK_LINE}:{LEAK_COL}: CG101 " in result.stdout
    codes_at(result.stdout)  # every line has the documented shape


def test_clean_files_exit_0_and_print_nothing(tmp_path):
    write(tmp_path, {"a.py": SAFE, "b.py": PLAIN})
    result = run(".", cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_default_path_is_the_working_directory(tmp_path):
    write(tmp_path, {"pkg/mod.py": LEAK})
    result = run(cwd=tmp_path)
    assert result.returncode == 1
    assert f"pkg/mod.py:{LEAK_LINE}:{LEAK_COL}: CG101" in result.stdout


def test_unparsable_file_is_cg000_and_exit_2_when_alone(tmp_path):
    write(tmp_path, {"broken.py": "from sqlalchemy.ext.asyncio import AsyncSession\ndef f(:\n"})
    result = run("broken.py", cwd=tmp_path)
    assert_no_traceback(result)
    assert result.returncode == 2
    assert len(result.lines) == 1
    assert re.match(r"^broken\.py:\d+:\d+: CG000 cannot parse: ", result.stdout)


def test_unparsable_file_does_not_stop_the_others(tmp_path):
    write(
        tmp_path,
        {"a_broken.py": "import asyncpg\nclass (:\n", "b_leak.py": LEAK, "c_safe.py": SAFE},
    )
    result = run(".", cwd=tmp_path)
    assert result.returncode == 1  # real findings win over CG000
    found = codes_at(result.stdout)
    assert any(p == "a_broken.py" and c == "CG000" for p, _, c in found)
    assert ("b_leak.py", LEAK_LINE, "CG101") in found
    assert not any(p == "c_safe.py" for p, _, _ in found)


def test_undecodable_file_is_cg000(tmp_path):
    (tmp_path / "latin.py").write_bytes(b"import asyncpg\nname = '\xe9t\xe9'\n")
    result = run("latin.py", cwd=tmp_path)
    assert result.returncode == 2
    assert "latin.py:1:1: CG000 cannot parse: cannot decode" in result.stdout


def test_output_is_sorted_by_path_then_line(tmp_path):
    two = LEAK + "\n\nasync def again():\n    s = AsyncSessionLocal()\n    await s.execute('x')\n"
    write(tmp_path, {"z.py": LEAK, "a.py": two, "m/b.py": LEAK})
    result = run(".", "--select", "CG101", cwd=tmp_path)
    keys = [(m["path"], int(m["line"])) for m in map(LINE_RE.match, result.lines)]
    assert keys == sorted(keys)
    assert {p for p, _ in keys} == {"a.py", "m/b.py", "z.py"}
    assert [ln for p, ln in keys if p == "a.py"][:2] == [LEAK_LINE, 14]


def test_nonexistent_path_is_one_line_and_exit_2(tmp_path):
    result = run("missing.py", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert "missing.py" in result.stderr and "no such file" in result.stderr


@pytest.mark.parametrize(
    "args",
    [["--format", "xml", "."], ["--no-such-flag"], ["-j", "zero", "."], ["-j", "0", "."]],
)
def test_usage_errors_exit_2(tmp_path, args):
    result = run(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert_no_traceback(result)
    assert "usage:" in result.stderr or "error" in result.stderr


def test_bad_select_code_is_a_usage_error(tmp_path):
    write(tmp_path, {"a.py": LEAK})
    result = run("--select", "E501", "a.py", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "E501" in result.stderr


def test_select_and_ignore(tmp_path):
    write(tmp_path, {"a.py": LEAK})
    assert run("--select", "CG101", "a.py", cwd=tmp_path).returncode == 1
    assert run("--select", "CG1", "a.py", cwd=tmp_path).returncode == 1
    ignored = run("--ignore", "CG101", "--select", "CG101", "a.py", cwd=tmp_path)
    assert "CG101" not in ignored.stdout
    only_other = run("--select", "CG102", "a.py", cwd=tmp_path)
    assert "CG101" not in only_other.stdout


def test_noqa_suppresses_on_the_flagged_line_only(tmp_path):
    lines = LEAK.splitlines()
    target = lines[LEAK_LINE - 1]
    variants = {
        "bare.py": target + "  # noqa",
        "coded.py": target + "  # noqa: CG101",
        "listed.py": target + "  # noqa:CG102,CG101",
        "other.py": target + "  # noqa: E501",
        "other_ours.py": target + "  # noqa: CG102",
        "among_others.py": target + "  # noqa: F841, CG101",
    }
    files = {}
    for name, line in variants.items():
        copy = list(lines)
        copy[LEAK_LINE - 1] = line
        files[name] = "\n".join(copy) + "\n"
    write(tmp_path, files)
    result = run(".", "--select", "CG101", cwd=tmp_path)
    flagged = {p for p, _, _ in codes_at(result.stdout)}
    assert flagged == {"other.py", "other_ours.py"}


def test_pyproject_per_file_ignores_select_and_exclude(tmp_path):
    write(
        tmp_path,
        {
            "pyproject.toml": """
                [tool.connguard]
                exclude = ["generated/", "legacy_*.py"]
                per-file-ignores = { "tests/*" = ["CG101"] }
            """,
            "app/main.py": LEAK,
            "tests/test_x.py": LEAK,
            "generated/models.py": LEAK,
            "app/legacy_db.py": LEAK,
        },
    )
    result = run(".", cwd=tmp_path)
    paths = {p for p, _, _ in codes_at(result.stdout)}
    assert paths == {"app/main.py"}
    # excludes hold for explicitly named files too (pre-commit passes files one by one)
    assert run("generated/models.py", cwd=tmp_path).stdout == ""
    # the config is found from a subdirectory as well
    sub = run("main.py", cwd=tmp_path / "app")
    assert f"main.py:{LEAK_LINE}:{LEAK_COL}: CG101" in sub.stdout


@pytest.mark.parametrize(
    "body, needle",
    [
        ("select = 5", "select"),
        ('unknown-key = "x"', "unknown-key"),
        ('extra-factories = { "myapp.db.make" = "spaceship" }', "extra-factories"),
        ("select = [", "invalid TOML"),
        ('per-file-ignores = { "x.py" = ["nope"] }', "per-file-ignores"),
    ],
)
def test_bad_config_is_one_line_and_exit_2(tmp_path, body, needle):
    write(tmp_path, {"pyproject.toml": f"[tool.connguard]\n{body}\n", "a.py": LEAK})
    result = run("a.py", cwd=tmp_path)
    assert result.returncode == 2
    assert_no_traceback(result)
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert needle in result.stderr and "pyproject.toml" in result.stderr


def test_a_pyproject_that_is_not_toml_and_not_ours_is_passed_over(tmp_path):
    # A cookiecutter template's pyproject.toml is Jinja until rendered; it cannot configure us.
    write(
        tmp_path,
        {
            "pyproject.toml": "[tool.connguard]\nselect = ['CG101']\n",
            "template/{{cookiecutter.name}}/pyproject.toml": "name = {{ cookiecutter.name }}\n",
            "template/{{cookiecutter.name}}/app.py": LEAK,
            "a.py": LEAK,
        },
    )
    result = run(".", cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert {path for path, _, _ in codes_at(result.stdout)} == {
        "a.py",
        "template/{{cookiecutter.name}}/app.py",
    }


def test_extra_factories_from_pyproject(tmp_path):
    write(tmp_path, EXTRA_FACTORY_PROJECT)
    result = run("use.py", cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "use.py:6:15: CG1" in result.stdout


def test_gitignore_and_default_excludes_are_honoured_when_walking(tmp_path):
    write(
        tmp_path,
        {
            ".gitignore": "ignored_dir/\n*_gen.py\n",
            "pkg/.gitignore": "local.py\n",
            "ignored_dir/a.py": LEAK,
            "pkg/models_gen.py": LEAK,
            "pkg/local.py": LEAK,
            ".venv/lib/site.py": LEAK,
            "build/lib/x.py": LEAK,
            "node_modules/x.py": LEAK,
            "pkg/__pycache__/x.py": LEAK,
            "pkg/kept.py": LEAK,
            "notes.txt": LEAK,
        },
    )
    result = run(".", cwd=tmp_path)
    assert {p for p, _, _ in codes_at(result.stdout)} == {"pkg/kept.py"}


def test_stdin_with_filename(tmp_path):
    write(
        tmp_path, {"pyproject.toml": '[tool.connguard]\nper-file-ignores = { "skip/*" = ["CG"] }\n'}
    )
    result = run("-", "--stdin-filename", "app/api.py", cwd=tmp_path, input=LEAK)
    assert result.returncode == 1
    assert result.stdout.startswith(f"app/api.py:{LEAK_LINE}:{LEAK_COL}: CG101 ")
    ignored = run("-", "--stdin-filename", "skip/api.py", cwd=tmp_path, input=LEAK)
    assert (ignored.returncode, ignored.stdout) == (0, "")
    plain = run("-", cwd=tmp_path, input=LEAK)
    assert plain.stdout.startswith(f"-:{LEAK_LINE}:{LEAK_COL}: CG101 ")


def test_json_format(tmp_path):
    write(tmp_path, {"a.py": LEAK, "b.py": SAFE})
    result = run("--format", "json", "a.py", cwd=tmp_path)
    assert result.returncode == 1
    rows = json.loads(result.stdout)
    assert rows and all(
        set(r) == {"path", "line", "col", "end_line", "end_col", "code", "message"} for r in rows
    )
    first = next(r for r in rows if r["line"] == LEAK_LINE)
    assert (first["path"], first["col"], first["code"]) == ("a.py", LEAK_COL, "CG101")
    assert first["end_line"] >= first["line"]
    clean = run("--format", "json", "b.py", cwd=tmp_path)
    assert (clean.returncode, json.loads(clean.stdout)) == (0, [])


def test_github_format(tmp_path):
    write(tmp_path, {"a.py": LEAK})
    result = run("--format", "github", "--select", "CG101", "a.py", cwd=tmp_path)
    assert result.returncode == 1
    assert result.lines[0].startswith(f"::error file=a.py,line={LEAK_LINE},col={LEAK_COL},")
    assert "title=CG101::CG101 " in result.lines[0]


def test_exit_zero_and_statistics(tmp_path):
    write(tmp_path, {"a.py": LEAK, "b.py": LEAK})
    result = run("--exit-zero", "--statistics", "--select", "CG101", ".", cwd=tmp_path)
    assert result.returncode == 0
    stats = [ln for ln in result.lines if not LINE_RE.match(ln)]
    assert len(stats) == 1 and re.match(r"^2\s+CG101 \S+", stats[0]), stats


def test_parallel_and_serial_runs_agree(tmp_path):
    files = {
        f"pkg/m{i:02d}.py": (LEAK if i % 3 == 0 else SAFE if i % 3 == 1 else PLAIN)
        for i in range(30)
    }
    write(tmp_path, files)
    serial = run("-j", "1", ".", cwd=tmp_path)
    parallel = run("-j", "2", ".", cwd=tmp_path)
    assert serial.returncode == parallel.returncode == 1
    assert serial.stdout == parallel.stdout
    assert len({p for p, _, _ in codes_at(serial.stdout)}) == 10


def test_cross_module_maker_is_found_from_the_package_root(tmp_path):
    """pre-commit hands over only the changed route; the maker lives in another module.
    items.py spells no resource name at all: only the import tells the prefilter to look."""
    write(
        tmp_path,
        {
            "src/shop/__init__.py": "",
            "src/shop/db.py": """
                from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

                engine = create_async_engine("postgresql+asyncpg://localhost/shop")
                SessionLocal = async_sessionmaker(engine, expire_on_commit=False)
                Maker = async_sessionmaker(engine)
            """,
            "src/shop/routes/__init__.py": "",
            "src/shop/routes/orders.py": """
                from shop.db import SessionLocal


                async def list_orders():
                    db = SessionLocal()
                    rows = await db.execute("select * from orders")
                    return rows.all()
            """,
            "src/shop/routes/items.py": """
                from ..db import Maker as M


                async def list_items():
                    db = M()
                    return (await db.execute("select 1")).all()
            """,
        },
    )
    result = run("src/shop/routes/orders.py", "src/shop/routes/items.py", cwd=tmp_path)
    found = codes_at(result.stdout)
    assert ("src/shop/routes/orders.py", 6, "CG101") in found, result.stdout + result.stderr
    assert ("src/shop/routes/items.py", 6, "CG101") in found, result.stdout + result.stderr
    # and from elsewhere: the package root is found from the file, not the working directory
    other = run(str(tmp_path / "src/shop/routes/orders.py"), cwd=tmp_path.parent)
    assert other.returncode == 1 and ":6:10: CG101" in other.stdout


def test_explain_prints_the_rule_documentation(tmp_path):
    result = run("--explain", "CG101", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.startswith("CG101")
    assert len(result.stdout.splitlines()) > 5
    unknown = run("--explain", "CG777", cwd=tmp_path)
    assert unknown.returncode == 2
    assert unknown.stderr.count("\n") == 1 and "CG777" in unknown.stderr


def test_version(tmp_path):
    from connguard import __version__

    result = run("--version", cwd=tmp_path)
    assert result.returncode == 0 and __version__ in result.stdout


def test_diff_prints_the_fix_and_writes_nothing(tmp_path):
    write(tmp_path, {"a.py": LEAK})
    result = run("--diff", "a.py", cwd=tmp_path)
    assert_no_traceback(result)
    assert (tmp_path / "a.py").read_text() == LEAK
    assert result.returncode == 1
    assert "+++ b/a.py" in result.stdout
    assert "+    async with AsyncSessionLocal() as session:" in result.stdout


def test_fix_rewrites_and_the_file_then_checks_clean(tmp_path):
    write(tmp_path, {"a.py": LEAK})
    result = run("--fix", "--select", "CG101,CG102", "a.py", cwd=tmp_path)
    assert_no_traceback(result)
    fixed = (tmp_path / "a.py").read_text()
    assert "async with AsyncSessionLocal() as session:" in fixed
    assert result.returncode == 0, result.stdout + result.stderr
    assert run("--select", "CG101,CG102", "a.py", cwd=tmp_path).returncode == 0


# An in-place use (fixed: it gains a line) above a creation the fixer declines (at 8:13).
FIXED_ABOVE_DECLINED = """\
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
engine = create_async_engine("postgresql+asyncpg://localhost/app")
AsyncSessionLocal = async_sessionmaker(engine)
async def a(q):
    await AsyncSessionLocal().execute(q)
async def b(q, flag):
    if flag:
        s = AsyncSessionLocal()
        await s.execute(q)
    print(s)
"""


def test_fix_reports_what_is_left_at_its_place_in_the_fixed_file(tmp_path):
    write(tmp_path, {"a.py": FIXED_ABOVE_DECLINED})
    diff = run("--diff", "a.py", cwd=tmp_path)
    # --diff writes nothing: the position is the one of the file as it is.
    assert diff.stderr.splitlines()[0].startswith("a.py:8:13: CG101 ")

    result = run("--fix", "a.py", cwd=tmp_path)

    assert_no_traceback(result)
    assert (tmp_path / "a.py").read_text().splitlines()[8] == "        s = AsyncSessionLocal()"
    # Each finding left is one line on stdout, with why it was not fixed (once: not on stderr).
    (left,) = result.stdout.splitlines()
    assert left.startswith("a.py:9:13: CG101 ")
    assert left.endswith(" (not fixed: `s` is also used outside the statements after its creation)")
    assert result.stderr.splitlines() == ["fixed 1 file(s); 1 finding(s) left for a person"]


def test_fix_from_stdin_prints_the_fixed_source(tmp_path):
    result = run("--fix", "-", "--stdin-filename", "api.py", cwd=tmp_path, input=LEAK)
    assert_no_traceback(result)
    assert "async with AsyncSessionLocal() as session:" in result.stdout
    assert result.returncode == 0, result.stderr
    diff = run("--diff", "-", "--stdin-filename", "api.py", cwd=tmp_path, input=LEAK)
    assert diff.returncode == 1 and "+++ b/api.py" in diff.stdout


def test_an_internal_error_is_one_line_per_file_exit_2_and_never_a_traceback(tmp_path, monkeypatch):
    """A fault injected into the analysis (through a sitecustomize on PYTHONPATH, so the real
    console script runs) must surface as CG999 lines and a summary, never a traceback."""
    import os

    inject = tmp_path / "inject"
    write(
        inject,
        {
            "sitecustomize.py": """
                from connguard.checkers import analysis

                def broken(*args, **kwargs):
                    raise ZeroDivisionError("injected fault")

                analysis.check_module = broken
            """
        },
    )
    write(tmp_path / "proj", {"a.py": LEAK, "b.py": PLAIN})
    env_path = os.pathsep.join(filter(None, [str(inject), os.environ.get("PYTHONPATH")]))
    monkeypatch.setenv("PYTHONPATH", env_path)
    result = run(".", "--exit-zero", cwd=tmp_path / "proj")
    assert_no_traceback(result)
    assert result.returncode == 2
    assert re.match(
        r"^a\.py:1:1: CG999 internal error: ZeroDivisionError: injected fault", result.stdout
    )
    assert "b.py" not in result.stdout
    assert "1 internal error(s)" in result.stderr


def test_each_file_gets_its_nearest_pyproject(tmp_path):
    """A monorepo: the root's settings and a subproject's own, in one run (pre-commit runs
    from the root with files of every subproject)."""
    write(
        tmp_path,
        {
            "pyproject.toml": '[tool.connguard]\nexclude = ["vendored/"]\n',
            "svc_a/pyproject.toml": (
                '[tool.connguard]\nper-file-ignores = { "legacy/*" = ["CG101"] }\n'
            ),
            "svc_a/legacy/old.py": LEAK,
            "svc_a/new.py": LEAK,
            "svc_b/pyproject.toml": '[tool.connguard]\nexclude = ["gen/"]\n',
            "svc_b/gen/models.py": LEAK,
            "svc_b/api.py": LEAK,
            "vendored/lib.py": LEAK,
        },
    )
    result = run(".", "--select", "CG101", cwd=tmp_path)
    assert {p for p, _, _ in codes_at(result.stdout)} == {"svc_a/new.py", "svc_b/api.py"}
    # the command line still has the last word over every subproject
    ignored = run(".", "--ignore", "CG101", "--select", "CG101", cwd=tmp_path)
    assert ignored.stdout == ""
    # an explicit --config is one config for every file
    one = run("--config", "pyproject.toml", "--select", "CG101", ".", cwd=tmp_path)
    assert {p for p, _, _ in codes_at(one.stdout)} == {
        "svc_a/new.py",
        "svc_a/legacy/old.py",
        "svc_b/api.py",
        "svc_b/gen/models.py",
    }


def test_gitignore_above_the_walked_directory_applies_inside_a_work_tree(tmp_path):
    write(
        tmp_path,
        {
            ".gitignore": "src/generated/\n",
            "src/generated/models.py": LEAK,
            "src/app.py": LEAK,
        },
    )
    (tmp_path / ".git").mkdir()
    result = run("src", cwd=tmp_path)
    assert {p for p, _, _ in codes_at(result.stdout)} == {"src/app.py"}
    # outside a work tree, a .gitignore above the walked directory means nothing
    (tmp_path / ".git").rmdir()
    result = run("src", cwd=tmp_path)
    assert {p for p, _, _ in codes_at(result.stdout)} == {"src/app.py", "src/generated/models.py"}


def test_a_directory_named_explicitly_is_walked_even_if_gitignored(tmp_path):
    write(tmp_path, {".gitignore": ".venv/\n", ".venv/lib/pkg/mod.py": LEAK})
    (tmp_path / ".git").mkdir()
    result = run(".venv/lib/pkg", cwd=tmp_path)
    assert {p for p, _, _ in codes_at(result.stdout)} == {".venv/lib/pkg/mod.py"}


def test_cancellation_is_named_only_where_it_can_land(tmp_path):
    # Cancellation lands at an `await`: a sync function's resource can only meet an exception.
    write(
        tmp_path,
        {
            "db.py": """
                import psycopg

                def sync_fetch(dsn):
                    conn = psycopg.connect(dsn)
                    rows = conn.execute("select 1").fetchall()
                    conn.close()
                    return rows

                async def async_fetch(dsn):
                    conn = await psycopg.AsyncConnection.connect(dsn)
                    await conn.execute("select 1")
                    await conn.close()
            """
        },
    )
    result = run("db.py", cwd=tmp_path)
    sync_line, async_line = result.stdout.splitlines()
    assert "not closed if an exception interrupts before the close" in sync_line
    assert "not closed if an exception or cancellation interrupts" in async_line
