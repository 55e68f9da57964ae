"""Findings as text: plain lines, JSON, SARIF 2.1.0 and GitHub Actions annotations."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from connguard.checkers.config import INTERNAL_ERROR, PARSE_ERROR
from connguard.checkers.findings import Finding

SARIF_SCHEMA = (
    "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"
)
INFORMATION_URI = "https://github.com/connguard/connguard"

# The engine's own codes, described like rules so SARIF results can point at them.
ENGINE_RULES = {
    PARSE_ERROR: ("cannot-parse", "The file could not be read or parsed, so it was not checked."),
    INTERNAL_ERROR: ("internal-error", "connguard failed on this file; please report it."),
}


def format_text(findings: Sequence[Finding], not_fixed: Mapping[Finding, str] | None = None) -> str:
    """One line per finding; `not_fixed`: why --fix left some of them, said at their end."""
    not_fixed = not_fixed or {}
    return "".join(
        f.text() + (f" (not fixed: {not_fixed[f]})" if f in not_fixed else "") + "\n"
        for f in findings
    )


def format_json(findings: Sequence[Finding]) -> str:
    import json

    rows = [
        {
            "path": f.path,
            "line": f.line,
            "col": f.col,
            "end_line": f.end_line or f.line,
            "end_col": f.end_col or f.col,
            "code": f.code,
            "message": f.message,
        }
        for f in findings
    ]
    return json.dumps(rows, indent=2) + "\n"


def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def format_github(findings: Sequence[Finding]) -> str:
    """GitHub Actions workflow commands: each finding becomes an annotation on the diff."""
    lines = []
    for f in findings:
        props = [f"file={_escape_property(f.path)}", f"line={f.line}", f"col={f.col}"]
        if f.end_line:
            props.append(f"endLine={f.end_line}")
            if f.end_col:
                props.append(f"endColumn={f.end_col}")
        props.append(f"title={_escape_property(f.code)}")
        lines.append(f"::error {','.join(props)}::{_escape_data(f.code + ' ' + f.message)}\n")
    return "".join(lines)


def _rule_descriptors() -> list[tuple[str, str, str, str]]:
    """(code, name, short text, full text) for every rule, then the engine codes."""
    out = []
    try:
        from connguard.checkers.rules import RULES
    except ImportError:
        RULES = {}
    for code, rule in sorted(RULES.items()):
        doc = (rule.__doc__ or "").strip()
        full = (
            " ".join(doc.split("\n\n")[0].split()) if doc else str(getattr(rule, "MESSAGE", code))
        )
        short = str(getattr(rule, "MESSAGE", "") or full).split("\n")[0]
        out.append((code, str(getattr(rule, "NAME", code.lower())), short, doc or full))
    for code, (name, text) in ENGINE_RULES.items():
        out.append((code, name, text, text))
    return out


def _artifact_uri(path: str, base: Path) -> tuple[str, bool]:
    """A URI reference for `path`: relative to `base` (with %SRCROOT%) when under it."""
    from urllib.parse import quote

    p = Path(path)
    try:
        rel = p.resolve().relative_to(base.resolve())
        return quote(rel.as_posix()), True
    except (ValueError, OSError):
        pass
    if p.is_absolute():
        return p.resolve().as_uri(), False
    return quote(p.as_posix()), True


def format_sarif(
    findings: Sequence[Finding],
    *,
    base: Path | None = None,
    version: str = "",
    successful: bool = True,
) -> str:
    import json

    base = base or Path.cwd()
    descriptors = _rule_descriptors()
    index = {code: i for i, (code, *_rest) in enumerate(descriptors)}
    rules = [
        {
            "id": code,
            "name": name,
            "shortDescription": {"text": short},
            "fullDescription": {"text": full.split("\n\n")[0] if full else short},
            "help": {"text": full},
            "defaultConfiguration": {"level": "error"},
        }
        for code, name, short, full in descriptors
    ]
    results = []
    for f in findings:
        uri, relative = _artifact_uri(f.path, base)
        location: dict[str, Any] = {"uri": uri}
        if relative:
            location["uriBaseId"] = "%SRCROOT%"
        region: dict[str, Any] = {"startLine": max(f.line, 1), "startColumn": max(f.col, 1)}
        if f.end_line >= f.line and f.end_line > 0:
            region["endLine"] = f.end_line
            if f.end_col > 0 and (f.end_line > f.line or f.end_col >= f.col):
                region["endColumn"] = f.end_col
        result: dict[str, Any] = {
            "ruleId": f.code,
            "level": "error",
            "message": {"text": f.message},
            "locations": [{"physicalLocation": {"artifactLocation": location, "region": region}}],
        }
        if f.code in index:
            result["ruleIndex"] = index[f.code]
        results.append(result)
    log = {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "connguard",
                        "informationUri": INFORMATION_URI,
                        "version": version or _version(),
                        "rules": rules,
                    }
                },
                "originalUriBaseIds": {"%SRCROOT%": {"uri": base.resolve().as_uri() + "/"}},
                "invocations": [{"executionSuccessful": successful}],
                "columnKind": "unicodeCodePoints",
                "results": results,
            }
        ],
    }
    return json.dumps(log, indent=2) + "\n"


def _version() -> str:
    from connguard import __version__

    return __version__


def format_statistics(findings: Sequence[Finding]) -> str:
    """One line per code, most frequent first: count, code, the rule's name."""
    counts = Counter(f.code for f in findings)
    names: Mapping[str, str] = {}
    if any(code not in ENGINE_RULES for code in counts):
        try:
            from connguard.checkers.rules import RULES

            names = {code: str(getattr(rule, "NAME", "")) for code, rule in RULES.items()}
        except ImportError:
            names = {}
    lines = []
    for code, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        name = names.get(code) or ENGINE_RULES.get(code, ("",))[0]
        lines.append(f"{count:<5} {code} {name}".rstrip() + "\n")
    return "".join(lines)


FORMATTERS: dict[str, Callable[..., str]] = {
    "text": format_text,
    "json": format_json,
    "sarif": format_sarif,
    "github": format_github,
}
