"""The `async with` autofix: a flagged creation becomes a context manager, verified or untouched."""

from __future__ import annotations

import difflib
import os
import stat
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import libcst as cst
from libcst.metadata import MetadataWrapper, ParentNodeProvider, PositionProvider

from connguard.checkers.findings import Finding
from connguard.checkers.imports import source_encoding

if TYPE_CHECKING:
    from connguard.checkers.config import Config

# The codes whose finding means "this creation is never (safely) released": exactly the ones an
# `async with` around the rest of the block cures.
FIXABLE_CODES = frozenset({"CG101", "CG102", "CG103", "CG104", "CG105"})

# Methods whose call ends the resource's life; after the rewrite the context manager does this.
# The resource table adds each kind's own (release_async / release_sync).
RELEASE_METHODS = frozenset({"close", "aclose", "dispose", "terminate"})
# Releases that throw the connection away instead of closing it or handing it back as it is.
_DISCARDING = frozenset({"invalidate", "terminate", "detach"})
# A pooled connection handed back to the pool it came from: `await pool.release(conn)`.
DEFAULT_ON_RECEIVER = frozenset({"release"})

# Methods whose result keeps reading through the resource after the call returns (a cursor or a
# streaming result): it must be consumed inside the block, because the block now closes the
# resource. Per resource (the table's spec name); anything else: the DEFAULT set.
BORROWING_METHODS = frozenset({"stream", "stream_scalars", "cursor"})
BORROWING_BY_RESOURCE: dict[str, frozenset[str]] = {
    # AsyncSession/AsyncConnection.execute() buffer their rows; only streams stay open.
    "AsyncSession": frozenset({"stream", "stream_scalars", "connection"}),
    "AsyncConnection": frozenset({"stream", "stream_scalars", "get_raw_connection"}),
    # Sync results are cursor-backed until fetched.
    "Session": frozenset({"execute", "scalars", "stream", "stream_scalars"}),
    "Connection": frozenset({"execute", "scalars", "exec_driver_sql", "stream", "stream_scalars"}),
    # asyncpg's fetch*/execute return plain values; cursors need the connection.
    "asyncpg connection": frozenset({"cursor", "prepare"}),
    "asyncpg pooled connection": frozenset({"cursor", "prepare"}),
    # DB-API style drivers: execute() hands back a cursor of the connection.
    "psycopg AsyncConnection": frozenset({"execute", "cursor"}),
    "psycopg Connection": frozenset({"execute", "cursor"}),
    "aiosqlite connection": frozenset({"execute", "executemany", "cursor"}),
}
# Calls that read a result to the end: after one of these nothing refers to the cursor.
CONSUMING_METHODS = frozenset(
    {
        "all",
        "fetchall",
        "fetchone",
        "fetchmany",
        "first",
        "one",
        "one_or_none",
        "scalar",
        "scalar_one",
        "scalar_one_or_none",
        "fetch",
        "fetchrow",
        "fetchval",
        "rowcount",
        "lastrowid",
    }
)


class Form(Enum):
    """How the creating call becomes a context manager."""

    ASYNC_CALL = "async with CALL as name"  # the call's result is an async CM (await dropped)
    ASYNC_AWAITED = "async with await CALL as name"  # the awaited result is an async CM
    SYNC = "with CALL as name"


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


# --------------------------------------------------------------------------------------------
# What the creating call is, and which context-manager form it has. The answers come from the
# resource table (resources.py: async_cm / sync_cm / awaited / cm_methods per spec), resolved
# the way the analysis resolves names: imports, module-level makers and factories
# (analysis.module_factories), project modules (the engine's import resolver), annotations.


@dataclass
class _Context:
    module: cst.Module
    source: str
    table: Any
    resolver: Any
    module_name: str | None
    _imports: dict[str, str] | None = None
    _factories: dict[str, Any] | None = None
    current: cst.Module | None = None  # the module as rewritten so far (node identities)

    @property
    def imports(self) -> dict[str, str]:
        if self._imports is None:
            self._imports = _import_map(self.module)
        return self._imports

    @property
    def factories(self) -> dict[str, Any]:
        if self._factories is None:
            try:
                from connguard.checkers import analysis

                self._factories = dict(
                    analysis.module_factories(
                        self.source,
                        table=self.table,
                        imports=self.resolver,
                        module_name=self.module_name,
                    )
                )
            except Exception:
                # Only the analysis knows this module's makers; without it we decline below.
                self._factories = {}
        return self._factories


def _dotted(expr: cst.BaseExpression) -> str | None:
    if isinstance(expr, cst.Name):
        return expr.value
    if isinstance(expr, cst.Attribute):
        base = _dotted(expr.value)
        return None if base is None else f"{base}.{expr.attr.value}"
    return None


def _import_map(module: cst.Module) -> dict[str, str]:
    """Local name -> qualified name for every absolute import in the module (any depth)."""
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


def _product(spec: Any, call: cst.Call | None, ctx: _Context) -> Any:
    """What calling something described by `spec` yields (a maker yields its session)."""
    if spec is None:
        return None
    if getattr(spec, "managed", True):
        return spec
    product = getattr(spec, "call", None)
    kwarg = getattr(spec, "class_kwarg", "")
    if product is not None and kwarg and call is not None:
        # sessionmaker(class_=AsyncSession) yields what the class_ argument names.
        for arg in call.args:
            if arg.keyword is not None and arg.keyword.value == kwarg:
                swapped = ctx.table.lookup(_qualified(arg.value, ctx.imports) or "")
                return swapped if swapped is not None else None
    return product


def _form_of(product: Any, awaited: bool) -> Form | str:
    """The context-manager form of a resource created by a call, from the table's data."""
    name = getattr(product, "name", "this resource")
    if getattr(product, "scoped", False):
        return f"{name} from a scoped registry is released by the registry's remove()"
    if awaited:
        if not getattr(product, "async_cm", False):
            return f"{name} is not an async context manager; release it in `finally`"
        if "async with await" in str(getattr(product, "safe_form", "")):
            return Form.ASYNC_AWAITED
        return Form.ASYNC_CALL
    if getattr(product, "async_cm", False):
        return Form.ASYNC_CALL
    if getattr(product, "sync_cm", False):
        return Form.SYNC
    return f"{name} is not a context manager; release it in `finally`"


def _method_form(source: Any, method: str, awaited: bool) -> Form | str | None:
    """`source.method()` (engine.connect(), pool.acquire()): a form only if the table lists the
    method among the source's context-manager methods."""
    product = source.product(method) if hasattr(source, "product") else None
    if product is None:
        return None
    if method not in getattr(source, "cm_methods", ()):
        return (
            f"`{method}()` of {getattr(source, 'name', 'this source')} has no context-manager form"
        )
    if awaited or getattr(product, "async_cm", False):
        return (
            Form.ASYNC_CALL
            if getattr(product, "async_cm", False)
            else (f"{getattr(product, 'name', 'it')} is not an async context manager")
        )
    return Form.SYNC if getattr(product, "sync_cm", False) else None


def _all_specs(table: Any) -> list[Any]:
    seen: dict[int, Any] = {}
    stack = [*getattr(table, "factories", {}).values(), *getattr(table, "types", {}).values()]
    while stack:
        spec = stack.pop()
        if spec is None or id(spec) in seen:
            continue
        seen[id(spec)] = spec
        stack.append(getattr(spec, "call", None))
        stack.extend(p for _, p in getattr(spec, "methods", ()))
    return list(seen.values())


def _receiver_spec(receiver: cst.BaseExpression, function: cst.FunctionDef, ctx: _Context) -> Any:
    """The source object a method is called on, when its binding says: an annotated parameter,
    or `name = [await] factory(...)` in the function or at module level."""
    if not isinstance(receiver, cst.Name):
        return None
    name = receiver.value
    for param in _walk(function.params):
        if isinstance(param, cst.Param) and param.name.value == name:
            if param.annotation is None:
                return None
            qualified = _qualified(param.annotation.annotation, ctx.imports)
            return ctx.table.lookup_type(qualified) if qualified else None
    for scope in (function.body, ctx.module):
        for node in _walk(scope):
            if isinstance(node, cst.Assign) and len(node.targets) == 1:
                target = node.targets[0].target
                if isinstance(target, cst.Name) and target.value == name:
                    value = (
                        node.value.expression if isinstance(node.value, cst.Await) else node.value
                    )
                    if isinstance(value, cst.Call):
                        qualified = _qualified(value.func, ctx.imports)
                        spec = ctx.table.lookup(qualified) if qualified else None
                        if spec is not None:
                            return spec
    return None


def resolve_form(
    ctx: _Context, call: cst.Call, awaited: bool, function: cst.FunctionDef
) -> tuple[Form | str, Any]:
    """Which context-manager form the creating `call` has (a reason string when it has none),
    and the spec of the resource it creates when known."""
    form, product = _resolve(ctx, call, awaited, function)
    return form, product


def _def_is_async(module: cst.Module | None, name: str) -> bool | None:
    """Is `name` a top-level `async def` of the module? None: not a function we can see."""
    if module is None:
        return None
    for stmt in module.body:
        if isinstance(stmt, cst.FunctionDef) and stmt.name.value == name:
            return stmt.asynchronous is not None
    return None


def _module_of_file(ctx: _Context, module: str) -> cst.Module | None:
    found = ctx.resolver.find(module) if hasattr(ctx.resolver, "find") else None
    if not found:
        return None
    try:
        with open(found[0], encoding="utf-8") as fh:
            return cst.parse_module(fh.read())
    except (OSError, UnicodeDecodeError, cst.ParserSyntaxError):
        return None


def _library_spec(table: Any, product: Any) -> Any:
    """The table's own spec of what a user factory hands back (how the library makes it)."""
    for spec in _all_specs(table):
        if getattr(spec, "managed", False) and spec.name == product.name:
            if spec.kind == getattr(product, "kind", spec.kind):
                return spec
    return product


def _user_callable_form(
    ctx: _Context, spec: Any, awaited: bool, is_async_def: bool | None, name: str
) -> tuple[Form | str, Any] | None:
    """A project's own maker or factory function. What `async with` needs depends on how the
    function hands the resource over: `async def f(): return AsyncSession()` must become
    `async with await f()`, while `def f(): return engine.connect()` (awaited by the caller)
    becomes `async with f()`, and an async factory that already awaited `engine.connect()`
    returns a started connection that cannot be entered again."""
    product = _product(spec, None, ctx)
    if product is None:
        return None
    if getattr(spec, "kind", "") != "factory":  # a maker: calling it makes the resource
        if awaited:
            return f"`{name}()` is awaited, so it is not a plain session maker", product
        return _form_of(product, False), product
    library = _library_spec(ctx.table, product)
    if not awaited:
        if is_async_def:
            return f"`{name}` is an `async def` called without await", product
        return _form_of(library, False), product
    if is_async_def is None:
        return f"cannot see whether the factory `{name}` is an `async def`", product
    if not is_async_def:
        return _form_of(library, True), product
    enter_after_await = "async with await" in str(getattr(library, "safe_form", "")) or (
        getattr(library, "async_cm", False) and not getattr(library, "awaited", False)
    )
    if enter_after_await:
        return Form.ASYNC_AWAITED, product
    return (
        f"`{name}()` returns an already started {library.name}, which cannot be entered "
        "again; close it in `finally`",
        product,
    )


def _self_attribute(
    expr: cst.BaseExpression, function: cst.FunctionDef, ctx: _Context
) -> tuple[Any, cst.Call] | None:
    """`self.X` in a method: the spec of what every `self.X = factory(...)` in the class binds
    (and that call), when all those assignments agree; None when any is unknown."""
    params = function.params.params
    if not (
        isinstance(expr, cst.Attribute)
        and isinstance(expr.value, cst.Name)
        and params
        and expr.value.value == params[0].name.value
    ):
        return None
    owner = _class_of(ctx.current or ctx.module, function)
    if owner is None:
        return None
    found: list[tuple[Any, cst.Call]] = []
    for node in _walk(owner.body):
        if isinstance(node, (cst.Assign, cst.AnnAssign, cst.AugAssign)):
            targets = (
                [t.target for t in node.targets] if isinstance(node, cst.Assign) else [node.target]
            )
            for target in targets:
                if (
                    isinstance(target, cst.Attribute)
                    and isinstance(target.value, cst.Name)
                    and target.attr.value == expr.attr.value
                ):
                    value = getattr(node, "value", None)
                    if isinstance(value, cst.Await):
                        value = value.expression
                    qualified = (
                        _qualified(value.func, ctx.imports) if isinstance(value, cst.Call) else None
                    )
                    spec = ctx.table.lookup(qualified) if qualified else None
                    if spec is None or isinstance(node, cst.AugAssign):
                        return None
                    found.append((spec, value))
    if not found or any(spec is not found[0][0] for spec, _ in found):
        return None
    return found[0]


def _class_of(module: cst.Module, function: cst.FunctionDef) -> cst.ClassDef | None:
    for node in _walk(module):
        if isinstance(node, cst.ClassDef) and any(stmt is function for stmt in node.body.body):
            return node
    return None


def _resolve(
    ctx: _Context, call: cst.Call, awaited: bool, function: cst.FunctionDef
) -> tuple[Form | str, Any]:
    func = call.func
    qualified = _qualified(func, ctx.imports)
    if qualified is not None:
        spec = ctx.table.lookup(qualified)
        if spec is not None:
            product = _product(spec, call, ctx)
            if product is None:
                return f"`{qualified}(...)` does not itself create a resource", None
            return _form_of(product, awaited), product
        # `from app.db import SessionLocal`: a maker or factory of another project module.
        module, _, name = qualified.rpartition(".")
        spec = ctx.resolver.resolve(module, name) if ctx.resolver is not None and module else None
        if spec is not None:
            is_async = _def_is_async(_module_of_file(ctx, module), name)
            verdict = _user_callable_form(ctx, spec, awaited, is_async, name)
            if verdict is not None:
                return verdict
    if isinstance(func, cst.Name):
        spec = ctx.factories.get(func.value)
        if spec is not None:
            is_async = _def_is_async(ctx.module, func.value)
            verdict = _user_callable_form(ctx, spec, awaited, is_async, func.value)
            if verdict is not None:
                return verdict
    if isinstance(func, cst.Attribute):
        # `self._maker()`: an attribute the class sets to a session maker.
        bound = _self_attribute(func, function, ctx)
        if bound is not None and not getattr(bound[0], "managed", True):
            product = _product(bound[0], bound[1], ctx)
            if product is not None:
                return _form_of(product, awaited), product
        method = func.attr.value
        source = _receiver_spec(func.value, function, ctx)
        if source is None:
            self_bound = _self_attribute(func.value, function, ctx)
            source = self_bound[0] if self_bound is not None else None
        if source is not None:
            form = _method_form(source, method, awaited)
            if form is not None:
                return form, source.product(method)
        # An object the analysis knows as a source but we cannot see bound (self.engine, an
        # imported pool): decide by the method, when every source in the table agrees.
        verdicts = {
            _method_form(spec, method, awaited)
            for spec in _all_specs(ctx.table)
            if hasattr(spec, "product")
            and spec.product(method) is not None
            and (spec.is_async or not awaited)
        }
        verdicts.discard(None)
        if len(verdicts) == 1:
            return verdicts.pop(), None
    shown = cst.Module([]).code_for_node(func)
    return f"cannot tell whether `{shown}(...)` gives a context manager", None


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

    # A generator expression runs when it is iterated, which may be after the block.
    def visit_GeneratorExp(self, node: cst.GeneratorExp) -> None:
        self.depth += 1

    def leave_GeneratorExp(self, original_node: cst.GeneratorExp) -> None:
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


@dataclass(frozen=True)
class _Release:
    """How this resource is released: `name.m()` for m in `own`, or `receiver.m(name)`."""

    name: str
    own: frozenset[str]
    receiver: str | None = None
    on_receiver: frozenset[str] = frozenset()

    def is_call(self, expr: cst.BaseExpression) -> bool:
        if isinstance(expr, cst.Await):
            expr = expr.expression
        if not isinstance(expr, cst.Call) or not isinstance(expr.func, cst.Attribute):
            return False
        func = expr.func
        if isinstance(func.value, cst.Name) and func.value.value == self.name:
            return func.attr.value in self.own and not expr.args
        if self.receiver is None or func.attr.value not in self.on_receiver or len(expr.args) != 1:
            return False
        arg = expr.args[0]
        return (
            arg.keyword is None
            and arg.star == ""
            and isinstance(arg.value, cst.Name)
            and arg.value.value == self.name
            and _dotted(func.value) == self.receiver
        )

    def is_statement(self, stmt: cst.CSTNode) -> bool:
        call = _sole_call(stmt)
        return call is not None and self.is_call(call)

    def is_forget(self, stmt: cst.CSTNode) -> bool:
        """`name = None` or `del name`: the handle dropped without closing the resource."""
        if not isinstance(stmt, cst.SimpleStatementLine) or len(stmt.body) != 1:
            return False
        small = stmt.body[0]
        if isinstance(small, cst.Del):
            return isinstance(small.target, cst.Name) and small.target.value == self.name
        return (
            isinstance(small, cst.Assign)
            and len(small.targets) == 1
            and isinstance(small.targets[0].target, cst.Name)
            and small.targets[0].target.value == self.name
            and isinstance(small.value, cst.Name)
            and small.value.value == "None"
        )

    def is_finally_only(self, stmt: cst.CSTNode) -> bool:
        """A `try` whose `finally` does nothing but release the resource."""
        if not isinstance(stmt, cst.Try) or stmt.finalbody is None:
            return False
        body = stmt.finalbody.body.body
        return len(body) == 1 and self.is_statement(body[0])


def _sole_call(stmt: cst.CSTNode) -> cst.Call | None:
    """The call a statement is made of, awaited or not (`await x.close()`), if nothing else."""
    if not isinstance(stmt, cst.SimpleStatementLine) or len(stmt.body) != 1:
        return None
    small = stmt.body[0]
    expr = small.value if isinstance(small, cst.Expr) else None
    if isinstance(expr, cst.Await):
        expr = expr.expression
    return expr if isinstance(expr, cst.Call) else None


def _discarded_by(release: cst.CSTNode) -> str | None:
    """The method of a release statement that is not what the end of an `async with` does:
    `invalidate()`/`terminate()` throw the connection away, where the block would close it or
    give it back to its pool as it is."""
    call = _sole_call(release)
    if call is not None and isinstance(call.func, cst.Attribute):
        if call.func.attr.value in _DISCARDING:
            return call.func.attr.value
    return None


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
    in_loop: bool  # a loop inside the function encloses the creation
    line_of: Any  # node -> its source position
    parent_of: Any  # node -> its parent


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
        raise _PlainWith(stmt, _enclosing_function(stmt, parents))
    if not isinstance(stmt, cst.SimpleStatementLine):
        raise Declined("the creation is not a simple assignment statement")
    if len(stmt.body) != 1:
        raise Declined("the creation shares its line with other statements")
    for node in exact:
        receiver_of = parents.get(node)
        if (
            isinstance(node, cst.Call)
            and isinstance(receiver_of, cst.Attribute)
            and receiver_of.value is node
            and isinstance(parents.get(receiver_of), cst.Call)
        ):
            # `await AsyncSessionLocal().execute(q)`: used in place by one method call.
            block = parents.get(stmt)
            raise _InPlace(
                stmt,
                node,
                receiver_of.attr.value,
                block,
                _enclosing_function(stmt, parents),
                parents,
            )
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
        if any(isinstance(parents.get(n), cst.Arg) for n in exact):
            raise Declined(
                "the resource is passed straight into another call; "
                "bind it with `async with` around that call by hand"
            )
        raise Declined("the resource is not bound to a name")
    if not isinstance(target_expr, cst.Name):
        raise Declined("the resource is bound to an attribute or item, so it outlives the block")
    awaited = isinstance(value, cst.Await)
    call = value.expression if isinstance(value, cst.Await) else value
    if not isinstance(call, cst.Call):
        raise Declined("the bound value is not the creating call itself")
    if not any(c is call or c is value for c in candidates):
        raise Declined("the creating call is nested inside the bound expression")

    block = parents.get(stmt)
    if not isinstance(block, cst.IndentedBlock):
        raise Declined("module-level resource: no block owns it")
    function: cst.CSTNode | None = block
    in_loop = False
    while function is not None and not isinstance(function, (cst.FunctionDef, cst.Lambda)):
        if isinstance(function, cst.ClassDef):
            function = None
            break
        in_loop = in_loop or isinstance(function, (cst.For, cst.While))
        function = parents.get(function)
    if not isinstance(function, cst.FunctionDef):
        raise Declined("the creation is not inside a function")
    return _Site(
        stmt,
        block,
        function,
        target_expr.value,
        annotation,
        call,
        awaited,
        in_loop,
        positions,
        parents,
    )


class _InPlace(Exception):
    """The fresh resource is the receiver of one method call inside a statement."""

    def __init__(
        self,
        stmt: cst.SimpleStatementLine,
        call: cst.Call,
        method: str,
        block: cst.CSTNode | None,
        function: cst.FunctionDef | None,
        parent_of: Any,
    ) -> None:
        super().__init__("in place")
        self.stmt, self.call, self.method = stmt, call, method
        self.block, self.function, self.parent_of = block, function, parent_of


def _bind_in_place(module: cst.Module, site: _InPlace, ctx: _Context) -> cst.Module:
    """`return (await F().execute(q)).all()` -> `async with F() as session:` + that statement
    using `session`: the resource lives exactly as long as the statement that used it."""
    if not isinstance(site.block, cst.IndentedBlock) or site.function is None:
        raise Declined("the resource is used in place outside a function block")
    form, product = resolve_form(ctx, site.call, False, site.function)
    if isinstance(form, str):
        raise Declined(form)
    borrowing = BORROWING_BY_RESOURCE.get(getattr(product, "name", ""), BORROWING_METHODS)
    if site.method in borrowing:
        statements = list(site.block.body)
        after = statements[statements.index(site.stmt) + 1 :]
        escape = _borrowed_result_escapes(site.call, [site.stmt], after, site.parent_of)
        if escape:
            raise Declined(
                f"`{site.method}()` gives a result that reads through the resource, and it "
                f"{escape}; the block would close the resource first"
            )
    if _commits_on_exit(product) and not _commits_anyway(site.call, [], ""):
        raise Declined(_COMMIT_ON_EXIT)
    node: cst.CSTNode | None = site.call
    while node is not None and node is not site.stmt:
        if isinstance(node, _PER_ITEM):
            # One block around the statement would share one resource across the items (or
            # close it before a generator or lambda runs), where each made its own.
            raise Declined("the resource is made per item of a comprehension, generator or lambda")
        node = site.parent_of.get(node)
    if form is not Form.SYNC and site.function.asynchronous is None:
        raise Declined("the enclosing function is not `async def`, so `async with` cannot go there")
    taken = {n.value for n in _walk(site.function) if isinstance(n, cst.Name)}
    base = str(getattr(product, "var", "") or "resource")
    name = base
    for suffix in range(2, 100):
        if name not in taken:
            break
        name = f"{base}{suffix}"
    else:
        raise Declined("no free name to bind the resource to")
    inner = site.stmt.deep_replace(site.call, cst.Name(name))
    assert isinstance(inner, cst.SimpleStatementLine)
    with_node = cst.With(
        items=[cst.WithItem(item=site.call, asname=cst.AsName(name=cst.Name(name)))],
        body=cst.IndentedBlock(
            body=[inner.with_changes(leading_lines=[])], indent=site.block.indent
        ),
        asynchronous=None if form is Form.SYNC else cst.Asynchronous(),
        leading_lines=site.stmt.leading_lines,
    )
    return module.deep_replace(site.stmt, with_node)


class _PlainWith(Exception):
    """The creation is an item of a plain `with`: the fix is to make it `async with`."""

    def __init__(self, stmt: cst.With, function: cst.FunctionDef | None) -> None:
        super().__init__("plain with")
        self.stmt = stmt
        self.function = function


def _enclosing_function(node: cst.CSTNode, parents: Any) -> cst.FunctionDef | None:
    current = parents.get(node)
    while current is not None and not isinstance(current, (cst.FunctionDef, cst.Lambda)):
        current = parents.get(current)
    return current if isinstance(current, cst.FunctionDef) else None


def _make_async_with(module: cst.Module, plain: _PlainWith, ctx: _Context) -> cst.Module:
    """`with AsyncSessionLocal() as s:` -> `async with ...`, when every item is an async CM."""
    if plain.function is None or plain.function.asynchronous is None:
        raise Declined("the `with` is not inside an `async def`")
    for item in plain.stmt.items:
        value = item.item
        if not isinstance(value, cst.Call):
            raise Declined("an item of this `with` is not a call we can judge")
        form, _ = resolve_form(ctx, value, False, plain.function)
        if form is not Form.ASYNC_CALL:
            reason = form if isinstance(form, str) else "another item is a sync context manager"
            raise Declined(f"cannot make the whole `with` async: {reason}")
    return module.deep_replace(plain.stmt, plain.stmt.with_changes(asynchronous=cst.Asynchronous()))


# Where a value is kept rather than used: in a container, or under another name or attribute.
_HOLDERS = (cst.Element, cst.DictElement, cst.StarredElement)
_STORES = (cst.Assign, cst.AnnAssign, cst.AugAssign, cst.NamedExpr)


# Expressions whose parts run once per item, or later: a resource made inside is not one.
_PER_ITEM = (cst.ListComp, cst.SetComp, cst.DictComp, cst.GeneratorExp, cst.Lambda)


def _comments_of(stmt: cst.CSTNode) -> list[cst.EmptyLine]:
    """The comment lines above a statement and the comment on its own line, as lines; empty
    when it has none (blank lines alone are not kept)."""
    lines = list(getattr(stmt, "leading_lines", ()))
    trailing = getattr(stmt, "trailing_whitespace", None)
    if trailing is not None and trailing.comment is not None:
        lines.append(cst.EmptyLine(comment=trailing.comment))
    return lines if any(line.comment for line in lines) else []


def _where_kept(parent: cst.CSTNode | None) -> str | None:
    """How a value outlives its statement when `parent` holds it."""
    if isinstance(parent, cst.Return):
        return "is returned"
    if isinstance(parent, (cst.Yield, cst.From)):
        return "is yielded"
    if isinstance(parent, _HOLDERS):
        return "is put in a container"
    return None


def _call_chain(node: cst.CSTNode, parent_of: Any) -> Iterator[cst.CSTNode]:
    """The expressions built on `node` by attribute access, call and await, innermost first:
    for `name` in `(await name.execute(q)).fetchall()`, the attribute, the call, the await..."""
    while True:
        parent = parent_of.get(node)
        if not (
            (isinstance(parent, cst.Attribute) and parent.value is node)
            or (isinstance(parent, cst.Call) and parent.func is node)
            or isinstance(parent, cst.Await)
        ):
            return
        yield parent
        node = parent


_COMMIT_ON_EXIT = (
    "psycopg's `with` commits when the block ends cleanly, and `close()` does not: the "
    "rewrite would commit what this code leaves uncommitted (connect with autocommit=True, "
    "or end with `commit()`)"
)


def _commits_on_exit(product: Any) -> bool:
    """psycopg's connections (and psycopg_pool's `connection()`) commit at a clean exit."""
    return str(getattr(product, "name", "")).startswith("psycopg")


def _commits_anyway(call: cst.Call, body: Sequence[cst.CSTNode], name: str) -> bool:
    """Whether committing at the block's end changes nothing: the connection is in autocommit,
    or the block already ends with `name.commit()`."""
    for arg in call.args:
        if (
            arg.keyword is not None
            and arg.keyword.value == "autocommit"
            and isinstance(arg.value, cst.Name)
            and arg.value.value == "True"
        ):
            return True
    last = _sole_call(body[-1]) if body else None
    return (
        last is not None
        and isinstance(last.func, cst.Attribute)
        and last.func.attr.value == "commit"
        and isinstance(last.func.value, cst.Name)
        and last.func.value.value == name
    )


def _unawaited_escape(name: cst.CSTNode, parent_of: Any) -> str | None:
    """Where `name.method(...)` (or the bound method `name.method`) goes when it is not awaited
    where it stands: a coroutine or task made from it runs later, after the block."""
    node: cst.CSTNode = name
    for node in _call_chain(name, parent_of):
        if isinstance(node, cst.Await):
            return None
    parent = parent_of.get(node)
    if isinstance(parent, cst.Arg):
        return "is passed on (to a task, say)"
    if isinstance(parent, _STORES):
        return "is stored"
    return _where_kept(parent)


def _borrowed_result_escapes(
    receiver: cst.CSTNode,
    body: Sequence[cst.CSTNode],
    after: Sequence[cst.CSTNode],
    parent_of: Any,
) -> str | None:
    """Where a cursor-like result of `receiver.method(...)` goes, if it outlives the block."""
    node: cst.CSTNode = receiver
    # `(await db.execute(q)).fetchall()` ends in a consuming call.
    for node in _call_chain(receiver, parent_of):
        if isinstance(node, cst.Attribute) and node.attr.value in CONSUMING_METHODS:
            return None
    parent = parent_of.get(node)
    kept = _where_kept(parent)
    if kept:
        return kept
    if isinstance(parent, cst.Assign) and all(
        isinstance(t.target, cst.Name) for t in parent.targets
    ):
        for target in parent.targets:
            bound = target.target.value
            if _uses(after, bound):
                return f"is used after the block as `{bound}`"
            for use in _uses(body, bound):
                holder = parent_of.get(use.node)
                if use.kind == "bare" and isinstance(holder, (cst.Return, cst.Yield)):
                    return f"is returned as `{bound}`"
                if use.nested:
                    return f"is captured as `{bound}`"
                if use.kind == "bare" and isinstance(holder, (*_HOLDERS, *_STORES)):
                    return f"is stored or put in a container as `{bound}`"
        return None
    if isinstance(parent, (cst.Assign, cst.AnnAssign, cst.AugAssign)):
        return "is stored"
    return None


def _escape_reason(name: str, parent: cst.CSTNode | None) -> str:
    """Why a plain use of the resource's name rules the rewrite out, in the user's terms."""
    if isinstance(parent, cst.Return):
        how = "is returned"
    elif isinstance(parent, cst.Yield):
        how = "is yielded"
    elif isinstance(parent, (cst.Arg, cst.Await)):
        how = "is passed on to other code"
    elif isinstance(parent, (cst.AssignTarget, cst.AsName, cst.For, cst.AugAssign, cst.NameItem)):
        return f"`{name}` is rebound after its creation; the first one would be left open"
    elif isinstance(parent, (cst.Element, cst.DictElement, cst.StarredElement)):
        how = "is stored in a container"
    elif isinstance(parent, (cst.Assign, cst.AnnAssign, cst.NamedExpr)):
        how = "is stored under another name"
    elif isinstance(parent, cst.Del):
        return f"`{name}` is deleted by hand"
    else:
        how = "is used as a value"
    return f"`{name}` {how}, so it escapes the block (ownership moves elsewhere)"


def _rewrite(module: cst.Module, finding: Finding, ctx: _Context) -> cst.Module:
    ctx.current = module
    wrapper = MetadataWrapper(module, unsafe_skip_copy=True)
    try:
        site = _locate(wrapper, finding.line, finding.col)
    except _PlainWith as plain:
        return _make_async_with(module, plain, ctx)
    except _InPlace as in_place:
        return _bind_in_place(module, in_place, ctx)
    name = site.name

    form, product = resolve_form(ctx, site.call, site.awaited, site.function)
    if isinstance(form, str):
        raise Declined(form)
    if form is not Form.SYNC and site.function.asynchronous is None:
        raise Declined("the enclosing function is not `async def`, so `async with` cannot go there")

    statements = list(site.block.body)
    index = next(i for i, s in enumerate(statements) if s is site.stmt)
    rest = statements[index + 1 :]

    # Every use of the name outside the statements that follow the creation in its block would
    # see a closed resource: refuse. Uses before the creation see an earlier binding, which is
    # harmless unless a loop brings the creation round again before them.
    inside_ids = {id(n) for s in [site.stmt, *rest] for n in _walk(s)}
    creation_line = site.line_of[site.stmt].start.line
    for use in _uses([site.function.body], name):
        if use.nested:
            # A function or generator that reads the name may run after the block, wherever
            # it is defined (before the creation too, and be called after the block).
            raise Declined(
                f"`{name}` is captured by a nested function, lambda, class or generator expression"
            )
        if id(use.node) in inside_ids:
            continue
        if site.in_loop or site.line_of[use.node].start.line >= creation_line:
            raise Declined(f"`{name}` is also used outside the statements after its creation")
    for param in _walk(site.function.params):
        if isinstance(param, cst.Name) and param.value == name:
            raise Declined(f"`{name}` is also a parameter of the function")

    own = RELEASE_METHODS | frozenset(getattr(product, "release_methods", ()))
    on_receiver = frozenset(getattr(product, "release_on_source", ())) or DEFAULT_ON_RECEIVER
    receiver = _dotted(site.call.func.value) if isinstance(site.call.func, cst.Attribute) else None
    release = _Release(name, own, receiver, on_receiver)

    release_at = [
        i for i, s in enumerate(rest) if release.is_statement(s) or release.is_finally_only(s)
    ]
    forget_at = [i for i, s in enumerate(rest) if release.is_forget(s)]
    if len(release_at) > 1:
        raise Declined(f"`{name}` is released in more than one place")
    # The release statement itself: for a `try` whose `finally` only releases, that statement.
    releasing: cst.CSTNode | None = None
    if release_at:
        releasing = rest[release_at[0]]
        if isinstance(releasing, cst.Try) and releasing.finalbody is not None:
            releasing = releasing.finalbody.body.body[0]
        discarded = _discarded_by(releasing)
        if discarded:
            raise Declined(
                f"`{name}.{discarded}()` throws the connection away; the end of `async with` "
                f"would close it or return it to its pool as it is"
            )
    kept_forget = 0
    if not release_at and len(forget_at) == 1:
        # `session = None` / `del session` where a close belongs: the block ends there, and the
        # statement stays after it so the name is bound (or unbound) afterwards exactly as before.
        cut = forget_at[0]
        body, after, kept_forget = list(rest[:cut]), list(rest[cut:]), 1
    elif release_at:
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
    if _uses(after[kept_forget:], name):
        raise Declined(f"`{name}` is used after it is released")

    borrowing = BORROWING_BY_RESOURCE.get(getattr(product, "name", ""), BORROWING_METHODS)
    for node in (n for stmt in body for n in _walk(stmt)):
        if (
            isinstance(node, cst.Call)
            and isinstance(node.func, cst.Name)
            and node.func.value in ("locals", "vars", "eval", "exec")
        ):
            raise Declined(f"`{node.func.value}()` may hand `{name}` out of the block")
    for use in _uses(body, name):  # (one in a nested scope was declined above)
        if use.kind == "bare":
            raise Declined(_escape_reason(name, site.parent_of.get(use.node)))
        if use.attr in own:
            raise Declined(f"`{name}` is released inside a branch or nested statement")
        if use.attr in borrowing:
            escape = _borrowed_result_escapes(use.node, body, after, site.parent_of)
            if escape:
                raise Declined(
                    f"`{name}.{use.attr}()` gives a result that reads through `{name}`, and it "
                    f"{escape}; the block would close `{name}` first"
                )
        if use.attr and use.attr.startswith("__a"):
            raise Declined(f"`{name}` is entered or exited by hand")
        if use.attr and form is not Form.SYNC:
            escape = _unawaited_escape(use.node, site.parent_of)
            if escape:
                raise Declined(
                    f"`{name}.{use.attr}` {escape} without being awaited, so it would run after "
                    f"the block closes `{name}`"
                )

    if _commits_on_exit(product) and not _commits_anyway(site.call, body, name):
        raise Declined(_COMMIT_ON_EXIT)

    if form is Form.SYNC and getattr(product, "kind", "") == "session":
        commits = any(u.attr == "commit" for u in _uses(body, name))
        returns = any(
            isinstance(n, cst.Return) and n.value is not None for s in body for n in _walk(s)
        )
        if commits and returns:
            # A sync Session expires what it loaded on commit and reloads it on access; once
            # the block closes it, returned objects are detached and those reloads fail.
            raise Declined(
                "objects returned after `commit()` would be detached by the closed session"
            )

    # A blank line right under the new `async with` header reads as a mistake; comments stay.
    leading = list(body[0].leading_lines)
    while leading and leading[0].comment is None:
        leading.pop(0)
    body[0] = body[0].with_changes(leading_lines=leading)

    footer: list[cst.EmptyLine] = []
    if release_at and not kept_forget:
        # The release goes, its comments stay: above what follows it, or at the end of the
        # new block when nothing does (a comment on the release's own line included).
        comments = _comments_of(releasing)
        if comments and after:
            after[0] = after[0].with_changes(leading_lines=[*comments, *after[0].leading_lines])
        elif comments:
            footer = [line.with_changes(indent=True) for line in comments if line.comment]

    call: cst.BaseExpression = site.call
    if form is Form.ASYNC_AWAITED:
        call = cst.Await(expression=site.call)
    with_node = cst.With(
        items=[cst.WithItem(item=call, asname=cst.AsName(name=cst.Name(name)))],
        body=cst.IndentedBlock(
            body=body,
            header=site.stmt.trailing_whitespace,
            indent=site.block.indent,
            footer=footer,
        ),
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


def _context(module: cst.Module, source: str, path: str, config: Config) -> _Context:
    from connguard.checkers import engine

    resolver = engine.resolver_for(config)
    try:
        module_name = engine._module_of(path, resolver)[0]
    except Exception:  # a path we cannot place in a package: no project-relative imports
        module_name = None
    return _Context(module, source, config.table, resolver, module_name)


def _not_fixable_reason(code: str) -> str:
    """Why a finding of a rule the fixer does not rewrite stays: the rule's own "Fix safety"."""
    if code == "CG000":
        return "the file does not parse"
    try:
        from connguard.checkers.rules import RULES

        doc = RULES[code].__doc__ or ""
    except (ImportError, KeyError):
        return "no automatic fix for this code"
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == "Fix safety:":
            text = []
            for follow in lines[i + 1 :]:
                if not follow.strip() or (follow.strip().endswith(":") and not text):
                    break
                text.append(follow.strip())
            note = " ".join(text)
            # "Not fixed automatically: <why>" reads twice after "not fixed:"; keep the why.
            for prefix in ("Not fixed automatically:", "Not fixed automatically."):
                if note.startswith(prefix):
                    note = note[len(prefix) :].strip()
            if note:
                return f"no automatic fix for {code}: {note}"
    return f"no automatic fix for {code}"


def _one_pass(source: str, path: str, config: Config, findings: list[Finding]) -> FixOutcome:
    outcome = FixOutcome(source=source, original=source)
    fixable: list[Finding] = []
    seen: set[tuple[int, int]] = set()
    for finding in findings:
        if finding.code not in FIXABLE_CODES:
            outcome.declined.append((finding, _not_fixable_reason(finding.code)))
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
        outcome.declined += [(f, "the file does not parse") for f in fixable]
        return outcome
    ctx = _context(module, source, path, config)

    current_source, current_findings = source, findings
    # Bottom-up: a rewrite only moves lines below the creation, so the positions of the findings
    # still to do (all above) stay valid.
    for finding in sorted(fixable, key=lambda f: (f.line, f.col), reverse=True):
        try:
            new_module = _rewrite(module, finding, ctx)
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
        except (RecursionError, Exception) as exc:  # a fixer bug must cost one fix, not the file
            detail = " ".join(str(exc).split())[:120]
            outcome.declined.append(
                (finding, f"internal error in the fixer: {type(exc).__name__}: {detail}")
            )
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
) -> FixOutcome:
    """Rewrite what can safely become `async with`; anything unverifiable: source unchanged."""
    if config is None:
        from connguard.checkers.config import Config as _Config
        from connguard.checkers.engine import config_for_path

        config = config_for_path(path) if path not in ("-", "") else _Config()
    findings = _check(source, path, config)
    outcome = _one_pass(source, path, config, findings)
    if not outcome.applied:
        outcome.source = source
        return outcome
    # Idempotence: the fixed text must be a fixed point of the fixer, or none of it is trusted.
    again = _one_pass(outcome.source, path, config, _check(outcome.source, path, config))
    if again.applied or again.source != outcome.source:
        reason = "the fix is not stable (a second run would change the file again)"
        return FixOutcome(
            source=source,
            applied=[],
            declined=sorted([*outcome.declined, *((f, reason) for f in outcome.applied)]),
            original=source,
        )
    return outcome


def declined_after(outcome: FixOutcome, after: Sequence[Finding]) -> list[tuple[Finding, str]]:
    """The declined findings as the fixed text has them: each reason paired with its finding in
    `after` (the findings of `outcome.source`), so that its position is the fixed file's.

    The fixer reports what it was given, positions of the text before the fix; once the fix is
    written, an applied fix above a declined finding has moved it (a line added, a block
    indented). A rewrite only wraps statements, never reorders them, and leaves the lines it did
    not fix unchanged but for their indentation: a declined finding is the next finding after
    the previous match with the same code, message, line text and column within that text. One
    the fixed text no longer has (a fix above made it moot) is not left for a person.
    """
    before_lines = (outcome.original or outcome.source).splitlines()
    after_lines = outcome.source.splitlines()

    def key(finding: Finding, lines: list[str]) -> tuple[str, str, str, int]:
        text = lines[finding.line - 1] if 0 < finding.line <= len(lines) else ""
        indent = len(text) - len(text.lstrip())
        return finding.code, finding.message, text.strip(), finding.col - indent

    candidates = sorted(after)
    moved: list[tuple[Finding, str]] = []
    start = 0
    for finding, reason in sorted(outcome.declined):
        wanted = key(finding, before_lines)
        for index in range(start, len(candidates)):
            if key(candidates[index], after_lines) == wanted:
                moved.append((candidates[index], reason))
                start = index + 1
                break
    return moved


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


def write_atomic(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data` in one rename, keeping its permission bits."""
    # Through a symlink the file to replace is the target: renaming over the link itself would
    # turn it into a regular copy and leave the target stale (black and ruff write the target).
    target = Path(os.path.realpath(path))
    mode = stat.S_IMODE(target.stat().st_mode)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
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
    """Fix one file; with write=True the new text replaces it atomically (only when it changed).
    OSError: unreadable; ValueError: undecodable, as the checker would report it."""
    with open(path, "rb") as fh:
        data = fh.read()
    # The checker's own decoding (PEP 263 cookie, byte-order mark), so that the fixer reads what
    # the checker flagged; the fix is encoded back the same way, mark included. Bytes in and out:
    # newlines stay exactly as stored.
    encoding = source_encoding(data)
    outcome = fix_source(data.decode(encoding), str(path), config)
    if write and outcome.changed:
        write_atomic(path, outcome.source.encode(encoding))
    return outcome
