"""The value every checker path produces: one finding at one source range."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True, order=True)
class Finding:
    """A rule's verdict on one creating call. Lines and columns are 1-based, as editors show."""

    path: str
    line: int
    col: int
    code: str
    message: str
    end_line: int = 0
    end_col: int = 0

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def text(self) -> str:
        return f"{self.path}:{self.line}:{self.col}: {self.code} {self.message}"
