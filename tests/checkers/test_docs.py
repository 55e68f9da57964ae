"""The rule reference page is generated from the rule classes and must match them."""

from pathlib import Path

from connguard.checkers.rules import RULES
from connguard.checkers.rules.docs import render

PAGE = Path(__file__).resolve().parents[2] / "docs" / "rules.md"


def test_rules_page_is_generated_from_the_classes() -> None:
    assert PAGE.read_text() == render(), (
        "docs/rules.md is stale: python -m connguard.checkers.rules.docs > docs/rules.md"
    )


def test_every_rule_has_its_sections_and_examples() -> None:
    page = render()
    for code, rule in RULES.items():
        assert f"## {code} `{rule.NAME}`" in page
        assert rule.VALID and rule.INVALID, code
        for section in ("What it does", "Why is this bad?", "Example", "Use instead", "Fix safety"):
            assert section in (rule.__doc__ or ""), (code, section)
