"""One resolver for every leak-check setting: marker > command line > env > ini > default."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from provision_helpers import run_pytest

from connguard.leak_detector import settings
from connguard.leak_detector.provision import Database, mask_password


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for setting in settings.SETTINGS.values():
        monkeypatch.delenv(setting.env, raising=False)
    monkeypatch.delenv("CONNGUARD_DATABASE_URL", raising=False)


def test_every_setting_has_one_name_in_each_source():
    setting = settings.SETTINGS["leak_check_pool_threshold"]
    assert setting.option == "--leak-check-pool-threshold"
    assert setting.env == "CONNGUARD_LEAK_CHECK_POOL_THRESHOLD"
    assert setting.marker_key == "pool_threshold"
    assert set(settings.SETTINGS) >= {
        "leak_check", "leak_check_db", "leak_check_db_url", "leak_check_image",
        "leak_check_network", "leak_check_url_env", "leak_check_db_per_test", "leak_check_mode",
        "leak_check_report", "leak_check_pool_threshold", "leak_check_fail_on",
        "leak_check_server_proof",
    }  # fmt: skip


def test_defaults(pytester):
    config = pytester.parseconfig()
    assert settings.resolve(config, "leak_check") is False
    assert settings.resolve(config, "leak_check_db") == "auto"
    assert settings.resolve(config, "leak_check_mode") == "fail"
    assert settings.resolve(config, "leak_check_server_proof") == "auto"
    assert settings.resolve(config, "leak_check_pool_threshold") == 0.7
    assert settings.resolve(config, "leak_check_fail_on") == frozenset()
    assert settings.resolve(config, "leak_check_image") == settings.DEFAULT_IMAGE
    assert settings.resolve(config, "leak_check_network") == "bridge"


def test_command_line_beats_env_beats_ini(pytester, monkeypatch):
    pytester.makeini("[pytest]\nleak_check_mode = warn\nleak_check_db = local\n")
    config = pytester.parseconfig()
    assert settings.resolve(config, "leak_check_mode") == "warn"
    assert settings.resolve(config, "leak_check_db") == "local"

    monkeypatch.setenv("CONNGUARD_LEAK_CHECK_MODE", "fail")
    monkeypatch.setenv("CONNGUARD_LEAK_CHECK_DB", "container")
    config = pytester.parseconfig()
    assert settings.resolve(config, "leak_check_mode") == "fail"
    assert settings.resolve(config, "leak_check_db") == "container"

    config = pytester.parseconfig("--leak-check-db=url", "--leak-check-mode=warn")
    assert settings.resolve(config, "leak_check_db") == "url"
    assert settings.resolve(config, "leak_check_mode") == "warn"


def test_database_url_falls_back_to_connguard_database_url(pytester, monkeypatch):
    monkeypatch.setenv("CONNGUARD_DATABASE_URL", "postgresql://a@h/db")
    assert settings.resolve(pytester.parseconfig(), "leak_check_db_url") == "postgresql://a@h/db"
    monkeypatch.setenv("CONNGUARD_LEAK_CHECK_DB_URL", "postgresql://b@h/db")
    assert settings.resolve(pytester.parseconfig(), "leak_check_db_url") == "postgresql://b@h/db"


def _item(pytester, source: str) -> pytest.Item:
    """The one test in `source`, collected in this process (pytest-asyncio told its loop scope,
    which it otherwise warns about)."""
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    return pytester.getitem(source)


def test_marker_overrides_per_test_only(pytester):
    item = _item(
        pytester,
        "import pytest\n"
        "@pytest.mark.leak_check(mode='warn', pool_threshold=0.5, fail_on='engine')\n"
        "def test_func(): pass\n",
    )
    assert settings.resolve(item.config, "leak_check_mode", item) == "warn"
    assert settings.resolve(item.config, "leak_check_pool_threshold", item) == 0.5
    assert settings.resolve(item.config, "leak_check_fail_on", item) == {"engine"}
    assert settings.resolve(item.config, "leak_check_mode") == "fail"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            {"env": ("CONNGUARD_LEAK_CHECK_DB", "foo")},
            "CONNGUARD_LEAK_CHECK_DB='foo' (environment): expected one of auto, url, container, "
            "local",
        ),
        (
            {"args": ("--leak-check-pool-threshold=2",)},
            "--leak-check-pool-threshold='2' (command line): expected a number between 0 and 1",
        ),
        (
            {"ini": "leak_check_fail_on = engine,bogus"},
            "leak_check_fail_on='engine,bogus' (ini file ",
        ),
        (
            {"env": ("CONNGUARD_LEAK_CHECK_URL_ENV", "not a name")},
            "CONNGUARD_LEAK_CHECK_URL_ENV='not a name' (environment): expected an environment",
        ),
    ],
)
def test_bad_value_is_a_usage_error_naming_its_source(pytester, monkeypatch, source, message):
    if "env" in source:
        monkeypatch.setenv(*source["env"])
    if "ini" in source:
        pytester.makeini("[pytest]\n" + source["ini"] + "\n")
    config = pytester.parseconfig(*source.get("args", ()))
    with pytest.raises(pytest.UsageError) as raised:
        settings.validate_all(config)
    assert message in str(raised.value)


def test_bad_marker_value_names_the_test(pytester):
    item = _item(
        pytester, "import pytest\n@pytest.mark.leak_check(mode='loud')\ndef test_func(): pass\n"
    )
    with pytest.raises(pytest.UsageError) as raised:
        settings.check_marker(item)
    where = "(marker on test_bad_marker_value_names_the_test.py::test_func)"
    assert f"@pytest.mark.leak_check(mode='loud') {where}" in str(raised.value)
    assert "expected one of fail, warn" in str(raised.value)


def test_unknown_marker_key_is_rejected(pytester):
    item = _item(
        pytester, "import pytest\n@pytest.mark.leak_check(db='x')\ndef test_func(): pass\n"
    )
    with pytest.raises(pytest.UsageError, match="unknown setting"):
        settings.check_marker(item)


def test_bad_value_from_the_command_line_is_one_line_and_exit_code_4(pytester):
    result = run_pytest(pytester.path, "--leak-check", "--leak-check-db=foo")
    assert result.returncode == 4
    assert (
        "ERROR: --leak-check-db='foo' (command line): expected one of auto, url, container, local"
        in result.stderr
    )
    assert "Traceback" not in result.stderr


def test_without_leak_check_nothing_is_imported_or_started(pytester):
    pytester.makepyfile(
        """
        import sys
        def test_quiet(request):
            assert not request.config.pluginmanager.has_plugin("connguard-provision")
            for name in ("psycopg", "asyncpg", "sqlalchemy", "testcontainers", "docker"):
                assert name not in sys.modules, name
        """
    )
    result = run_pytest(pytester.path, "-v")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "connguard: leak check on" not in result.stdout
    assert "1 passed" in result.stdout


def test_fixtures_without_leak_check_fail_with_a_clear_message(pytester):
    pytester.makepyfile("def test_db(connguard_database): pass\n")
    result = run_pytest(pytester.path)
    assert result.returncode == 1
    assert "connguard_database needs --leak-check" in result.stdout


def test_database_urls_and_masking():
    database = Database(
        url="postgresql://app:s3cret@127.0.0.1:5433/connguard_1_main?application_name=cg-1-main",
        dbname="connguard_1_main",
        application_name="cg-1-main",
        admin_url="postgresql://app:s3cret@127.0.0.1:5433/postgres",
        server_version="15.18",
        backend="url",
    )
    assert database.sqlalchemy_url("asyncpg") == (
        "postgresql+asyncpg://app:s3cret@127.0.0.1:5433/connguard_1_main"
    )
    assert database.sqlalchemy_url("psycopg").startswith("postgresql+psycopg://app:s3cret@")
    assert database.sqlalchemy_url("psycopg").endswith("?application_name=cg-1-main")
    assert "s3cret" not in repr(database)
    assert mask_password(database.url) == (
        "postgresql://app:***@127.0.0.1:5433/connguard_1_main?application_name=cg-1-main"
    )
    assert (database.host, database.port, database.user, database.password) == (
        "127.0.0.1", 5433, "app", "s3cret",
    )  # fmt: skip


def test_plugin_module_imports_no_driver():
    # The plugin is loaded by every pytest run in an environment where connguard is installed.
    code = (
        "import sys, connguard.leak_detector.plugin; "
        "names = ('psycopg', 'asyncpg', 'sqlalchemy', 'docker'); "
        "print(sorted(m for m in names if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_pyproject_values_may_be_toml_types(pytester):
    pytester.makepyprojecttoml(
        "[tool.pytest.ini_options]\n"
        "leak_check = false\n"
        "leak_check_pool_threshold = 0.5\n"
        'leak_check_fail_on = ["engine", "pool-threshold"]\n'
        "leak_check_db_per_test = true\n"
    )
    config = pytester.parseconfig()
    assert settings.resolve(config, "leak_check") is False
    assert settings.resolve(config, "leak_check_pool_threshold") == 0.5
    assert settings.resolve(config, "leak_check_fail_on") == {"engine", "pool-threshold"}
    assert settings.resolve(config, "leak_check_db_per_test") is True


def test_bad_marker_stops_a_leak_check_run(pytester):
    pytester.makepyfile(
        "import pytest\n"
        "@pytest.mark.leak_check(mode='loud')\n"
        "def test_x(connguard_database):\n    pass\n"
    )
    result = run_pytest(pytester.path, "--leak-check", "--leak-check-db=local")
    assert result.returncode == 4, result.stdout + result.stderr
    assert "@pytest.mark.leak_check(mode='loud') (marker on test_bad_marker_stops" in result.stderr


def test_without_psycopg_it_is_one_line_naming_the_extra(pytester, tmp_path):
    # An installed psycopg shadowed by one that cannot be imported, as in an environment
    # without the `leak` extra.
    shadow = tmp_path / "shadow"
    (shadow / "psycopg").mkdir(parents=True)
    (shadow / "psycopg" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'psycopg'\", name='psycopg')\n"
    )
    pytester.makepyfile("def test_ok():\n    pass\n")
    paths = [str(shadow), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    result = run_pytest(pytester.path, "--leak-check", "--leak-check-db=local",
                        env={"PYTHONPATH": os.pathsep.join(paths)})  # fmt: skip
    assert result.returncode == 4, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1
    assert "No module named 'psycopg'" in errors[0]
    assert "pip install 'connguard[leak]'" in errors[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("path", ["/proc/nope/r.json", "a_directory"])
def test_a_report_path_that_cannot_be_written_stops_the_run_before_it(pytester, path):
    pytester.mkdir("a_directory")
    pytester.makepyfile("def test_ok():\n    pass\n")
    result = run_pytest(pytester.path, "--leak-check", f"--leak-check-report={path}")
    assert result.returncode == 4, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1
    assert f"--leak-check-report='{path}' (command line): cannot write the report" in errors[0]
    assert "Traceback" not in result.stderr
    assert not list(pytester.path.glob("*.tmp")) and not list(pytester.path.glob("a_directory/*"))


def test_a_report_that_cannot_be_written_at_the_end_is_one_line_and_fails_the_run(pytester):
    pytester.makepyfile(
        """
        import os

        def test_takes_the_reports_place(connguard_database):
            os.mkdir("report.json")
        """
    )
    result = run_pytest(pytester.path, "--leak-check", "--leak-check-db=local",
                        "--leak-check-report=report.json")  # fmt: skip
    assert result.returncode == 4, result.stdout + result.stderr
    assert "1 passed" in result.stdout
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if "cannot write the leak report" in line]
    report = pytester.path / "report.json"
    assert errors == [f"ERROR: connguard: cannot write the leak report {report}: Is a directory"]
    assert "Traceback" not in output and "INTERNALERROR" not in output
    assert not list(pytester.path.glob("*.tmp"))
