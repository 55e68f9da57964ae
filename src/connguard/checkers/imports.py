"""Cross-module resolution: which names a project module exports as resource factories.

pre-commit hands the checker only the changed files, so `from app.db import SessionLocal` in a
route must be understood without `app/db.py` on the command line. We find that module from the
checked file's package root (or the project root), summarise it with
`analysis.module_factories`, and cache the summary for the life of the process. Only files of
the project are read: the roots are derived from the checked files and the working directory,
never from `sys.path`, so site-packages stays out unless the user checks it explicitly.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

# `from x import (a, b as c)` and `import x.y as z`, one statement at a time. Good enough for a
# prefilter: a miss costs a parse (never a finding), a false hit costs only a cached summary.
_FROM_IMPORT = re.compile(
    r"^[ \t]*from[ \t]+(\.*)[ \t]*([\w.]*)[ \t]+import[ \t]*(\([^)]*\)|(?:[^\n\\#;]|\\\n)*)",
    re.MULTILINE,
)
_PLAIN_IMPORT = re.compile(r"^[ \t]*import[ \t]+((?:[^\n\\#;]|\\\n)+)", re.MULTILINE)
_COMMENT = re.compile(r"#[^\n]*")
_STDLIB = frozenset(getattr(sys, "stdlib_module_names", ()))
# Comments and string literals, leftmost first, so that a quote inside a comment or a triple
# quote inside a one-line string does not start a string: a lexer in one regular expression.
_NOT_CODE = re.compile(
    r"#[^\n]*"
    r'|"""[\s\S]*?"""'
    r"|'''[\s\S]*?'''"
    r'|"(?:\\.|[^"\\\n])*"'
    r"|'(?:\\.|[^'\\\n])*'"
)


def code_only(text: str) -> str:
    """`text` with comments dropped and every string literal emptied: docstrings full of
    `from sqlalchemy import create_engine` examples must not count as imports."""
    return _NOT_CODE.sub(lambda m: "" if m.group(0)[0] == "#" else '""', text)


def _pairs(body: str) -> list[tuple[str, str]]:
    """(imported name, local name) for each item of an import list."""
    out = []
    for part in body.split(","):
        words = part.split()
        if words[:1] == ["*"]:
            out.append(("*", "*"))
        elif words and all(w.isidentifier() for w in words[0].split(".")):
            local = words[2] if len(words) == 3 and words[1] == "as" else words[0]
            out.append((words[0], local))
    return out


def iter_from_import_pairs(text: str) -> Iterator[tuple[int, str, list[tuple[str, str]]]]:
    """(relative level, module, [(name, local name)]) for each `from ... import ...`."""
    if "import" not in text:
        return
    for match in _FROM_IMPORT.finditer(text):
        body = _COMMENT.sub("", match.group(3)).strip().strip("()").replace("\\\n", " ")
        yield len(match.group(1)), match.group(2), _pairs(body)


def iter_from_imports(text: str) -> Iterator[tuple[int, str, list[str]]]:
    """(relative level, module, imported names) for each `from ... import ...` in `text`."""
    for level, module, pairs in iter_from_import_pairs(text):
        yield level, module, [name for name, _local in pairs]


def iter_plain_import_pairs(text: str) -> Iterator[tuple[str, str]]:
    """(module, local name) for `import a.b, c as d`: ("a.b", "a"), ("c", "d")."""
    for match in _PLAIN_IMPORT.finditer(text):
        for name, local in _pairs(match.group(1).replace("\\\n", " ")):
            if name != "*":
                yield name, (local if local != name else name.split(".", 1)[0])


def iter_plain_imports(text: str) -> Iterator[str]:
    """Modules named by `import a.b, c as d` statements."""
    for name, _local in iter_plain_import_pairs(text):
        yield name


def absolute_module(level: int, module: str, importer: str | None, is_package: bool) -> str | None:
    """The absolute name a relative import refers to, from the importing module's name."""
    if level == 0:
        return module or None
    if not importer:
        return None
    parts = importer.split(".")
    if not is_package:
        parts = parts[:-1]
    if level - 1 > len(parts):
        return None
    base = parts[: len(parts) - (level - 1)]
    if module:
        base = [*base, module]
    return ".".join(base) or None


def module_name_for(path: Path) -> tuple[str | None, Path, bool]:
    """(dotted module name, the directory it is importable from, whether it is a package)."""
    try:
        path = path.resolve()
    except OSError:
        path = path.absolute()
    is_package = path.name == "__init__.py"
    parts = [] if is_package else [path.stem]
    directory = path.parent
    while (directory / "__init__.py").is_file() and directory.parent != directory:
        parts.append(directory.name)
        directory = directory.parent
    if not parts or not all(p.isidentifier() for p in parts):
        return None, directory, is_package
    return ".".join(reversed(parts)), directory, is_package


def read_source(path: Path) -> str:
    """A Python file's text, honouring a PEP 263 coding cookie; raises OSError or ValueError."""
    data = path.read_bytes()
    return decode_source(data)


def decode_source(data: bytes) -> str:
    """Python source bytes as text (a byte-order mark dropped, newlines untouched)."""
    return data.decode(source_encoding(data))


def source_encoding(data: bytes) -> str:
    """The codec Python reads this source with: its PEP 263 cookie, else UTF-8; "utf-8-sig"
    when it starts with a byte-order mark, so that encoding text with it puts the mark back.
    A bad cookie raises ValueError."""
    # tokenize only when a cookie is possible: most files have none, and this runs per file.
    if any(b"coding" in line for line in data[:400].split(b"\n", 2)[:2]):
        import io
        import tokenize

        try:
            encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
        except SyntaxError as exc:
            raise ValueError(str(exc)) from None
        return encoding
    return "utf-8-sig" if data.startswith(b"\xef\xbb\xbf") else "utf-8"


@lru_cache(maxsize=1024)
def _is_installed_dir(path: Path) -> bool:
    """site-packages and the like: third-party code, not the project's."""
    parts = set(path.parts)
    if "site-packages" in parts or "dist-packages" in parts:
        return True
    import sysconfig

    stdlib = sysconfig.get_paths().get("stdlib")
    return bool(stdlib) and (path == Path(stdlib) or Path(stdlib) in path.parents)


class ProjectImports:
    """The ImportResolver of `analysis`: module summaries of one project, cached per process."""

    def __init__(self, table: Any, roots: Iterable[Path] = ()) -> None:
        self.table = table
        self.roots: list[Path] = []
        # root -> top-level packages that may be read from it (None: any). A root that is an
        # installed-packages directory only serves the package of the file checked there.
        self._allowed: dict[Path, set[str] | None] = {}
        self._found: dict[str, tuple[Path, bool] | None] = {}
        self._summaries: dict[str, dict[str, Any]] = {}  # final answers
        # Answers computed while an import cycle was open: they may miss names that flow
        # through the cycle, so they are recomputed once when asked for from the top.
        self._provisional: dict[str, dict[str, Any]] = {}
        self._stack: list[str] = []
        self._tainted: set[str] = set()
        self._skip_roots = frozenset(getattr(table, "roots", ())) | _STDLIB
        self.table_names = table_names(table)
        # names that are only types (`AsyncEngine`): their methods create, not their calls
        self.table_types = frozenset(getattr(table, "types", ())) - frozenset(
            getattr(table, "factories", ())
        )
        self.table_factories = frozenset(getattr(table, "factories", ()))
        # both (`async_sessionmaker`): a parameter annotated with it is a source already
        self.table_source_types = frozenset(getattr(table, "types", ())) & self.table_factories
        for root in roots:
            self.add_root(root)

    # -- where modules live -------------------------------------------------------------
    def add_root(self, root: Path, package: str | None = None) -> None:
        try:
            root = root.resolve()
        except OSError:
            return
        if not root.is_dir():
            return
        restricted = _is_installed_dir(root)
        if root in self._allowed:
            allowed = self._allowed[root]
            if allowed is None or package is None or package in allowed:
                return
            allowed.add(package)
        else:
            if restricted and package is None:
                return  # never search installed packages on behalf of the project
            self._allowed[root] = {package} if restricted else None
            self.roots.append(root)
        # a root added later can make a previously unknown module findable
        for name in [n for n, v in self._found.items() if v is None]:
            del self._found[name]
            self._summaries.pop(name, None)

    def add_project_roots(self, start: Path) -> None:
        """The working directory-style roots: `start` and its `src/` (src layout)."""
        self.add_root(start)
        self.add_root(start / "src")

    def register_file(self, path: Path) -> tuple[str | None, bool]:
        """Note a checked file's package root; returns its module name and package flag."""
        module, root, is_package = module_name_for(path)
        self.add_root(root, module.split(".", 1)[0] if module else None)
        return module, is_package

    def find(self, module: str) -> tuple[Path, bool] | None:
        if module in self._found:
            return self._found[module]
        rel = module.replace(".", os.sep)
        top = module.split(".", 1)[0]
        hit = None
        for root in self.roots:
            allowed = self._allowed[root]
            if allowed is not None and top not in allowed:
                continue
            package = root / rel / "__init__.py"
            if package.is_file():
                hit = (package, True)
                break
            plain = root / (rel + ".py")
            if plain.is_file():
                hit = (plain, False)
                break
        self._found[module] = hit
        return hit

    # -- what they export ---------------------------------------------------------------
    def summary(self, module: str) -> dict[str, Any]:
        """name -> ResourceSpec for what `module` exports as makers/factories; {} if unknown."""
        cached = self._summaries.get(module)
        if cached is not None:
            return cached
        if module.startswith("."):
            return {}  # a relative import in a module whose own name is unknown
        if module in self._stack:
            # an import cycle: whoever asked gets a partial answer, and so is partial itself
            self._tainted.update(self._stack[self._stack.index(module) + 1 :])
            return self._provisional.get(module, {})
        if module in self._provisional and self._stack:
            self._tainted.add(self._stack[-1])
            return self._provisional[module]
        final = not self._stack  # asked from the top: this answer is as good as it gets
        found = self.find(module)
        if found is None:
            return {}
        path, is_package = found
        self._stack.append(module)
        try:
            result = self._summarise(path, module, is_package)
        finally:
            self._stack.pop()
            tainted = module in self._tainted
            self._tainted.discard(module)
        if tainted and not final:
            self._provisional[module] = result
            if self._stack:
                self._tainted.add(self._stack[-1])
        else:
            self._summaries[module] = result
            self._provisional.pop(module, None)
        return result

    def _summarise(self, path: Path, module: str, is_package: bool) -> dict[str, Any]:
        try:
            text = read_source(path)
        except (OSError, ValueError):
            return {}
        from connguard.checkers import resources

        code = code_only(text)
        creates = resources.may_hold_resource(text, self.table) and binds_table_name(
            code, self.table_names, module, is_package
        )
        if not creates and not self.imports_factory(code, module, is_package):
            return {}
        from connguard.checkers import analysis

        # module_factories has no path to tell a package from a module; naming the package's
        # __init__ makes its relative imports (`from .db import X`) resolve inside the package
        name = f"{module}.__init__" if is_package else module
        try:
            return dict(
                analysis.module_factories(text, table=self.table, imports=self, module_name=name)
            )
        except Exception:
            # A module we merely consult must not fail the file being checked: unparsable or
            # surprising, it simply exports no factories.
            return {}

    def resolve(self, module: str, name: str) -> Any:
        """Is `name`, imported from project module `module`, a resource maker or factory?"""
        spec = self.summary(module).get(name)
        if spec is not None:
            return spec
        return None

    def imports_factory(self, text: str, module: str | None, is_package: bool) -> bool:
        """Does `text` import a name that a project module exports as a factory? (no parse)"""
        if not self.roots:
            return False
        for level, name, names in iter_from_imports(text):
            target = absolute_module(level, name, module, is_package)
            if target is None or target.split(".", 1)[0] in self._skip_roots:
                continue  # the table covers its libraries; the stdlib holds no project makers
            summary = self.summary(target)
            if summary and ("*" in names or any(n in summary for n in names)):
                return True
            if not summary:
                # `from pkg import db` imports a submodule; `db.SessionLocal()` follows
                for sub in names:
                    if (
                        sub != "*"
                        and self.find(f"{target}.{sub}")
                        and self.summary(f"{target}.{sub}")
                    ):
                        return True
        for name in iter_plain_imports(text):
            if name.split(".", 1)[0] in self._skip_roots:
                continue
            if self.find(name) is not None and self.summary(name):
                return True
        return False


def table_names(table: Any) -> frozenset[str]:
    """Every qualified name of the table and every module path above one: an import must bind
    one of these for the analysis (which resolves names, never spells them) to see a creation."""
    out: set[str] = set()
    for qualified in (*getattr(table, "factories", ()), *getattr(table, "types", ())):
        parts = qualified.split(".")
        for i in range(1, len(parts) + 1):
            out.add(".".join(parts[:i]))
    return frozenset(out)


def binds_table_name(
    text: str,
    names: frozenset[str],
    module: str | None,
    is_package: bool,
    *,
    types: frozenset[str] = frozenset(),
    factories: frozenset[str] | None = None,
    used: bool = False,
    source_types: frozenset[str] = frozenset(),
) -> bool:
    """Does `text` import something of the table (`from sqlalchemy.orm import Session`,
    `import asyncpg`, a relative import that lands on one inside a table library)?
    With `used`, the name must also be used where it could create something: called,
    reached through (`asyncpg.connect`), aliased, subclassed; a type (`AsyncEngine`) must
    appear at all. An import used only in annotations or isinstance() creates nothing."""
    bound: list[tuple[str, str]] = []  # (qualified, local)
    for level, name, pairs in iter_from_import_pairs(text):
        target = absolute_module(level, name, module, is_package)
        if target is None or target.split(".", 1)[0] not in names:
            continue
        for item, local in pairs:
            if item == "*":
                if target in names:
                    return True
            elif f"{target}.{item}" in names:
                bound.append((f"{target}.{item}", local))
    for name, local in iter_plain_import_pairs(text):
        if name.split(".", 1)[0] in names:
            bound.append((name if local != name.split(".", 1)[0] else local, local))
    if not bound:
        return False
    if not used:
        return True
    if factories is None:
        factories = names
    body = _PLAIN_IMPORT.sub("", _FROM_IMPORT.sub("", text))
    for qualified, local in bound:
        if qualified in types:
            if _word(local).search(body):
                return True
        elif qualified in factories:
            if _creating_use(local).search(body):
                return True
            if qualified in source_types and _word(local).search(body):
                return True
        else:
            # a module or class above table names (`engine`, `asyncpg`, `AsyncConnection`):
            # only reaching one of those names through it can create something
            for match in _attribute_of(local).finditer(body):
                if f"{qualified}.{match.group(1)}" in names:
                    return True
            if _aliased(local).search(body):
                return True
    return False


@lru_cache(maxsize=512)
def _word(name: str) -> re.Pattern[str]:
    return re.compile(rf"(?<![\w.]){re.escape(name)}\b")


@lru_cache(maxsize=512)
def _attribute_of(name: str) -> re.Pattern[str]:
    return re.compile(rf"(?<![\w.]){re.escape(name)}\s*\.\s*(\w+)")


@lru_cache(maxsize=512)
def _aliased(name: str) -> re.Pattern[str]:
    return re.compile(rf"(?<![=!<>])=\s*{re.escape(name)}\s*(?:$|[,)#;])", re.MULTILINE)


@lru_cache(maxsize=512)
def _creating_use(name: str) -> re.Pattern[str]:
    n = re.escape(name)
    return re.compile(
        rf"(?<![\w.]){n}\s*[(.]"  # called, or reached through
        rf"|(?<![=!<>])=\s*{n}\s*(?:$|[,)#;])"  # aliased, or given as `class_=...`
        rf"|^[ \t]*class\s+\w+\s*\([^)]*(?<![\w.]){n}\b",  # subclassed
        re.MULTILINE,
    )
