"""The engine's API as the fixer, the hooks and the leak detector call it."""

from __future__ import annotations

from pathlib import Path

import pytest
from engine_helpers import LEAK, LEAK_COL, LEAK_LINE, PLAIN, SAFE, write

from connguard.checkers import analysis, engine
from connguard.checkers.config import Config, ConfigError, config_from_table, load_config
from connguard.checkers.discovery import PathError
from connguard.checkers.imports import ProjectImports, absolute_module, iter_from_imports


def test_check_source_reports_the_seed_outage():
    findings = engine.check_source(LEAK, "app.py", Config())
    assert any(
        (f.path, f.line, f.col, f.code) == ("app.py", LEAK_LINE, LEAK_COL, "CG101")
        for f in findings
    ), findings
    assert findings == sorted(findings)
    assert engine.check_source(SAFE, "app.py", Config()) == []


def test_noqa_is_applied_in_check_source_and_not_in_analyse():
    lines = LEAK.splitlines()
    lines[LEAK_LINE - 1] += "  # noqa: CG101"
    source = "\n".join(lines) + "\n"
    assert not [f for f in engine.check_source(source, "a.py", Config()) if f.code == "CG101"]
    assert [f for f in engine.analyse(source, "a.py", Config()) if f.code == "CG101"]


def test_parse_error_is_one_cg000_finding():
    findings = engine.check_source("import asyncpg\nasync def f(:\n", "bad.py", Config())
    assert [f.code for f in findings] == ["CG000"]
    assert findings[0].message.startswith("cannot parse: ")
    assert findings[0].line >= 1 and findings[0].col >= 1


@pytest.mark.parametrize(
    "source",
    [
        "type Rows = list[int]\n",
        "class Box[T]:\n    pass\n",
        "try:\n    pass\nexcept KeyError, ValueError:\n    pass\n",
    ],
)
def test_syntax_newer_than_our_python_is_not_cg000(source):
    assert engine.check_source(source, "new.py", Config()) == []


def test_null_byte_is_cg000_not_a_crash():
    findings = engine.check_source("import asyncpg\x00\n", "nul.py", Config())
    assert [f.code for f in findings] == ["CG000"]


def test_internal_error_is_one_cg999_line_never_a_traceback(monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("deliberately injected")

    monkeypatch.setattr(analysis, "check_module", broken)
    findings = engine.check_source(LEAK, "a.py", Config())
    assert [f.code for f in findings] == ["CG999"]
    assert "KeyError" in findings[0].message and "\n" not in findings[0].message


def test_prefilter_skips_files_without_resource_names(monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("parsed a file the prefilter should have skipped")

    monkeypatch.setattr(analysis, "check_module", must_not_run)
    assert engine.check_source(PLAIN, "plain.py", Config()) == []


def test_check_paths_report_and_exit_codes(tmp_path):
    write(tmp_path, {"a.py": LEAK, "b.py": SAFE, "c.py": "import asyncpg\ndef f(:\n"})
    config = Config()
    report = engine.check_paths([str(tmp_path)], config)
    assert report.files == 3 and report.lines > 20
    assert {Path(f.path).name for f in report.findings} == {"a.py", "c.py"}
    assert report.errors == []
    assert report.exit_code() == 1
    assert report.exit_code(exit_zero=True) == 0
    only_parse = engine.check_paths([str(tmp_path / "c.py")], config)
    assert only_parse.exit_code() == 2
    assert engine.check_paths([str(tmp_path / "b.py")], config).exit_code() == 0
    with pytest.raises(PathError):
        engine.check_paths([str(tmp_path / "nope.py")], config)


def test_parallel_check_paths_matches_serial(tmp_path):
    write(tmp_path, {f"m{i}.py": LEAK if i % 2 else SAFE for i in range(20)})
    serial = engine.check_paths([str(tmp_path)], Config(), jobs=1)
    parallel = engine.check_paths([str(tmp_path)], Config(), jobs=2)
    assert serial.findings == parallel.findings and len(serial.findings) >= 10


def test_check_file_uses_the_nearest_pyproject(tmp_path):
    write(
        tmp_path,
        {
            "pyproject.toml": '[tool.connguard]\nper-file-ignores = { "legacy/*" = ["CG1"] }\n',
            "legacy/old.py": LEAK,
            "new/app.py": LEAK,
        },
    )
    assert engine.check_file(tmp_path / "legacy/old.py") == []
    assert [f.line for f in engine.check_file(tmp_path / "new/app.py") if f.code == "CG101"] == [
        LEAK_LINE
    ]


def test_selection_longest_prefix_wins():
    config = Config(select=frozenset({"CG1"}), ignore=frozenset({"CG102"}))
    assert config.enabled("CG101") and not config.enabled("CG102")
    narrow = Config(select=frozenset({"CG102"}), ignore=frozenset({"CG1"}))
    assert narrow.enabled("CG102") and not narrow.enabled("CG101")
    # CG000 is not switched off by a selection, only by name
    assert Config(select=frozenset({"CG101"})).enabled("CG000")
    assert not Config(ignore=frozenset({"CG000"})).enabled("CG000")


def test_config_keys_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="unknown key"):
        config_from_table({"selct": ["CG101"]})
    with pytest.raises(ConfigError, match="not a connguard code"):
        config_from_table({"ignore": ["W503"]})
    with pytest.raises(ConfigError, match="spaceship"):
        config_from_table({"extra-factories": {"a.b": "spaceship"}})
    ok = config_from_table(
        {"extend_select": ["CG102"], "extra-factories": {"app.db.get": "session"}}
    )
    assert ok.extra_factories == {"app.db.get": "session"}
    # no pyproject anywhere above: defaults
    assert load_config(tmp_path) == Config()


def test_pyproject_without_our_table_is_skipped_for_the_one_above(tmp_path):
    write(
        tmp_path,
        {
            "pyproject.toml": '[tool.connguard]\nignore = ["CG102"]\n',
            "sub/pyproject.toml": '[project]\nname = "sub"\n',
        },
    )
    assert load_config(tmp_path / "sub").ignore == frozenset({"CG102"})


# -- the cross-module resolver ---------------------------------------------------------------
def test_from_import_parsing():
    text = (
        "from a.b import (x,\n   y as z,  # c\n)\nfrom . import m\nfrom ..p import *\n"
        "from q import r, \\\n  s\n"
    )
    assert list(iter_from_imports(text)) == [
        (0, "a.b", ["x", "y"]),
        (1, "", ["m"]),
        (2, "p", ["*"]),
        (0, "q", ["r", "s"]),
    ]
    assert absolute_module(1, "db", "app.routes.items", False) == "app.routes.db"
    assert absolute_module(2, "db", "app.routes.items", False) == "app.db"
    assert absolute_module(1, "db", "app.routes", True) == "app.routes.db"
    assert absolute_module(3, "db", "app.x", False) is None


def project(tmp_path: Path) -> Path:
    return write(
        tmp_path,
        {
            "src/app/__init__.py": "from .db import SessionLocal\n",
            "src/app/db.py": """
                from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

                from app import helpers

                engine = create_async_engine("sqlite+aiosqlite://")
                SessionLocal = async_sessionmaker(engine)
            """,
            "src/app/helpers.py": "from app import db\nX = 1\n",  # an import cycle
            "src/app/api.py": """
                from app import SessionLocal


                async def get():
                    s = SessionLocal()
                    return await s.execute("select 1")
            """,
        },
    )


def test_resolver_follows_reexports_and_survives_cycles(tmp_path):
    root = project(tmp_path)
    config = Config()
    resolver = ProjectImports(config.table)
    module, is_package = resolver.register_file(root / "src/app/api.py")
    assert (module, is_package) == ("app.api", False)
    assert resolver.resolve("app.db", "SessionLocal") is not None
    assert resolver.resolve("app", "SessionLocal") is not None  # re-exported by __init__
    assert resolver.resolve("app.helpers", "X") is None
    assert resolver.resolve("sqlalchemy.ext.asyncio", "AsyncSession") is None  # never site-packages
    text = (root / "src/app/api.py").read_text()
    assert resolver.imports_factory(text, module, is_package)


def test_engine_flags_a_maker_imported_through_a_package_reexport(tmp_path):
    root = project(tmp_path)
    findings = engine.check_file(root / "src/app/api.py", Config())
    assert [(f.line, f.code) for f in findings if f.code == "CG101"] == [(6, "CG101")], findings


# -- the prefilter never hides a finding ------------------------------------------------------
def _examples(kind: str):
    from connguard.checkers.rules import RULES

    for code, rule in sorted(RULES.items()):
        for index, snippet in enumerate(getattr(rule, kind)):
            yield pytest.param(code, snippet, id=f"{code}-{kind.lower()}-{index}")


@pytest.mark.parametrize("code, snippet", list(_examples("INVALID")))
def test_every_invalid_example_passes_the_prefilter_and_is_reported(code, snippet, tmp_path):
    config = Config(extend_select=frozenset({code}))
    assert engine.may_hold_finding(snippet, str(tmp_path / "example.py"), config)
    findings = engine.check_source(snippet, str(tmp_path / "example.py"), config)
    assert code in {f.code for f in findings}, findings


@pytest.mark.parametrize("code, snippet", list(_examples("VALID")))
def test_valid_examples_give_no_finding_of_their_rule_through_the_engine(code, snippet, tmp_path):
    config = Config(extend_select=frozenset({code}))
    findings = engine.check_source(snippet, str(tmp_path / "example.py"), config)
    assert code not in {f.code for f in findings}, findings


def test_a_rule_that_is_off_by_default_runs_only_when_named():
    from connguard.checkers.rules import RULES

    off = [code for code, rule in RULES.items() if not getattr(rule, "DEFAULT_ENABLED", True)]
    if not off:
        pytest.skip("every rule is on by default")
    code = off[0]
    snippet = RULES[code].INVALID[0]
    assert code not in {f.code for f in engine.check_source(snippet, "x.py", Config())}
    assert code not in {
        f.code for f in engine.check_source(snippet, "x.py", Config(select=frozenset({"CG1"})))
    }
    named = Config().with_selection(extend_select=frozenset({code}))
    assert code in {f.code for f in engine.check_source(snippet, "x.py", named)}


def test_installed_packages_are_never_read_for_the_project(tmp_path):
    maker = "from sqlalchemy.ext.asyncio import async_sessionmaker\nMaker = async_sessionmaker()\n"
    use = "from {mod} import Maker\n\n\nasync def f():\n    s = Maker()\n    await s.execute('x')\n"
    site = tmp_path / "lib" / "site-packages"
    write(
        site,
        {
            "ownpkg/__init__.py": "",
            "ownpkg/db.py": maker,
            "ownpkg/use_own.py": use.format(mod="ownpkg.db"),
            "ownpkg/use_other.py": use.format(mod="otherpkg.db"),
            "otherpkg/__init__.py": "",
            "otherpkg/db.py": maker,
        },
    )
    write(tmp_path / "proj", {"app.py": use.format(mod="otherpkg.db")})
    config = Config()
    # checking an installed package: its own modules are its project...
    assert [f.line for f in engine.check_file(site / "ownpkg/use_own.py", config)] == [5]
    # ...but a sibling installed package is not
    assert engine.check_file(site / "ownpkg/use_other.py", config) == []
    resolver = ProjectImports(config.table, [tmp_path / "proj"])
    assert resolver.find("otherpkg.db") is None


def test_imports_inside_docstrings_and_comments_do_not_pass_the_prefilter():
    doc_only = '''"""Usage:

    from sqlalchemy.ext.asyncio import AsyncSession
    session = AsyncSession(engine)
"""
# from asyncpg import connect
import os
'''
    assert not engine.may_hold_finding(doc_only, "doc.py", Config())
    # a triple quote inside a one-line string does not hide the real import after it
    tricky = (
        "QUOTE = \"'''\"\nfrom sqlalchemy.ext.asyncio import AsyncSession\n"
        "s = AsyncSession(engine)\nX = '''\n"
    )
    assert engine.may_hold_finding(tricky, "tricky.py", Config())


def test_code_only_keeps_code_and_drops_strings_and_comments():
    from connguard.checkers.imports import code_only

    text = 'a = \'x#y\'  # note\nb = """doc\nmore"""\nc = f\'{a}\'\n'
    assert code_only(text) == 'a = ""  \nb = ""\nc = f""\n'


@pytest.mark.parametrize(
    "body, expected",
    [
        (
            "from sqlalchemy.orm import Session\n\ndef f(s: Session) -> Session:\n    return s\n",
            False,
        ),
        ("from sqlalchemy.orm import Session\nok = isinstance(x, Session)\n", False),
        ("from sqlalchemy.orm import Session\ns = Session(engine)\n", True),
        ("from sqlalchemy.orm import Session as S\ns = S(engine)\n", True),
        ("from sqlalchemy.orm import Session\nMaker = Session\n", True),
        ("from sqlalchemy.orm import Session\n\nclass Mine(Base, Session):\n    pass\n", True),
        (
            "from sqlalchemy.orm import sessionmaker, Session\nm = sessionmaker(class_=Session)\n",
            True,
        ),
        ("import asyncpg\n\nasync def f():\n    c = await asyncpg.connect()\n", True),
        ("import sqlalchemy.ext.asyncio as sa\ns = sa.AsyncSession(e)\n", True),
        (
            "from sqlalchemy.ext.asyncio import AsyncEngine\n\n"
            "async def f(e: AsyncEngine):\n    c = await e.connect()\n",
            True,
        ),
        ("from sqlalchemy.ext.asyncio import AsyncEngine\n", False),
        # a parameter typed as a maker is a source: calling it creates
        (
            "from sqlalchemy.ext.asyncio import async_sessionmaker\n\n"
            "async def f(maker: async_sessionmaker):\n    s = maker()\n",
            True,
        ),
        # `await <...>pool.acquire()`: a pool known by its name
        ("import logging\n\nasync def f(bot):\n    c = await bot.pool.acquire()\n", True),
        ("import asyncio\n\nasync def f(lock):\n    await lock.acquire()\n", False),
        # a module binding counts only when a table name is reached through it
        ("from sqlalchemy import engine\n\ndef f(e: engine.Engine):\n    e.dispose()\n", False),
        ("from sqlalchemy import engine\ne = engine.create_engine(url)\n", True),
        (
            "from psycopg import AsyncConnection\n"
            "async def f():\n    c = await AsyncConnection.connect()\n",
            True,
        ),
    ],
)
def test_prefilter_wants_a_table_name_used_where_it_can_create(body, expected):
    assert engine.may_hold_finding(body, "m.py", Config()) is expected
