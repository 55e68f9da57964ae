"""Every rule's VALID snippets give no finding; its INVALID snippets give exactly the marked ones.

A marked line ends with `# CG1xx` (several codes separated by spaces). Tests are generated from
the rule classes, so a rule's documentation and its tests cannot drift apart.
"""

from __future__ import annotations

import re

import pytest

from connguard.checkers.analysis import check_module
from connguard.checkers.exemptions import EXAMPLES
from connguard.checkers.resources import DEFAULT_TABLE
from connguard.checkers.rules import RULES

_MARK = re.compile(r"#\s*((?:CG\d{3}\s*)+)$")


def expected_marks(source: str) -> set[tuple[int, str]]:
    marks = set()
    for number, line in enumerate(source.splitlines(), start=1):
        found = _MARK.search(line)
        if found:
            for code in found.group(1).split():
                marks.add((number, code))
    return marks


def findings(source: str) -> set[tuple[int, str]]:
    result = check_module(source, "example.py", table=DEFAULT_TABLE, enabled=set(RULES))
    return {(f.line, f.code) for f in result}


_VALID = [(code, i, s) for code, rule in RULES.items() for i, s in enumerate(rule.VALID)]
_INVALID = [(code, i, s) for code, rule in RULES.items() for i, s in enumerate(rule.INVALID)]


@pytest.mark.parametrize(
    ("code", "index", "source"), _VALID, ids=[f"{c}-valid-{i}" for c, i, _ in _VALID]
)
def test_valid_examples_are_clean(code: str, index: int, source: str) -> None:
    assert findings(source) == set()


@pytest.mark.parametrize(
    ("code", "index", "source"), _INVALID, ids=[f"{c}-invalid-{i}" for c, i, _ in _INVALID]
)
def test_invalid_examples_flag_exactly_the_marked_lines(code: str, index: int, source: str) -> None:
    marks = expected_marks(source)
    assert any(c == code for _, c in marks), "an INVALID example must mark its own rule's code"
    assert findings(source) == marks


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_exemption_examples_are_clean(name: str) -> None:
    assert findings(EXAMPLES[name]) == set()


@pytest.mark.parametrize("code", sorted(RULES))
def test_rule_class_is_a_complete_spec(code: str) -> None:
    rule = RULES[code]
    assert rule.CODE == code
    assert re.fullmatch(r"[a-z]+(-[a-z]+)+", rule.NAME)
    doc = rule.documentation()
    for section in ("What it does:", "Why is this bad?", "Example:", "Use instead:", "Fix safety:"):
        assert section in doc, section
    assert rule.VALID and rule.INVALID
