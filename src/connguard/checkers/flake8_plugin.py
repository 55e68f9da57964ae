"""The flake8 adapter: the engine's raw findings as flake8 results (flake8 owns noqa, selection)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from connguard import __version__


class Plugin:
    """flake8 tree plugin `CG`. flake8 has already read and tokenised the file: we take its
    `lines` rather than reading again, and ignore its `ast` tree (our analysis is on LibCST,
    and the text prefilter usually spares the parse altogether)."""

    name = "connguard"
    version = __version__

    def __init__(self, tree: Any, filename: str, lines: Sequence[str]) -> None:
        self.filename = filename
        self.lines = lines

    def run(self) -> Iterator[tuple[int, int, str, type]]:
        from connguard.checkers import engine
        from connguard.checkers.config import ConfigError

        source = "".join(self.lines)
        path = self.filename
        try:
            config = engine.config_for_path(path) if path not in ("stdin", "-") else _default()
        except ConfigError as exc:
            yield 1, 0, f"CG999 bad [tool.connguard] configuration: {exc}", type(self)
            return
        for finding in engine.analyse(source, path, config, syntax_check=False, select=False):
            yield (
                finding.line,
                max(finding.col - 1, 0),
                f"{finding.code} {finding.message}",
                type(self),
            )


def _default() -> Any:
    from connguard.checkers.config import Config

    return Config()
