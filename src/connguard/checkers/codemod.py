"""The `async with` autofix as a LibCST codemod command, for bulk runs with `libcst.tool`.

    python -m libcst.tool codemod -x --no-format --jobs=4 \
        connguard.checkers.codemod.AsyncWithCommand src/

`-x` makes libcst.tool import the command by its full module path (no .libcst.codemod.yaml
needed); `--no-format` because libcst.tool would otherwise pipe the result through black; and
`--jobs=N` in that spelling, since libcst.tool's first argument pass reads `-j N`'s N as the
command. Declined findings are printed as codemod warnings, with the reason.
"""

from __future__ import annotations

import libcst as cst
from libcst.codemod import CodemodCommand, SkipFile

from connguard.checkers.fixes import fix_source


class AsyncWithCommand(CodemodCommand):
    DESCRIPTION = (
        "Rewrite database sessions/connections that are never safely closed into `async with` "
        "(connguard CG101/CG102), when the rewrite is verified safe."
    )

    def transform_module_impl(self, tree: cst.Module) -> cst.Module:
        path = self.context.filename or "<codemod>"
        outcome = fix_source(tree.code, path)
        for finding, reason in outcome.declined:
            self.warn(f"{finding.line}:{finding.col}: {finding.code} not fixed: {reason}")
        if not outcome.changed:
            raise SkipFile("nothing to fix")
        return cst.parse_module(outcome.source)
