"""The `async with` autofix: rewrite a flagged creation into a context manager, verified or not at all."""

from __future__ import annotations

import difflib
import os
import stat
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import libcst as cst
from libcst.metadata import MetadataWrapper, ParentNodeProvider, PositionProvider

from connguard.checkers.findings import Finding

if TYPE_CHECKING:
    from connguard.checkers.config import Config

# The codes whose finding means "this creation is never (safely) released": exactly the ones an
# `async with` around the rest of the block cures.
FIXABLE_CODES = frozenset({"CG101", "CG102"})

# Methods whose call ends the resource's life; after the rewrite the context manager does this.
RELEASE_METHODS = frozenset({"close", "aclose", "dispose", "terminate"})

# Methods whose result keeps reading from the resource after the call returns: closing the
# resource when the block ends would break a result that escapes the block.
BORROWING_METHODS = frozenset({"stream", "stream_scalars", "cursor"})


class Form(Enum):
    """How the creating call becomes a context manager."""

    ASYNC_CALL = "async with CALL as name"  # the call's result is an async CM (await dropped)
    ASYNC_AWAITED = "async with await CALL as name"  # the awaited result is an async CM
    SYNC = "with CALL as name"


# What each known creating callable becomes, by qualified name; None with a reason: there is no
# context-manager form that releases it. The first value applies when the call is awaited, the
# second when it is not. Keep in step with the libraries: each entry was checked against them.
_Entry = tuple[Form | str | None, Form | str | None]
_NOT_A_CM_ENGINE = "an engine is not a context manager; dispose() it in `finally`"
KNOWN_FORMS: dict[str, _Entry] = {
    "sqlalchemy.ext.asyncio.AsyncSession": (None, Form.ASYNC_CALL),
    "sqlalchemy.ext.asyncio.session.AsyncSession": (None, Form.ASYNC_CALL),
    "sqlalchemy.orm.Session": (None, Form.SYNC),
    "sqlalchemy.orm.session.Session": (None, Form.SYNC),
    "sqlalchemy.ext.asyncio.create_async_engine": (None, _NOT_A_CM_ENGINE),
    "sqlalchemy.create_engine": (None, _NOT_A_CM_ENGINE),
    # asyncpg.connect() resolves to a Connection, which has no __aenter__.
    "asyncpg.connect": (
        "asyncpg's Connection is not an async context manager; close it in `finally`",
        None,
    ),
    # create_pool() returns a Pool that is both awaitable and an async CM (closes on exit).
    "asyncpg.create_pool": (Form.ASYNC_CALL, Form.ASYNC_CALL),
    "asyncpg.pool.create_pool": (Form.ASYNC_CALL, Form.ASYNC_CALL),
    # aiosqlite.connect() returns a Connection that is awaitable and an async CM.
    "aiosqlite.connect": (Form.ASYNC_CALL, None),
    "aiosqlite.core.connect": (Form.ASYNC_CALL, None),
    # psycopg: connect() is a coroutine; the connection it gives is an async CM that closes.
    "psycopg.AsyncConnection.connect": (Form.ASYNC_AWAITED, None),
    "psycopg.connect": (None, Form.SYNC),
    "psycopg.Connection.connect": (None, Form.SYNC),
    "psycopg_pool.AsyncConnectionPool": (None, Form.ASYNC_CALL),
    "psycopg_pool.ConnectionPool": (None, Form.SYNC),
    # aiomysql wraps both in context-manager objects that close on exit.
    "aiomysql.connect": (Form.ASYNC_CALL, None),
    "aiomysql.create_pool": (Form.ASYNC_CALL, None),
}

# Methods on a resource-holding object (not a module): `await engine.connect()` and
# `await pool.acquire()` have an `async with X.m() as c:` form (AsyncEngine.connect,
# asyncpg/aiomysql Pool.acquire). psycopg_pool's getconn() has none (its CM is .connection()).
KNOWN_METHOD_FORMS: dict[str, _Entry] = {
    "connect": (Form.ASYNC_CALL, None),
    "acquire": (Form.ASYNC_CALL, None),
    "getconn": ("psycopg_pool's getconn() has no CM form; use `async with pool.connection()`", None),
}

# Methods whose release is a call on another object taking the resource: pool.release(conn).
RELEASED_BY_RECEIVER = {"acquire": frozenset({"release"})}


class Declined(Exception):
    """The fix cannot be applied safely; the message says why, for the user."""


@dataclass
class FixOutcome:
    """The fixer's result for one source: the new text and a verdict per fixable finding."""

    source: str
    applied: list[Finding] = field(default_factory=list)
    declined: list[tuple[Finding, str]] = field(default_factory=list)
    original: str | None = None

    @property
    def changed(self) -> bool:
        return self.original is not None and self.source != self.original


# A function mapping (the module, the creating call, awaited?) to a Form or a reason string.
FormResolver = Callable[[cst.Module, cst.Call, bool], "Form | str"]


# --------------------------------------------------------------------------------------------
# Resolving what the creating call is


def _dotted(expr: cst.BaseExpression) -> str | None:
    if isinstance(expr, cst.Name):
        return expr.value
    if isinstance(expr, cst.Attribute):
        base = _dotted(expr.value)
        return None if base is None else f"{base}.{expr.attr.value}"
    return None


def _import_map(module: cst.Module) -> dict[str, str]:
    """Local name -> qualified name for every import in the module (any depth)."""
    names: dict[str, str] = {}

    class _Imports(cst.CSTVisitor):
        def visit_Import(self, node: cst.Import) -> None:
            for alias in node.names:
                full = _dotted(alias.name) or ""
                if alias.asname is not None and isinstance(alias.asname.name, cst.Name):
                    names[alias.asname.name.value] = full
                else:
                    head = full.split(".")[0]
                    names[head] = head

        def visit_ImportFrom(self, node: cst.ImportFrom) -> None:
            if node.relative or node.module is None or isinstance(node.names, cst.ImportStar):
                return
            base = _dotted(node.module) or ""
            for alias in node.names:
                name = _dotted(alias.name) or ""
                local = name
                if alias.asname is not None and isinstance(alias.asname.name, cst.Name):
                    local = alias.asname.name.value
                names[local] = f"{base}.{name}"

    module.visit(_Imports())
    return names


def _qualified(expr: cst.BaseExpression, imports: dict[str, str]) -> str | None:
    dotted = _dotted(expr)
    if dotted is None:
        return None
    head, _, tail = dotted.partition(".")
    if head not in imports:
        return None
    return imports[head] + ("." + tail if tail else "")


def _spec_form(spec: object, awaited: bool) -> Form | str | None:
    """The form a ResourceSpec from resources.py allows, if it says (fields read defensively)."""
    is_cm = getattr(spec, "async_cm", None)
    if is_cm is None:
        is_cm = getattr(spec, "is_async_cm", None)
    is_async = getattr(spec, "is_async", None)
    if is_cm is None or is_async is None:
        return None
    name = getattr(spec, "display", None) or getattr(spec, "name", None) or "this resource"
    if not is_cm:
        return f"{name} is not a context manager; release it in `finally`"
    if not is_async:
        return Form.SYNC
    return Form.ASYNC_CALL


def default_form(module: cst.Module, call: cst.Call, awaited: bool) -> Form | str:
    """Which context-manager form the creating `call` has; a reason string when it has none."""
    imports = _import_map(module)
    qualified = _qualified(call.func, imports)
    if qualified is not None:
        entry = KNOWN_FORMS.get(qualified)
        if entry is not None:
            chosen = entry[0] if awaited else entry[1]
            if chosen is None:
                how = "awaited" if awaited else "called without await"
                return f"{qualified}() {how} has no context-manager form that releases it"
            return chosen
        # An imported maker or factory from elsewhere: ask the resource table when it knows.
        spec_form = _table_form(qualified, awaited)
        if spec_form is not None:
            return spec_form
    if isinstance(call.func, cst.Attribute):
        receiver = _dotted(call.func.value)
        receiver_is_module = receiver is not None and receiver.split(".")[0] in imports
        entry = KNOWN_METHOD_FORMS.get(call.func.attr.value)
        if entry is not None and not receiver_is_module:
            chosen = entry[0] if awaited else entry[1]
            if isinstance(chosen, (Form, str)):
                return chosen
    if not awaited:
        local = _local_factory_form(module, call)
        if local is not None:
            return local
    return f"cannot tell whether `{cst.Module([]).code_for_node(call.func)}(...)` returns a context manager"


def _table_form(qualified: str, awaited: bool) -> Form | str | None:
    try:
        from connguard.checkers import resources
    except ImportError:
        return None
    table = getattr(resources, "DEFAULT", None) or getattr(resources, "DEFAULT_TABLE", None)
    lookup = getattr(table, "get", None) or getattr(table, "lookup", None)
    if lookup is None:
        return None
    try:
        spec = lookup(qualified)
    except Exception:
        return None
    return None if spec is None else _spec_form(spec, awaited)


def _maker_kind(value: cst.BaseExpression, imports: dict[str, str]) -> Form | str | None:
    """The form of what calling the object built by `value` gives, for the makers we know."""
    if not isinstance(value, cst.Call):
        return None
    qualified = _qualified(value.func, imports)
    if qualified in (
        "sqlalchemy.ext.asyncio.async_sessionmaker",
        "sqlalchemy.ext.asyncio.session.async_sessionmaker",
        "sqlalchemy.ext.asyncio.async_scoped_session",
    ):
        if qualified.endswith("async_scoped_session"):
            return "a scoped session is released by the registry's remove(), not by `async with`"
        return Form.ASYNC_CALL
    if qualified in ("sqlalchemy.orm.sessionmaker", "sqlalchemy.orm.session.sessionmaker"):
        for arg in value.args:
            if arg.keyword is not None and arg.keyword.value == "class_":
                target = _qualified(arg.value, imports) or ""
                if target.endswith("AsyncSession"):
                    return Form.ASYNC_CALL
                return None
        return Form.SYNC
    return None


def _local_factory_form(module: cst.Module, call: cst.Call) -> Form | str | None:
    """`X()` where X is a module-level session maker, or a function returning a maker's call."""
    if not isinstance(call.func, cst.Name):
        return None
    name = call.func.value
    imports = _import_map(module)
    makers: dict[str, Form | str] = {}
    functions: dict[str, cst.FunctionDef] = {}
    for stmt in module.body:
        if isinstance(stmt, cst.SimpleStatementLine):
            for small in stmt.body:
                if isinstance(small, cst.Assign) and len(small.targets) == 1:
                    target = small.targets[0].target
                    if isinstance(target, cst.Name):
                        kind = _maker_kind(small.value, imports)
                        if kind is not None:
                            makers[target.value] = kind
        elif isinstance(stmt, cst.FunctionDef):
            functions[stmt.name.value] = stmt
    if name in makers:
        return makers[name]
    func = functions.get(name)
    if func is None or func.asynchronous is not None:
        return _imported_factory_form(module, name, imports)
    # def make(): return Maker() -- the call site gets what Maker() gives.
    returns = [
        node
        for node in _walk(func.body)
        if isinstance(node, cst.Return) and node.value is not None
    ]
    forms = set()
    for ret in returns:
        value = ret.value
        if isinstance(value, cst.Call) and isinstance(value.func, cst.Name):
            if value.func.value in makers:
                forms.add(makers[value.func.value])
                continue
            q = _qualified(value.func, imports)
            entry = KNOWN_FORMS.get(q or "")
            if entry is not None:
                forms.add(entry[1] if entry[1] is not None else "not a context manager")
                continue
        return None
    if len(forms) == 1:
        only = forms.pop()
        return only if isinstance(only, Form) else None
    return None


def _imported_factory_form(module: cst.Module, name: str, imports: dict[str, str]) -> Form | str | None:
    """A maker imported from another module: trust the analysis' resolution when it exposes one."""
    qualified = imports.get(name)
    if qualified is None:
        return None
    return _table_form(qualified, False)


def _walk(node: cst.CSTNode):
    yield node
    for child in node.children:
        yield from _walk(child)


# --------------------------------------------------------------------------------------------
# Reading how a name is used


@dataclass
class _Use:
    node: cst.Name
    kind: str  # "attr": `name.x`; "bare": anything else (passed, stored, returned, rebound ...)
    attr: str | None
    nested: bool  # inside a def, lambda or class: may run after the block ends


class _Uses(cst.CSTVisitor):
    def __init__(self, name: str) -> None:
        self.name = name
        self.uses: list[_Use] = []
        self.depth = 0

    def _scope_in(self, _node: cst.CSTNode) -> None:
        self.depth += 1

    def _scope_out(self, _node: cst.CSTNode) -> None:
        self.depth -= 1

    def visit_FunctionDef(self, node: cst.FunctionDef) -> None:
        if node.name.value == self.name:
            self.uses.append(_Use(node.name, "bare", None, self.depth > 0))
        self.depth += 1

    def leave_FunctionDef(self, original_node: cst.FunctionDef) -> None:
        self.depth -= 1

    def visit_ClassDef(self, node: cst.ClassDef) -> None:
        if node.name.value == self.name:
            self.uses.append(_Use(node.name, "bare", None, self.depth > 0))
        self.depth += 1

    def leave_ClassDef(self, original_node: cst.ClassDef) -> None:
        self.depth -= 1

    def visit_Lambda(self, node: cst.Lambda) -> None:
        self.depth += 1

    def leave_Lambda(self, original_node: cst.Lambda) -> None:
        self.depth -= 1

    def visit_Attribute(self, node: cst.Attribute) -> bool:
        if isinstance(node.value, cst.Name):
            if node.value.value == self.name:
                self.uses.append(_Use(node.value, "attr", node.attr.value, self.depth > 0))
            return False
        node.value.visit(self)
        return False

    def visit_Arg(self, node: cst.Arg) -> bool:
        node.value.visit(self)
        return False

    def visit_Name(self, node: cst.Name) -> None:
        if node.value == self.name:
            self.uses.append(_Use(node, "bare", None, self.depth > 0))


def _uses(nodes: Sequence[cst.CSTNode], name: str) -> list[_Use]:
    visitor = _Uses(name)
    for node in nodes:
        node.visit(visitor)
    return visitor.uses


def _is_release_call(
    expr: cst.BaseExpression, name: str, receiver: str | None, release_methods: frozenset[str]
) -> bool:
    """`[await] name.close()` or `[await] receiver.release(name)` (the pool form)."""
    if isinstance(expr, cst.Await):
        expr = expr.expression
    if not isinstance(expr, cst.Call) or not isinstance(expr.func, cst.Attribute):
        return False
    func = expr.func
    if isinstance(func.value, cst.Name) and func.value.value == name:
        return func.attr.value in RELEASE_METHODS and not expr.args
    if receiver is not None and func.attr.value in release_methods and len(expr.args) == 1:
        arg = expr.args[0]
        return (
            arg.keyword is None
            and arg.star == ""
            and isinstance(arg.value, cst.Name)
            and arg.value.value == name
            and _dotted(func.value) == receiver
        )
    return False


def _release_statement(
    stmt: cst.BaseStatement, name: str, receiver: str | None, release_methods: frozenset[str]
) -> bool:
    if not isinstance(stmt, cst.SimpleStatementLine) or len(stmt.body) != 1:
        return False
    small = stmt.body[0]
    return isinstance(small, cst.Expr) and _is_release_call(
        small.value, name, receiver, release_methods
    )


def _finally_only_releases(
    stmt: cst.BaseStatement, name: str, receiver: str | None, release_methods: frozenset[str]
) -> bool:
    if not isinstance(stmt, cst.Try) or stmt.finalbody is None:
        return False
    body = stmt.finalbody.body.body
    return len(body) == 1 and _release_statement(body[0], name, receiver, release_methods)


# --------------------------------------------------------------------------------------------
# The rewrite of one creation


@dataclass
class _Site:
    stmt: cst.SimpleStatementLine
    block: cst.IndentedBlock
    function: cst.FunctionDef
    name: str
    annotation: cst.Annotation | None
    call: cst.Call
    awaited: bool


def _locate(wrapper: MetadataWrapper, line: int, col: int) -> _Site:
    positions = wrapper.resolve(PositionProvider)
    parents = wrapper.resolve(ParentNodeProvider)
    target = col - 1
    exact: list[cst.CSTNode] = []
    on_line: list[cst.CSTNode] = []
    for node, pos in positions.items():
        if isinstance(node, (cst.Call, cst.Await)) and pos.start.line == line:
            on_line.append(node)
            if pos.start.column == target:
                exact.append(node)
    candidates = exact or on_line
    if not candidates:
        raise Declined("no call found at the reported position")

    def statement_of(node: cst.CSTNode) -> cst.CSTNode | None:
        current: cst.CSTNode | None = node
        while current is not None and not isinstance(current, cst.BaseStatement):
            current = parents.get(current)
        return current

    statements = {id(s): s for s in (statement_of(n) for n in candidates) if s is not None}
    if len(statements) != 1:
        raise Declined("more than one statement on the reported line")
    stmt = next(iter(statements.values()))

    if isinstance(stmt, cst.With):
        raise Declined("the resource is already entered with `with`; use `async with` by hand")
    if not isinstance(stmt, cst.SimpleStatementLine):
        raise Declined("the creation is not a simple assignment statement")
    if len(stmt.body) != 1:
        raise Declined("the creation shares its line with other statements")
    small = stmt.body[0]
    annotation = None
    if isinstance(small, cst.Assign):
        if len(small.targets) != 1:
            raise Declined("the resource is assigned to several targets")
        target_expr = small.targets[0].target
        value = small.value
    elif isinstance(small, cst.AnnAssign) and small.value is not None:
        target_expr = small.target
        value = small.value
        annotation = small.annotation
    else:
        raise Declined("the resource is not bound to a name (used in place)")
    if not isinstance(target_expr, cst.Name):
        raise Declined("the resource is bound to an attribute or item, so it outlives the block")
    awaited = isinstance(value, cst.Await)
    call = value.expression if isinstance(value, cst.Await) else value
    if not isinstance(call, cst.Call):
        raise Declined("the bound value is not the creating call itself")
    if not any(c is call or c is value for c in candidates):
        raise Declined("the reported call is not the value bound on that line")

    block = parents.get(stmt)
    if not isinstance(block, cst.IndentedBlock):
        raise Declined("module-level resource: no block owns it")
    function: cst.CSTNode | None = block
    while function is not None and not isinstance(function, (cst.FunctionDef, cst.Lambda)):
        if isinstance(function, cst.ClassDef):
            function = None
            break
        function = parents.get(function)
    if not isinstance(function, cst.FunctionDef):
        raise Declined("the creation is not inside a function")
    return _Site(stmt, block, function, target_expr.value, annotation, call, awaited)


def _rewrite(module: cst.Module, finding: Finding, resolve: FormResolver) -> cst.Module:
    wrapper = MetadataWrapper(module, unsafe_skip_copy=True)
    site = _locate(wrapper, finding.line, finding.col)
    name = site.name

    form = resolve(module, site.call, site.awaited)
    if isinstance(form, str):
        raise Declined(form)
    if form is not Form.SYNC and site.function.asynchronous is None:
        raise Declined("the enclosing function is not `async def`, so `async with` cannot go there")

    statements = list(site.block.body)
    index = next(i for i, s in enumerate(statements) if s is site.stmt)
    rest = statements[index + 1 :]

    # Every use of the name outside the statements that follow the creation in its block would
    # see a closed resource (or one from an earlier loop pass): refuse.
    inside_ids = {id(n) for s in [site.stmt, *rest] for n in _walk(s)}
    elsewhere = [u for u in _uses([site.function.body], name) if id(u.node) not in inside_ids]
    if elsewhere:
        raise Declined(f"`{name}` is also used outside the statements after its creation")
    for param in _walk(site.function.params):
        if isinstance(param, cst.Name) and param.value == name:
            raise Declined(f"`{name}` is also a parameter of the function")

    receiver = None
    release_methods: frozenset[str] = frozenset()
    if isinstance(site.call.func, cst.Attribute) and site.call.func.attr.value in RELEASED_BY_RECEIVER:
        receiver = _dotted(site.call.func.value)
        release_methods = RELEASED_BY_RECEIVER[site.call.func.attr.value]

    release_at = [
        i
        for i, s in enumerate(rest)
        if _release_statement(s, name, receiver, release_methods)
        or _finally_only_releases(s, name, receiver, release_methods)
    ]
    if len(release_at) > 1:
        raise Declined(f"`{name}` is released in more than one place")
    if release_at:
        cut = release_at[0]
        released = rest[cut]
        body = list(rest[:cut])
        after = list(rest[cut + 1 :])
        if isinstance(released, cst.Try):
            if released.handlers or released.orelse is not None:
                body.append(released.with_changes(finalbody=None))
            else:
                inner = list(released.body.body)
                if inner:
                    inner[0] = inner[0].with_changes(
                        leading_lines=[*released.leading_lines, *inner[0].leading_lines]
                    )
                body.extend(inner)
    else:
        body, after = list(rest), []

    if not body:
        raise Declined(f"nothing uses `{name}` before it is released; delete the creation instead")
    if _uses(after, name):
        raise Declined(f"`{name}` is used after it is released")

    for use in _uses(body, name):
        if use.nested:
            raise Declined(f"`{name}` is captured by a nested function, lambda or class")
        if use.kind == "bare":
            raise Declined(
                f"`{name}` escapes the block (returned, yielded, stored, passed on or rebound)"
            )
        if use.attr in RELEASE_METHODS or use.attr in release_methods:
            raise Declined(f"`{name}` is released inside a branch or nested statement")
        if use.attr in BORROWING_METHODS:
            raise Declined(f"`{name}.{use.attr}()` returns a result that reads from `{name}` later")
        if use.attr and use.attr.startswith("__a"):
            raise Declined(f"`{name}` is entered or exited by hand")

    if release_at and after:
        # The statements after the release keep their place; carry the release's comments over.
        released_stmt = rest[release_at[0]]
        if released_stmt.leading_lines and any(l.comment for l in released_stmt.leading_lines):
            after[0] = after[0].with_changes(
                leading_lines=[*released_stmt.leading_lines, *after[0].leading_lines]
            )

    call: cst.BaseExpression = site.call
    if form is Form.ASYNC_AWAITED:
        call = cst.Await(expression=site.call)
    with_node = cst.With(
        items=[cst.WithItem(item=call, asname=cst.AsName(name=cst.Name(name)))],
        body=cst.IndentedBlock(body=body, header=site.stmt.trailing_whitespace),
        asynchronous=None if form is Form.SYNC else cst.Asynchronous(),
        leading_lines=site.stmt.leading_lines,
    )
    replacement: list[cst.BaseStatement] = [with_node]
    if site.annotation is not None:
        # Keep the declared type: a bare annotation binds nothing and keeps type checkers informed.
        decl = cst.SimpleStatementLine(
            body=[cst.AnnAssign(target=cst.Name(name), annotation=site.annotation, value=None)],
            leading_lines=site.stmt.leading_lines,
        )
        replacement = [decl, with_node.with_changes(leading_lines=[])]
    new_statements = statements[:index] + replacement + after
    new_block = site.block.with_changes(body=new_statements)
    return module.deep_replace(site.block, new_block)


# --------------------------------------------------------------------------------------------
# Fixing a source: findings in, verified text out


def _check(source: str, path: str, config: Config | None) -> list[Finding]:
    from connguard.checkers.engine import check_source

    return check_source(source, path, config)


def _parses(source: str, path: str) -> bool:
    try:
        cst.parse_module(source)
        compile(source, path, "exec", dont_inherit=True)
    except (cst.ParserSyntaxError, SyntaxError, ValueError):
        return False
    return True


def _one_pass(
    source: str,
    path: str,
    config: Config | None,
    findings: list[Finding],
    resolve: FormResolver,
) -> FixOutcome:
    outcome = FixOutcome(source=source, original=source)
    fixable: list[Finding] = []
    seen: set[tuple[int, int]] = set()
    for finding in findings:
        if finding.code not in FIXABLE_CODES:
            continue
        if (finding.line, finding.col) in seen:
            continue
        seen.add((finding.line, finding.col))
        fixable.append(finding)
    if not fixable:
        return outcome
    try:
        module = cst.parse_module(source)
    except cst.ParserSyntaxError:
        outcome.declined = [(f, "the file does not parse") for f in fixable]
        return outcome

    current_source, current_findings = source, findings
    # Bottom-up: a rewrite only moves lines below the creation, so the positions of the findings
    # still to do (all above) stay valid.
    for finding in sorted(fixable, key=lambda f: (f.line, f.col), reverse=True):
        try:
            new_module = _rewrite(module, finding, resolve)
            new_source = new_module.code
            if new_source == current_source:
                raise Declined("the rewrite changed nothing")
            if not _parses(new_source, path):
                raise Declined("the rewritten code does not parse")
            after = _check(new_source, path, config)
            if any(f.code == "CG000" for f in after):
                raise Declined("the rewritten code does not parse")
            if any(f.line == finding.line for f in after):
                raise Declined("the checker still flags the line after the rewrite")
            if len(after) >= len(current_findings):
                raise Declined("the rewrite would introduce another finding")
        except Declined as why:
            outcome.declined.append((finding, str(why)))
            continue
        module, current_source, current_findings = new_module, new_source, after
        outcome.applied.append(finding)
    outcome.source = current_source
    outcome.applied.sort()
    outcome.declined.sort()
    return outcome


def fix_source(
    source: str,
    path: str,
    config: Config | None = None,
    *,
    resolve: FormResolver = default_form,
) -> FixOutcome:
    """Rewrite what can safely become `async with`; unverifiable -> the source comes back unchanged."""
    findings = _check(source, path, config)
    outcome = _one_pass(source, path, config, findings, resolve)
    if not outcome.applied:
        outcome.source = source
        return outcome
    # Idempotence: the fixed text must be a fixed point of the fixer, or none of it is trusted.
    again = _one_pass(outcome.source, path, config, _check(outcome.source, path, config), resolve)
    if again.applied or again.source != outcome.source:
        reason = "the fix is not stable (a second run would change the file again)"
        return FixOutcome(
            source=source,
            applied=[],
            declined=sorted([*outcome.declined, *((f, reason) for f in outcome.applied)]),
            original=source,
        )
    return outcome


def render_diff(old: str, new: str, path: str) -> str:
    """A unified diff of one file, as `--diff` prints it (empty when nothing changed)."""
    if old == new:
        return ""
    lines = difflib.unified_diff(
        old.splitlines(keepends=True),
        new.splitlines(keepends=True),
        fromfile=f"a/{path}",
        tofile=f"b/{path}",
    )
    out = []
    for line in lines:
        out.append(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    return "".join(out)


def read_source(path: str | Path) -> str:
    """The file's text exactly as stored (newlines untouched); UnicodeDecodeError/OSError propagate."""
    with open(path, encoding="utf-8", newline="") as fh:
        return fh.read()


def write_atomic(path: str | Path, text: str) -> None:
    """Replace `path` with `text` in one rename, keeping its permission bits."""
    target = Path(path)
    mode = stat.S_IMODE(target.stat().st_mode)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def fix_file(path: str | Path, config: Config | None = None, *, write: bool) -> FixOutcome:
    """Fix one file; with write=True the new text replaces it atomically (only when it changed)."""
    source = read_source(path)
    outcome = fix_source(source, str(path), config)
    if write and outcome.changed:
        write_atomic(path, outcome.source)
    return outcome
