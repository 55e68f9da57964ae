"""The rule base class: one door (`report`) from a resource's fate to a finding."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import libcst as cst

    from ..analysis import Fate

# Snippets in VALID/INVALID start from this, so each one reads on its own in `--explain`.
PRELUDE = """\
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

engine = create_async_engine("postgresql+asyncpg://localhost/app")
AsyncSessionLocal = async_sessionmaker(engine)
"""


class Rule:
    """A rule turns fates into findings. Subclasses set the class attributes and `check`."""

    CODE: ClassVar[str] = ""
    NAME: ClassVar[str] = ""
    MESSAGE: ClassVar[str] = ""
    DEFAULT_ENABLED: ClassVar[bool] = True
    VALID: ClassVar[list[str]] = []
    INVALID: ClassVar[list[str]] = []

    def __init__(self, sink: list[tuple[str, cst.CSTNode, str]]) -> None:
        self._sink = sink

    def check(self, fate: Fate) -> None:
        raise NotImplementedError

    def report(self, node: cst.CSTNode, **fields: str) -> None:
        """The one door: the engine decides selection and noqa; positions come later."""
        self._sink.append((self.CODE, node, self.MESSAGE.format(**fields)))

    @classmethod
    def documentation(cls) -> str:
        import inspect

        doc = inspect.cleandoc(cls.__doc__ or "")
        return f"{cls.CODE} ({cls.NAME})\n\n{doc}\n"


def call_text(fate: Fate) -> str:
    from ..analysis import node_text

    text = node_text(fate.node)
    if len(text) > 60 or "\n" in text:
        func = getattr(fate.node, "func", None)
        head = node_text(func) if func is not None else text[:40]
        text = f"{head}(...)" if len(head) < 50 else head[:47] + "..."
    return text


def advice(fate: Fate) -> str:
    if fate.advice:
        return fate.advice
    if fate.spec.scoped:
        return 'call "remove()" on the scoped_session registry in "finally"'
    return fate.spec.suggestion(call_text(fate), fate.var)


def is_pool_like(fate: Fate) -> bool:
    return fate.spec.kind in ("engine", "pool")
