"""The flake8 adapter through the real `flake8` command: same findings, flake8's own noqa/select."""

from __future__ import annotations

import re

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


def flake8(*args, cwd, input=None):
    # --isolated: no user/project flake8 config can change what we assert
    return run("--isolated", *args, cwd=cwd, input=input, tool="flake8")


def cg_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if re.search(r": CG\d{3} ", line)]


def test_plugin_is_registered():
    import subprocess

    from engine_helpers import script

    out = subprocess.run([script("flake8"), "--version"], capture_output=True, text=True).stdout
    assert "connguard" in out


def test_leak_is_reported_with_flake8_columns(tmp_path):
    write(tmp_path, {"app.py": LEAK})
    result = flake8("app.py", cwd=tmp_path)
    assert_no_traceback(result)
    assert result.returncode == 1
    assert f"app.py:{LEAK_LINE}:{LEAK_COL}: CG101 " in result.stdout


def test_same_findings_as_the_cli(tmp_path):
    two = LEAK + "\n\nasync def again():\n    s = AsyncSessionLocal()\n    await s.execute('x')\n"
    write(tmp_path, {"a.py": LEAK, "b.py": two, "c.py": SAFE, "d.py": PLAIN})
    ours = run(".", cwd=tmp_path).stdout.splitlines()
    theirs = cg_lines(flake8("--select=CG", ".", cwd=tmp_path).stdout)
    norm = sorted(line.removeprefix("./") for line in theirs)
    assert norm == sorted(ours) and len(norm) >= 3


def test_flake8_owns_selection_and_noqa(tmp_path):
    lines = LEAK.splitlines()
    lines[LEAK_LINE - 1] += "  # noqa: CG101"
    write(tmp_path, {"leak.py": LEAK, "quiet.py": "\n".join(lines) + "\n"})
    assert cg_lines(flake8("--extend-ignore=CG101", "leak.py", cwd=tmp_path).stdout) == []
    assert cg_lines(flake8("--select=E", "leak.py", cwd=tmp_path).stdout) == []
    assert cg_lines(flake8("quiet.py", cwd=tmp_path).stdout) == []
    # flake8's --disable-noqa shows what noqa hid: the plugin itself does not filter
    assert cg_lines(flake8("--disable-noqa", "quiet.py", cwd=tmp_path).stdout)


def test_clean_and_plain_files_give_nothing(tmp_path):
    write(tmp_path, {"c.py": SAFE, "d.py": PLAIN})
    assert cg_lines(flake8(".", cwd=tmp_path).stdout) == []


def test_stdin(tmp_path):
    result = flake8("--stdin-display-name=api.py", "-", cwd=tmp_path, input=LEAK)
    assert f"api.py:{LEAK_LINE}:{LEAK_COL}: CG101 " in result.stdout


def test_project_config_extra_factories_apply_under_flake8(tmp_path):
    write(tmp_path, EXTRA_FACTORY_PROJECT)
    assert "use.py:6:15: CG1" in flake8("use.py", cwd=tmp_path).stdout


def test_bad_config_is_one_finding_not_a_crash(tmp_path):
    write(tmp_path, {"pyproject.toml": "[tool.connguard]\nselect = 5\n", "a.py": LEAK})
    result = flake8("a.py", cwd=tmp_path)
    assert_no_traceback(result)
    assert "a.py:1:1: CG999 bad [tool.connguard] configuration" in result.stdout


def test_parallel_flake8(tmp_path):
    write(tmp_path, {f"m{i}.py": LEAK if i % 2 else SAFE for i in range(12)})
    result = flake8("-j", "2", "--select=CG", ".", cwd=tmp_path)
    assert len(cg_lines(result.stdout)) >= 6


def test_connguard_ignores_do_not_apply_under_flake8_but_named_rules_do(tmp_path):
    """flake8 owns selection: [tool.connguard] ignore is for the CLI; a rule that is off by
    default can still be named there to make the plugin run it."""
    from connguard.checkers.rules import RULES

    write(tmp_path, {"pyproject.toml": '[tool.connguard]\nignore = ["CG101"]\n', "a.py": LEAK})
    assert f"a.py:{LEAK_LINE}:{LEAK_COL}: CG101" in flake8("a.py", cwd=tmp_path).stdout
    assert run("a.py", cwd=tmp_path).stdout == ""
    off = [code for code, rule in RULES.items() if not rule.DEFAULT_ENABLED]
    if off:
        code = off[0]
        write(tmp_path, {"b.py": RULES[code].INVALID[0]})
        assert f" {code} " not in flake8("b.py", cwd=tmp_path).stdout
        write(tmp_path, {"pyproject.toml": f'[tool.connguard]\nextend-select = ["{code}"]\n'})
        assert f" {code} " in flake8("b.py", cwd=tmp_path).stdout
