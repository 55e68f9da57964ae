"""The rules: code -> rule class. Each rule module holds its spec (docs, VALID and INVALID)."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import TYPE_CHECKING

from .base import Rule
from .close_not_awaited import CloseNotAwaited
from .dependency_returns_resource import DependencyReturnsResource
from .engine_not_disposed import EngineNotDisposed
from .never_released import NeverReleased
from .not_released_on_error import NotReleasedOnError
from .shared_session import SharedSession
from .sync_with_on_async import SyncWithOnAsync
from .transaction_taken_for_close import TransactionTakenForClose
from .unshielded_close import UnshieldedClose

if TYPE_CHECKING:
    import libcst as cst

    from ..analysis import Fate

RULES: dict[str, type[Rule]] = {
    rule.CODE: rule
    for rule in (
        NeverReleased,
        NotReleasedOnError,
        CloseNotAwaited,
        SyncWithOnAsync,
        TransactionTakenForClose,
        DependencyReturnsResource,
        EngineNotDisposed,
        SharedSession,
        UnshieldedClose,
    )
}

DEFAULT_ENABLED: frozenset[str] = frozenset(
    code for code, rule in RULES.items() if rule.DEFAULT_ENABLED
)


def run_rules(
    fates: Iterable[Fate], enabled: Collection[str] | None = None
) -> list[tuple[str, cst.CSTNode, str]]:
    """(code, node, message) for every enabled rule and fate; enabled=None: DEFAULT_ENABLED."""
    codes = DEFAULT_ENABLED if enabled is None else enabled
    sink: list[tuple[str, cst.CSTNode, str]] = []
    rules = [rule(sink) for code, rule in RULES.items() if code in codes]
    for fate in fates:
        for rule in rules:
            rule.check(fate)
    return sink


__all__ = ["DEFAULT_ENABLED", "RULES", "Rule", "run_rules"]
