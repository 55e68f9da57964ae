"""The rule reference page, generated from the rule classes (`python -m ...rules.docs`)."""

from __future__ import annotations

import inspect
import sys
import textwrap

from . import RULES
from .base import PRELUDE

HEADER = """\
# connguard rules

Generated from the rule classes by `python -m connguard.checkers.rules.docs > docs/rules.md`;
edit the classes, not this page. `check-async-resources --explain CODE` prints the same text.
Examples start from this prelude:

```python
{prelude}```
"""


def _examples(title: str, snippets: list[str]) -> list[str]:
    out = [f"### {title}", ""]
    for snippet in snippets:
        body = snippet[len(PRELUDE) :] if snippet.startswith(PRELUDE) else snippet
        out += ["```python", body.strip("\n"), "```", ""]
    return out


SECTIONS = ("What it does", "Why is this bad?", "Example", "Use instead", "Fix safety")
CODE_SECTIONS = ("Example", "Use instead")


def _markdown(doc: str) -> list[str]:
    """The docstring's sections as Markdown: headings, prose dedented, examples fenced."""
    out: list[str] = []
    section = ""
    block: list[str] = []

    def flush() -> None:
        text = textwrap.dedent("\n".join(block)).strip("\n")
        if section in CODE_SECTIONS and text:
            out.extend(["```python", text, "```", ""])
        elif text:
            out.extend([text, ""])
        block.clear()

    for line in doc.splitlines():
        if line.rstrip(":") in SECTIONS:
            flush()
            section = line.rstrip(":")
            out.extend([f"**{section}**", ""])
        else:
            block.append(line)
    flush()
    return out


def render() -> str:
    out = [HEADER.format(prelude=PRELUDE)]
    for code, rule in sorted(RULES.items()):
        state = "" if rule.DEFAULT_ENABLED else " (off by default: select it to enable)"
        out += [f"## {code} `{rule.NAME}`{state}", ""]
        out += _markdown(inspect.cleandoc(rule.__doc__ or ""))
        out += _examples("Flagged (INVALID)", rule.INVALID)
        out += _examples("Not flagged (VALID)", rule.VALID)
    return "\n".join(out).rstrip("\n") + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
