"""Ownership analysis of one module: who creates a database resource, who holds it, who releases it.

One LibCST parse, no whole-module metadata passes. Names are resolved by a light import table
(imports, module-level makers, aliases, same-file factories, `self.x` attributes). Each function
that creates a resource is interpreted statement by statement over a small set of paths, with
normal, return, exception, break and continue exits kept apart, so an early `return`, a close
only in one branch, or a close outside `finally` each show up on their own path. The result is a
`Fate` per creating call; the rules in `rules/` turn fates into findings.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import libcst as cst

from . import exemptions as ex
from .findings import Finding
from .resources import DEFAULT_TABLE, NAMED_SOURCES, FactoryTable, ResourceSpec

# ------------------------------------------------------------------------------------------
# Tree walking: our own walker over dataclass fields (LibCST's visitor dispatch and `children`
# cost several times more than the parse budget allows).

_SKIP_FIELD_PREFIXES = (
    "whitespace",
    "lpar",
    "rpar",
    "comma",
    "semicolon",
    "colon",
    "equal",
    "dot",
    "star",
    "lbracket",
    "rbracket",
    "lbrace",
    "rbrace",
    "operator",
    "asynchronous",
    "header",
    "footer",
    "leading_lines",
    "lines_after_decorators",
    "newline",
    "first_line",
    "trailing_whitespace",
    "empty_lines",
    "indent",
    "quote",
    "prefix",
    "between",
    "relative",
    "semicolon",
)
_FIELDS: dict[type, tuple[str, ...]] = {}
_NODE = cst.CSTNode
_SCOPES = (cst.FunctionDef, cst.ClassDef, cst.Lambda)


def _fields(tp: type) -> tuple[str, ...]:
    names = _FIELDS.get(tp)
    if names is None:
        names = tuple(
            f.name for f in dataclasses.fields(tp) if not f.name.startswith(_SKIP_FIELD_PREFIXES)
        )
        _FIELDS[tp] = names
    return names


def _children(node: cst.CSTNode) -> Iterator[cst.CSTNode]:
    for name in _fields(type(node)):
        value = getattr(node, name)
        if isinstance(value, _NODE):
            yield value
        elif type(value) is tuple or type(value) is list:
            for item in value:
                if isinstance(item, _NODE):
                    yield item


def _walk(node: cst.CSTNode, *, into_scopes: bool = False) -> Iterator[cst.CSTNode]:
    """Pre-order-ish walk (siblings reversed, which no caller depends on); nested function,
    class and lambda bodies are skipped unless `into_scopes`."""
    stack = [node]
    pop = stack.pop
    push = stack.append
    while stack:
        current = pop()
        yield current
        if not into_scopes and current is not node and isinstance(current, _SCOPES):
            continue
        for name in _fields(type(current)):
            value = getattr(current, name)
            if isinstance(value, _NODE):
                push(value)
            elif type(value) is tuple or type(value) is list:
                for item in value:
                    if isinstance(item, _NODE):
                        push(item)


def dotted(expr: cst.BaseExpression) -> list[str] | None:
    """`a.b.c` -> ["a", "b", "c"]; anything else -> None."""
    parts: list[str] = []
    while type(expr) is cst.Attribute:
        parts.append(expr.attr.value)
        expr = expr.value
    if type(expr) is cst.Name:
        parts.append(expr.value)
        parts.reverse()
        return parts
    return None


def _last_name(expr: cst.BaseExpression) -> str:
    if type(expr) is cst.Name:
        return expr.value
    if type(expr) is cst.Attribute:
        return expr.attr.value
    if type(expr) is cst.Call:
        return _last_name(expr.func)
    return ""


def _unwrap_await(expr: cst.BaseExpression) -> tuple[cst.BaseExpression, bool]:
    if type(expr) is cst.Await:
        return expr.expression, True
    return expr, False


def _stmts(body: cst.BaseSuite | cst.CSTNode) -> Iterable[cst.CSTNode]:
    """Statements of a suite; small statements of a SimpleStatementLine are flattened."""
    inner = body.body
    for stmt in inner:
        if type(stmt) is cst.SimpleStatementLine:
            yield from stmt.body
        else:
            yield stmt


_GENERIC_RELEASE = frozenset(
    {
        "close",
        "aclose",
        "dispose",
        "release",
        "terminate",
        "wait_closed",
        "remove",
        "shutdown",
        "disconnect",
        "ensure_closed",
        "__aexit__",
        "__exit__",
        "putconn",
        "invalidate",
        "stop",
        "cleanup",
        "expunge_all",
    }
)
_STDLIB = frozenset(getattr(sys, "stdlib_module_names", ()))


# ------------------------------------------------------------------------------------------
# Public interface


class ImportResolver(Protocol):
    def resolve(self, module: str, name: str) -> ResourceSpec | None:
        """`from <module> import <name>`: what <name> is in that project module (see
        `module_factories` for the convention), or None."""


@dataclass
class Fate:
    """What happened to one resource created at `node`; rules decide what to report."""

    spec: ResourceSpec
    node: cst.CSTNode  # the creating call
    owner: str  # "function" | "module" | "class"
    function: str = ""
    leak_normal: bool = False  # open at the end of some normal path
    leak_exception: bool = False  # open when an exception or cancellation leaves the owner
    released: bool = False  # some path releases it
    escaped: bool = False  # some path hands it on (return, self, stack, task...)
    reason: str = ""  # why it leaks on the normal path, for the message
    unawaited: cst.CSTNode | None = None  # `session.close()` without await
    mistaken: str = ""  # begin/commit used where a close was needed
    sync_with: bool = False  # plain `with` on an async-only resource
    returned_by: str = ""  # "FastAPI dependency" / "pytest fixture" that returns it
    stored_attr: str = ""  # self.<attr> it was stored on
    owner_class: str = ""
    shared: bool = False  # created at module or class level (shared by every caller)
    unshielded: cst.CSTNode | None = None  # the awaited close in finally under trio/anyio
    conditional: bool = False  # created in `x or F()` / `F() if c else y`
    in_async: bool = False  # created in an `async def`: cancellation can land at its awaits
    advice: str = ""  # replaces the spec's suggestion when the fix is elsewhere
    var: str = ""  # the name the creation is bound to, if one


def check_module(
    source: str,
    path: str,
    *,
    table: FactoryTable = DEFAULT_TABLE,
    imports: ImportResolver | None = None,
    module_name: str | None = None,
    enabled: Collection[str] | None = None,
) -> list[Finding]:
    """All findings of the enabled rules in one module (enabled=None: the rules on by default).

    Raises libcst.ParserSyntaxError when the source does not parse.
    """
    module = cst.parse_module(source)
    analysis = ModuleAnalysis(module, table, imports, module_name, path)
    fates = analysis.run()
    if not fates:
        return []
    from .rules import run_rules

    reports = run_rules(fates, enabled)
    if not reports:
        return []
    return _to_findings(module, path, reports)


def module_factories(
    source: str,
    *,
    table: FactoryTable = DEFAULT_TABLE,
    imports: ImportResolver | None = None,
    module_name: str | None = None,
) -> dict[str, ResourceSpec]:
    """Names this module binds that create resources: {name: binding spec}.

    A binding spec describes what the name *is*: a maker or factory function is a spec with
    `call` set (calling it yields `call`); a module-level engine or pool is that engine/pool spec
    (its `methods`, such as `connect`/`acquire`, create resources). Pass the result back through
    an ImportResolver.
    """
    module = cst.parse_module(source)
    analysis = ModuleAnalysis(module, table, imports, module_name, "")
    return analysis.exports()


# ------------------------------------------------------------------------------------------
# Positions, computed only for modules that have something to report.


def _to_findings(
    module: cst.Module, path: str, reports: list[tuple[str, cst.CSTNode, str]]
) -> list[Finding]:
    from libcst.metadata import MetadataWrapper, PositionProvider

    wrapper = MetadataWrapper(module, unsafe_skip_copy=True)
    try:
        positions = wrapper.resolve(PositionProvider)
    except RecursionError:
        return []  # a pathologically deep tree: no position, so no finding rather than a crash
    findings = []
    for code, node, message in reports:
        rng = positions.get(node)
        if rng is None:
            continue
        findings.append(
            Finding(
                path,
                rng.start.line,
                rng.start.column + 1,
                code,
                message,
                rng.end.line,
                rng.end.column + 1,
            )
        )
    findings.sort()
    return findings


def node_text(node: cst.CSTNode) -> str:
    return cst.Module(body=()).code_for_node(node)


# ------------------------------------------------------------------------------------------
# Scopes


_factory_cache: dict[int, ResourceSpec] = {}


def callable_of(product: ResourceSpec, awaited: bool = False) -> ResourceSpec:
    """A binding spec for something that yields `product` when called."""
    key = id(product) * 2 + awaited
    spec = _factory_cache.get(key)
    if spec is None:
        made = dataclasses.replace(product, awaited=True) if awaited else product
        spec = ResourceSpec(product.name, "factory", product.is_async, managed=False, call=made)
        _factory_cache[key] = spec
        _keepalive.append(product)
    return spec


_keepalive: list[ResourceSpec] = []


@dataclass
class ClassInfo:
    node: cst.ClassDef
    name: str
    bases: list[list[str] | None]
    methods: dict[str, FunctionInfo] = field(default_factory=dict)
    attr_sources: dict[str, ResourceSpec] = field(default_factory=dict)
    factory_methods: dict[str, ResourceSpec] = field(default_factory=dict)
    released_attrs: set[str] | None = None


@dataclass
class FunctionInfo:
    node: cst.FunctionDef
    name: str
    cls: ClassInfo | None
    outer: FunctionInfo | None = None
    decorators: tuple[str, ...] = ()
    is_async: bool = False
    is_generator: bool = False
    params: list[str] = field(default_factory=list)
    annotations: dict[str, cst.BaseExpression] = field(default_factory=dict)
    locals: set[str] = field(default_factory=set)
    globals: set[str] = field(default_factory=set)
    imports: dict[str, str] = field(default_factory=dict)
    from_imports: dict[str, tuple[str, str]] = field(default_factory=dict)
    calls: list[cst.Call] = field(default_factory=list)
    assigns: list[tuple[cst.BaseExpression, cst.BaseExpression]] = field(default_factory=list)
    returns: list[cst.BaseExpression] = field(default_factory=list)
    nested: list[cst.FunctionDef] = field(default_factory=list)
    released_names: set[str] = field(default_factory=set)
    sources: dict[str, ResourceSpec] = field(default_factory=dict)
    product: ResourceSpec | None = None
    interesting: bool = False
    summary: dict[str, str] | None = None

    @property
    def self_name(self) -> str:
        if self.cls is None or not self.params:
            return ""
        if any(d in ("staticmethod",) for d in self.decorators):
            return ""
        return self.params[0]


_DEPENDS = ("Depends", "Security")


class ModuleAnalysis:
    def __init__(
        self,
        module: cst.Module,
        table: FactoryTable,
        resolver: ImportResolver | None,
        module_name: str | None,
        path: str,
    ) -> None:
        self.module = module
        self.table = table
        self.resolver = resolver
        self.module_name = module_name or ""
        self.is_package = path.endswith("__init__.py")
        self.roots = table.roots
        self.imports: dict[str, str] = {}  # local name -> qualified name
        self.from_imports: dict[str, tuple[str, str]] = {}  # local -> (module, name) for resolver
        self.bindings: dict[
            str, ResourceSpec
        ] = {}  # module-level names bound to makers/engines/...
        self.defined: set[str] = set()  # names bound by def/class at module level
        self.functions: list[FunctionInfo] = []
        self.module_functions: dict[str, FunctionInfo] = {}
        self.classes: dict[str, ClassInfo] = {}
        self.module_assigns: list[tuple[cst.CSTNode, cst.BaseExpression, str]] = []
        self.fates: list[Fate] = []
        self.depends: set[str] = set()
        self.attr_sources: dict[str, ResourceSpec] = {}  # `app.state.pool = create_pool()`
        self.uses_trio = False
        self._resolved: dict[str, ResourceSpec | None] = {}
        self.type_aliases: dict[str, cst.BaseExpression] = {}  # `type Maker = ...`

    # ---------------------------------------------------------------- module scope

    def _note_depends(self, node: cst.CSTNode) -> None:
        """`Depends(get_db)` / `Security(get_db)`: `get_db` is a FastAPI dependency."""
        if type(node) is cst.Call and node.args and _last_name(node.func) in _DEPENDS:
            name = dotted(node.args[0].value)
            if name is not None and len(name) == 1:
                self.depends.add(name[0])

    def _collect(self) -> None:
        self._collect_block(self.module.body, None)
        # `SessionDep = Annotated[AsyncSession, Depends(get_db)]` at module level.
        for stmt in self.module.body:
            if type(stmt) is cst.SimpleStatementLine:
                for node in _walk(stmt):
                    self._note_depends(node)

    def _collect_block(self, body: Iterable[cst.CSTNode], cls: ClassInfo | None) -> None:
        for stmt in body:
            t = type(stmt)
            if t is cst.SimpleStatementLine:
                for small in stmt.body:
                    ts = type(small)
                    if ts is cst.Import or ts is cst.ImportFrom:
                        if cls is None:
                            self._import(small)
                    elif ts is cst.TypeAlias:
                        if cls is None:
                            self.type_aliases[small.name.value] = small.value
                    elif ts is cst.Assign or ts is cst.AnnAssign:
                        if small.value is not None:
                            targets = (
                                [t_.target for t_ in small.targets]
                                if ts is cst.Assign
                                else [small.target]
                            )
                            for target in targets:
                                if type(target) is cst.Name:
                                    self.module_assigns.append(
                                        (small, small.value, target.value, cls)
                                    )
            elif t is cst.FunctionDef:
                info = self._function(stmt, cls, None)
                if cls is None:
                    self.module_functions[info.name] = info
                    self.defined.add(info.name)
                else:
                    cls.methods[info.name] = info
            elif t is cst.ClassDef:
                info = ClassInfo(stmt, stmt.name.value, [dotted(a.value) for a in stmt.bases])
                if cls is None:
                    self.classes[info.name] = info
                    self.defined.add(info.name)
                self._collect_block(
                    stmt.body.body if isinstance(stmt.body, cst.IndentedBlock) else (), info
                )
            elif (
                t is cst.If
                or t is cst.Try
                or t is cst.TryStar
                or t is cst.With
                or t is cst.For
                or t is cst.While
            ):
                if t is cst.If and cls is None and _is_main_guard(stmt.test):
                    continue  # a script's main block is not shared module state
                for suite in self._suites(stmt):
                    self._collect_block(suite, cls)

    @staticmethod
    def _suites(stmt: cst.CSTNode) -> Iterator[Iterable[cst.CSTNode]]:
        body = getattr(stmt, "body", None)
        if isinstance(body, cst.IndentedBlock):
            yield body.body
        elif isinstance(body, cst.SimpleStatementSuite):
            yield [cst.SimpleStatementLine(body=body.body)]
        for handler in getattr(stmt, "handlers", ()):
            if isinstance(handler.body, cst.IndentedBlock):
                yield handler.body.body
        orelse = getattr(stmt, "orelse", None)
        while orelse is not None:
            if isinstance(orelse, cst.If):
                if isinstance(orelse.body, cst.IndentedBlock):
                    yield orelse.body.body
                orelse = orelse.orelse
            else:
                if isinstance(orelse.body, cst.IndentedBlock):
                    yield orelse.body.body
                orelse = None
        final = getattr(stmt, "finalbody", None)
        if final is not None and isinstance(final.body, cst.IndentedBlock):
            yield final.body.body

    def _absolute(self, node: cst.ImportFrom) -> str | None:
        mod = dotted(node.module) if node.module is not None else []
        if mod is None:
            return None
        level = len(node.relative)
        if not level:
            return ".".join(mod)
        if not self.module_name:
            return "." * level + ".".join(mod)
        package = self.module_name.split(".")
        if not self.is_package:
            package = package[:-1]
        if level > 1:
            package = package[: len(package) - (level - 1)]
        return ".".join(package + mod)

    def _import(
        self,
        node: cst.Import | cst.ImportFrom,
        into: dict[str, str] | None = None,
        from_into: dict[str, tuple[str, str]] | None = None,
    ) -> None:
        imports = self.imports if into is None else into
        from_imports = self.from_imports if from_into is None else from_into
        if type(node) is cst.Import:
            for alias in node.names:
                parts = dotted(alias.name)
                if parts is None:
                    continue
                if alias.asname is not None and type(alias.asname.name) is cst.Name:
                    imports[alias.asname.name.value] = ".".join(parts)
                else:
                    imports[parts[0]] = parts[0]
                if parts[0] in ("trio", "anyio"):
                    self.uses_trio = True
            return
        module = self._absolute(node)
        if module is None or isinstance(node.names, cst.ImportStar):
            return
        if module.split(".", 1)[0] in ("trio", "anyio"):
            self.uses_trio = True
        for alias in node.names:
            if type(alias.name) is not cst.Name:
                continue
            name = alias.name.value
            local = name
            if alias.asname is not None and type(alias.asname.name) is cst.Name:
                local = alias.asname.name.value
            imports[local] = f"{module}.{name}" if not module.endswith(".") else module + name
            from_imports[local] = (module, name)

    def _qualified_binding(
        self,
        qualified: str,
        local: str | None,
        from_imports: dict[str, tuple[str, str]] | None = None,
    ) -> ResourceSpec | None:
        """What an imported qualified name is: a table factory, a table type, or (through the
        resolver) a project maker or factory."""
        if qualified in self._resolved:
            return self._resolved[qualified]
        spec: ResourceSpec | None = None
        product = self.table.lookup(qualified)
        if product is not None:
            spec = product if product.kind == "factory" else callable_of(product)
        else:
            spec = self.table.lookup_type(qualified)
            if spec is not None:
                spec = dataclasses.replace(spec, managed=False)
            elif self.resolver is not None:
                root = qualified.lstrip(".").split(".", 1)[0]
                from_imports = self.from_imports if from_imports is None else from_imports
                if root not in self.roots and root not in _STDLIB and local in from_imports:
                    module, name = from_imports[local]
                    if qualified == f"{module}.{name}" or module.endswith("."):
                        try:
                            spec = self.resolver.resolve(module, name)
                        except (OSError, RecursionError, ValueError, cst.ParserSyntaxError):
                            spec = None
        self._resolved[qualified] = spec
        return spec

    def global_binding(self, parts: list[str]) -> ResourceSpec | None:
        """The binding of a dotted name at module scope (imports, makers, factories)."""
        root = parts[0]
        if root in self.bindings:
            spec = self.bindings[root]
            return _apply_attrs(spec, parts[1:])
        if root in self.module_functions:
            info = self.module_functions[root]
            if info.product is not None and len(parts) == 1:
                return callable_of(info.product, info.is_async)
            return None
        if root in self.classes:
            cls = self.classes[root]
            if len(parts) == 1:
                return self._class_binding(cls)
            return None
        if root in self.defined:
            return None
        return self._import_binding(parts, self.imports, self.from_imports)

    def _import_binding(
        self, parts: list[str], imports: dict[str, str], from_imports: dict[str, tuple[str, str]]
    ) -> ResourceSpec | None:
        root = parts[0]
        qualified = imports.get(root)
        if qualified is None:
            return None
        if (
            qualified.split(".", 1)[0] not in self.roots
            and root not in from_imports
            and self.resolver is None
        ):
            return None
        if len(parts) == 1:
            return self._qualified_binding(qualified, root, from_imports)
        full = qualified + "." + ".".join(parts[1:])
        spec = self.table.lookup(full) if not full.startswith(".") else None
        if spec is not None:
            return callable_of(spec)
        base = (
            self._qualified_binding(qualified, root, from_imports) if root in from_imports else None
        )
        if base is None:
            # `import pkg.db as db; db.Session()` or `from pkg import db; db.Session()`: ask the
            # resolver about pkg.db's `Session`.
            if self.resolver is not None and len(parts) == 2 and not qualified.startswith("."):
                top = qualified.split(".", 1)[0]
                if top not in self.roots and top not in _STDLIB:
                    key = full
                    if key not in self._resolved:
                        try:
                            self._resolved[key] = self.resolver.resolve(qualified, parts[1])
                        except (OSError, RecursionError, ValueError, cst.ParserSyntaxError):
                            self._resolved[key] = None
                    return self._resolved[key]
            return None
        return _apply_attrs(base, parts[1:])

    def _class_binding(self, cls: ClassInfo) -> ResourceSpec | None:
        """`class MySession(AsyncSession)`: calling the subclass creates the base's resource."""
        for base in cls.bases:
            if base is None or base[0] == cls.name:
                continue
            spec = self.global_binding(base)
            if spec is not None and spec.call is not None and spec.call.managed:
                return spec
        return None

    def value_binding(
        self, expr: cst.BaseExpression, scope: FunctionInfo | None
    ) -> ResourceSpec | None:
        """What a value expression evaluates to, as a binding spec (for makers/engines/pools)."""
        expr, awaited = _unwrap_await(expr)
        if type(expr) is cst.Call:
            callee = self.callee_binding(expr.func, scope)
            if callee is None or callee.call is None:
                return None
            product = callee.call
            if product.awaited and not awaited:
                return None
            if product.class_kwarg:
                product = self._swap_class(expr, product, scope)
            return product
        parts = dotted(expr)
        if parts is None:
            return None
        return self.callee_binding(expr, scope)

    def _swap_class(
        self, call: cst.Call, maker: ResourceSpec, scope: FunctionInfo | None
    ) -> ResourceSpec:
        chosen = None
        positional = 0
        for arg in call.args:
            if arg.keyword is None and not arg.star:
                positional += 1
                if positional == 2:
                    chosen = arg.value
            elif arg.keyword is not None and arg.keyword.value == maker.class_kwarg:
                chosen = arg.value
        if chosen is None:
            return maker
        klass = self.callee_binding(chosen, scope)
        if klass is None or klass.call is None or not klass.call.managed:
            return maker
        return dataclasses.replace(maker, call=klass.call, name=f"{maker.name}({klass.call.name})")

    def callee_binding(
        self, func: cst.BaseExpression, scope: FunctionInfo | None
    ) -> ResourceSpec | None:
        parts = dotted(func)
        if parts is None:
            return None
        spec = self._dotted_binding(parts, scope)
        if spec is None and len(parts) >= 2 and parts[-1] in _NAMED_METHODS:
            named = _named_source(parts)
            if named is not None and self._dotted_binding(parts[:-1], scope) is None:
                return named
        return spec

    def _dotted_binding(self, parts: list[str], scope: FunctionInfo | None) -> ResourceSpec | None:
        root = parts[0]
        info = scope
        while info is not None:
            if root in info.sources:
                return _apply_attrs(info.sources[root], parts[1:])
            if root in info.imports:
                return self._import_binding(parts, info.imports, info.from_imports)
            if info.self_name and root == info.self_name and len(parts) >= 2:
                cls = info.cls
                attr = parts[1]
                if attr in cls.attr_sources:
                    return _apply_attrs(cls.attr_sources[attr], parts[2:])
                if attr in cls.factory_methods and len(parts) == 2:
                    return cls.factory_methods[attr]
                return None
            if root in info.locals or root in info.params:
                return self._attr_source(parts)
            info = info.outer
        return self.global_binding(parts) or self._attr_source(parts)

    def _attr_source(self, parts: list[str]) -> ResourceSpec | None:
        """`request.app.state.pool.acquire()`: an attribute this module binds to a pool."""
        if not self.attr_sources or len(parts) < 2:
            return None
        if parts[-1] in self.attr_sources:
            return _apply_attrs(self.attr_sources[parts[-1]], [])
        if len(parts) >= 3 and parts[-2] in self.attr_sources:
            return _apply_attrs(self.attr_sources[parts[-2]], parts[-1:])
        return None

    def _module_bindings(self) -> None:
        for _stmt, value, name, cls in self.module_assigns:
            if cls is not None:
                continue
            spec = self.value_binding(value, None)
            if spec is None:
                if type(value) is cst.Name and value.value == "None":
                    continue
                self.bindings.pop(name, None)
                continue
            self.bindings[name] = (
                dataclasses.replace(spec, managed=False) if spec.managed and spec.methods else spec
            )

    # ---------------------------------------------------------------- functions

    def _function(
        self, node: cst.FunctionDef, cls: ClassInfo | None, outer: FunctionInfo | None
    ) -> FunctionInfo:
        decorators = []
        for dec in node.decorators:
            expr = dec.decorator
            if type(expr) is cst.Call:
                expr = expr.func
            decorators.append(_last_name(expr))
        info = FunctionInfo(
            node, node.name.value, cls, outer, tuple(decorators), node.asynchronous is not None
        )
        params = node.params
        for group in (params.posonly_params, params.params, params.kwonly_params):
            for param in group:
                info.params.append(param.name.value)
                if param.annotation is not None:
                    info.annotations[param.name.value] = param.annotation.annotation
        for star in (params.star_arg, params.star_kwarg):
            if isinstance(star, cst.Param):
                info.params.append(star.name.value)
        self.functions.append(info)
        return info

    def _prescan(self, info: FunctionInfo) -> None:
        """One walk over the body: calls, assignments, returns, locals, nested functions."""
        calls = info.calls
        locals_ = info.locals
        for node in _walk(info.node.body):
            t = type(node)
            if t is cst.Call:
                calls.append(node)
                func = node.func
                if type(func) is cst.Attribute and func.attr.value in _GENERIC_RELEASE:
                    recv = func.value
                    if type(recv) is cst.Name:
                        info.released_names.add(recv.value)
                elif ex.is_release_helper(_last_name(func)):
                    for arg in node.args:
                        if type(arg.value) is cst.Name:
                            info.released_names.add(arg.value.value)
                self._note_depends(node)
            elif t is cst.Assign:
                for target in node.targets:
                    self._bind_names(target.target, locals_)
                    info.assigns.append((target.target, node.value))
            elif t is cst.AnnAssign:
                self._bind_names(node.target, locals_)
                if node.value is not None:
                    info.assigns.append((node.target, node.value))
            elif t is cst.AugAssign:
                self._bind_names(node.target, locals_)
            elif t is cst.NamedExpr:
                self._bind_names(node.target, locals_)
                info.assigns.append((node.target, node.value))
            elif t is cst.For or t is cst.CompFor:
                self._bind_names(node.target, locals_)
            elif t is cst.WithItem:
                if node.asname is not None:
                    self._bind_names(node.asname.name, locals_)
            elif t is cst.ExceptHandler or t is cst.ExceptStarHandler:
                if node.name is not None:
                    self._bind_names(node.name.name, locals_)
            elif t is cst.Return:
                if node.value is not None:
                    info.returns.append(node.value)
            elif t is cst.Yield:
                info.is_generator = True
            elif t is cst.Global or t is cst.Nonlocal:
                for item in node.names:
                    info.globals.add(item.name.value)
            elif t is cst.Import or t is cst.ImportFrom:
                # Function-level (lazy) imports: resolved like module imports, in this scope.
                self._import(node, into=info.imports, from_into=info.from_imports)
            elif t is cst.FunctionDef:
                if node is not info.node:
                    locals_.add(node.name.value)
                    info.nested.append(node)
            elif t is cst.ClassDef:
                locals_.add(node.name.value)
        locals_ -= info.globals
        for d in info.node.decorators:
            # decorators are evaluated in the enclosing scope; Depends may appear in them
            for node in _walk(d.decorator):
                self._note_depends(node)
        for default in self._defaults(info.node):
            for node in _walk(default):
                self._note_depends(node)

    @staticmethod
    def _defaults(node: cst.FunctionDef) -> Iterator[cst.CSTNode]:
        params = node.params
        for group in (params.posonly_params, params.params, params.kwonly_params):
            for param in group:
                if param.default is not None:
                    yield param.default
                if param.annotation is not None:
                    yield param.annotation.annotation

    @staticmethod
    def _bind_names(target: cst.CSTNode, into: set[str]) -> None:
        t = type(target)
        if t is cst.Name:
            into.add(target.value)
        elif t is cst.Tuple or t is cst.List:
            for el in target.elements:
                ModuleAnalysis._bind_names(el.value, into)
        elif t is cst.StarredElement:
            ModuleAnalysis._bind_names(target.value, into)

    def _sources(self, info: FunctionInfo) -> None:
        """Parameters annotated with a known type and locals bound to makers/engines/pools."""
        for name, annotation in info.annotations.items():
            spec = self._annotation_binding(annotation)
            if spec is not None:
                info.sources[name] = spec
        dropped: set[str] = set()
        for _ in range(2):
            for target, value in info.assigns:
                if type(target) is not cst.Name:
                    continue
                name = target.value
                if name in dropped or name in info.globals:
                    continue
                spec = self.value_binding(value, info)
                if spec is None:
                    if name in info.sources and name not in info.annotations:
                        dropped.add(name)
                        del info.sources[name]
                    continue
                if spec.call is not None or spec.methods or spec.cm_methods:
                    info.sources.setdefault(name, spec)

    def _annotation_binding(
        self, annotation: cst.BaseExpression, depth: int = 0
    ) -> ResourceSpec | None:
        if type(annotation) is cst.SimpleString:
            # `maker: "async_sessionmaker[AsyncSession]"`
            text = annotation.evaluated_value
            if not isinstance(text, str) or depth > 2:
                return None
            try:
                annotation = cst.parse_expression(text)
            except Exception:
                return None
            return self._annotation_binding(annotation, depth + 1)
        if type(annotation) is cst.Subscript:
            annotation = annotation.value
        parts = dotted(annotation)
        if parts is None:
            return None
        qualified = self.imports.get(parts[0])
        if qualified is None:
            alias = self._type_alias(parts)
            if alias is not None and depth < 3:
                return self._annotation_binding(alias, depth + 1)
            return None
        full = ".".join([qualified, *parts[1:]])
        spec = self.table.lookup_type(full)
        if spec is None:
            return None
        return dataclasses.replace(spec, managed=False)

    def _type_alias(self, parts: list[str]) -> cst.BaseExpression | None:
        """`Maker = async_sessionmaker[AsyncSession]` or `type Maker = ...` in this module."""
        if len(parts) != 1:
            return None
        name = parts[0]
        if name in self.type_aliases:
            return self.type_aliases[name]
        for _stmt, value, target, cls in self.module_assigns:
            if target == name and cls is None and type(value) is cst.Subscript:
                return value
        return None

    def _class_sources(self, cls: ClassInfo) -> None:
        for method in cls.methods.values():
            self_name = method.self_name
            if not self_name:
                continue
            for target, value in method.assigns:
                if type(target) is not cst.Attribute or type(target.value) is not cst.Name:
                    continue
                if target.value.value != self_name:
                    continue
                spec = self.value_binding(value, method)
                if spec is None and type(value) is cst.Name and value.value in method.sources:
                    spec = method.sources[value.value]
                if spec is None:
                    continue
                if spec.call is not None or spec.methods or spec.cm_methods:
                    cls.attr_sources.setdefault(
                        target.attr.value, dataclasses.replace(spec, managed=False)
                    )

    # ---------------------------------------------------------------- factories

    def _creation_spec(self, call: cst.Call, scope: FunctionInfo | None) -> ResourceSpec | None:
        func = call.func
        if type(func) is cst.Call:
            # `sessionmaker(bind=engine)()`: call the maker the inner call makes.
            callee = self.value_binding(func, scope)
        else:
            callee = self.callee_binding(func, scope)
        if callee is None or callee.call is None:
            return None
        product = callee.call
        if not product.managed:
            return None
        if not call.args and product.kind == "session" and self._is_session_class(func, scope):
            return None  # `Session()` with no bind can never check out a connection
        return product

    def _is_session_class(self, func: cst.BaseExpression, scope: FunctionInfo | None) -> bool:
        """Is `func` the Session/AsyncSession class itself (not a maker bound to an engine)?"""
        parts = dotted(func)
        if parts is None:
            return False
        imports = self.imports
        info = scope
        while info is not None:
            if parts[0] in info.imports:
                imports = info.imports
                break
            info = info.outer
        qualified = imports.get(parts[0])
        if qualified is None:
            return False
        full = ".".join([qualified, *parts[1:]])
        return full.endswith("Session") and self.table.lookup(full) is not None

    def _fresh_names(self, info: FunctionInfo) -> dict[str, ResourceSpec]:
        fresh: dict[str, ResourceSpec] = {}
        for _ in range(3):
            changed = False
            for target, value in info.assigns:
                if (
                    type(target) is not cst.Name
                    or target.value in fresh
                    or target.value in info.globals
                ):
                    continue  # a `global` is a cached singleton, not a fresh resource per call
                inner, _awaited = _unwrap_await(value)
                spec = None
                if type(inner) is cst.Call:
                    spec = self._creation_spec(inner, info)
                elif type(inner) is cst.Name:
                    spec = fresh.get(inner.value)
                if spec is not None:
                    fresh[target.value] = spec
                    changed = True
            if not changed:
                break
        return fresh

    def _factory_product(self, info: FunctionInfo) -> ResourceSpec | None:
        if info.is_generator or not info.returns:
            return None
        fresh: dict[str, ResourceSpec] | None = None
        for value in info.returns:
            inner, _ = _unwrap_await(value)
            if type(inner) is cst.Call:
                spec = self._creation_spec(inner, info)
                if spec is not None:
                    return spec
            elif type(inner) is cst.Name:
                if fresh is None:
                    fresh = self._fresh_names(info)
                if inner.value in fresh and not _registered_elsewhere(info, inner.value):
                    return fresh[inner.value]
        return None

    def _maker_product(self, info: FunctionInfo) -> ResourceSpec | None:
        """`def create_sessionmaker(engine): return async_sessionmaker(engine)`: calling it makes
        a maker, so `maker = create_sessionmaker(engine); session = maker()` is a creation."""
        if info.is_generator or info.is_async or not info.returns:
            return None
        for value in info.returns:
            spec = self.value_binding(value, info)
            if spec is None or spec.managed:
                continue
            if type(_unwrap_await(value)[0]) is not cst.Call and spec.kind != "maker":
                # `return engine`: hands out the module's one engine, made by nobody's call
                continue
            if (spec.call is not None and spec.call.managed) or spec.methods:
                return spec
        return None

    def _compute_factories(self) -> None:
        for _ in range(3):
            changed = False
            for info in self.functions:
                # (`return AsyncSessionLocal` makes a maker factory without a call of its own)
                if info.product is not None or not (info.calls or info.returns):
                    continue
                product = self._factory_product(info) or self._maker_product(info)
                if product is None:
                    continue
                if ex.is_shared_product(info.decorators):
                    continue
                info.product = product
                changed = True
                if info.cls is not None and info.self_name and info.outer is None:
                    info.cls.factory_methods[info.name] = callable_of(product, info.is_async)
            if not changed:
                break

    # ---------------------------------------------------------------- driver

    def _prepare(self) -> None:
        self._collect()
        self._module_bindings()
        # Nested functions are discovered while pre-scanning their parents.
        index = 0
        while index < len(self.functions):
            info = self.functions[index]
            index += 1
            self._prescan(info)
            for nested in info.nested:
                self._function(nested, None, info)
        for info in self.functions:
            self._sources(info)
        for _stmt, value, name, cls in self.module_assigns:
            if cls is not None:
                # `class Repo: maker = async_sessionmaker(engine)` then `self.maker()`
                spec = self.value_binding(value, None)
                if spec is not None and (spec.call is not None or spec.methods):
                    cls.attr_sources.setdefault(name, dataclasses.replace(spec, managed=False))
        for cls in self.classes.values():
            self._class_sources(cls)
        for _ in range(2):
            for info in self.functions:
                self._sources(info)
        self._compute_factories()
        self._factory_made_bindings()
        for info in self.functions:
            self._sources(info)  # locals bound by calling a maker factory found just above
        self._global_sources()

    def _factory_made_bindings(self) -> None:
        """`engine = create_db_engine(url)` at module level, where `create_db_engine` is this
        module's own function returning `create_engine(...)`: `engine.connect()` creates."""
        for _stmt, value, name, cls in self.module_assigns:
            if cls is not None or name in self.bindings:
                continue
            spec = self.value_binding(value, None)
            if spec is not None and spec.methods:
                self.bindings[name] = dataclasses.replace(spec, managed=False)

    def _global_sources(self) -> None:
        """`global pool; pool = await asyncpg.create_pool()` makes `pool` a module source, and
        `app.state.pool = await asyncpg.create_pool()` makes `<anything>.pool` one."""
        for info in self.functions:
            for target, value in info.assigns:
                if type(target) is cst.Attribute and not (
                    type(target.value) is cst.Name and target.value.value == info.self_name
                ):
                    spec = self.value_binding(value, info)
                    if spec is not None and (spec.methods or spec.call is not None):
                        self.attr_sources.setdefault(
                            target.attr.value, dataclasses.replace(spec, managed=False)
                        )
            if not info.globals:
                continue
            for target, value in info.assigns:
                if type(target) is cst.Name and target.value in info.globals:
                    spec = self.value_binding(value, info)
                    if spec is not None and (spec.methods or spec.call is not None):
                        self.bindings.setdefault(
                            target.value, dataclasses.replace(spec, managed=False)
                        )

    def exports(self) -> dict[str, ResourceSpec]:
        self._prepare()
        out: dict[str, ResourceSpec] = {}
        for name, spec in self.bindings.items():
            out[name] = spec
        for name, info in self.module_functions.items():
            if info.product is not None:
                out[name] = callable_of(info.product, info.is_async)
        for name, cls in self.classes.items():
            spec = self._class_binding(cls)
            if spec is not None:
                out[name] = spec
        for local in self.from_imports:
            if local in out or local in self.defined:
                continue
            spec = self.global_binding([local])
            if spec is not None:
                out[local] = spec
        return out

    def run(self) -> list[Fate]:
        self._prepare()
        self._module_level()
        for info in self.functions:
            if not info.calls:
                continue
            if not self._interesting(info):
                continue
            try:
                FunctionAnalysis(self, info).run()
            except (RecursionError, _GiveUp):
                continue  # absurdly nested or branchy code: no verdict rather than a guess
        self._owner_checks()
        return self.fates

    def _interesting(self, info: FunctionInfo) -> bool:
        for call in info.calls:
            if self._creation_spec(call, info) is not None:
                return True
            if _last_name(call.func) == "anext" and call.args:
                inner = call.args[0].value
                if type(inner) is cst.Call and self.resource_generator(inner.func) is not None:
                    return True
        return False

    def resource_generator(self, func: cst.BaseExpression) -> FunctionInfo | None:
        if type(func) is not cst.Name:
            return None
        info = self.module_functions.get(func.value)
        if info is None or not info.is_generator or not info.is_async:
            return None
        if any(self._creation_spec(c, info) is not None for c in info.calls):
            return info
        return None

    def _module_level(self) -> None:
        """Module- and class-level creations are shared by every request (CG108)."""
        for _stmt, value, name, cls in self.module_assigns:
            inner, _ = _unwrap_await(value)
            if type(inner) is not cst.Call:
                continue
            spec = self._creation_spec(inner, None)
            if spec is None or not spec.is_async or spec.kind not in ("session", "connection"):
                continue
            self.fates.append(
                Fate(
                    spec,
                    inner,
                    "class" if cls is not None else "module",
                    name,
                    shared=True,
                    owner_class=cls.name if cls else "",
                )
            )

    # ---------------------------------------------------------------- owner checks

    def _owner_checks(self) -> None:
        module_released: set[str] | None = None
        for fate in self.fates:
            if not fate.stored_attr:
                continue
            cls = self.classes.get(fate.owner_class)
            if cls is None or not self._bases_known(cls):
                continue
            if module_released is None:
                module_released = self._module_released_attrs()
            if fate.stored_attr in module_released:
                continue
            if fate.stored_attr in self._released_attrs(cls):
                continue
            fate.leak_normal = True
            fate.reason = f"stored on self.{fate.stored_attr}, but {cls.name} never releases it"
            fate.advice = (
                f"release it in a close()/aclose()/__aexit__ method of {cls.name} "
                f'("self.{fate.stored_attr}.{(fate.spec.release_methods or ("close",))[0]}()")'
            )

    def _bases_known(self, cls: ClassInfo, depth: int = 0) -> bool:
        for base in cls.bases:
            if base is None:
                return False
            name = base[-1]
            if name in ("object", "Generic", "ABC", "Protocol") or base[0] in ("typing", "abc"):
                continue
            if len(base) == 1 and name in self.classes and depth < 5:
                if not self._bases_known(self.classes[name], depth + 1):
                    return False
                continue
            return False
        return True

    def _released_attrs(self, cls: ClassInfo, depth: int = 0) -> set[str]:
        if cls.released_attrs is not None:
            return cls.released_attrs
        released: set[str] = set()
        cls.released_attrs = released
        for method in cls.methods.values():
            self_name = method.self_name or "self"
            aliases: dict[str, str] = {}
            for target, value in method.assigns:
                attr = _self_attr(value, self_name)
                if attr:
                    for name in _names_in(target):
                        aliases[name] = attr
                elif type(value) is cst.Tuple:
                    for el in value.elements:
                        attr = _self_attr(el.value, self_name)
                        if attr:
                            for name in _names_in(target):
                                aliases.setdefault(name, attr)
            for node in _walk(method.node.body, into_scopes=True):
                t = type(node)
                if t is cst.Call:
                    func = node.func
                    if type(func) is cst.Attribute:
                        recv = func.value
                        method_name = func.attr.value
                        if method_name in _GENERIC_RELEASE or ex.is_exit_stack_method(method_name):
                            attr = _self_attr(recv, self_name)
                            if attr:
                                released.add(attr)
                            elif type(recv) is cst.Name and recv.value in aliases:
                                released.add(aliases[recv.value])
                    callee = _last_name(func)
                    if (
                        ex.is_release_helper(callee)
                        or ex.is_exit_stack_method(callee)
                        or ex.is_ownership_sink(callee)
                    ):
                        for arg in node.args:
                            attr = _self_attr(arg.value, self_name)
                            if attr:
                                released.add(attr)
                            elif type(arg.value) is cst.Name and arg.value.value in aliases:
                                released.add(aliases[arg.value.value])
                elif t is cst.WithItem:
                    item, _ = _unwrap_await(node.item)
                    attr = _self_attr(item, self_name)
                    if attr:
                        released.add(attr)
            if method.name in (
                "close",
                "aclose",
                "__aexit__",
                "__exit__",
                "shutdown",
                "dispose",
                "disconnect",
                "stop",
                "cleanup",
                "teardown",
                "__del__",
                "terminate",
            ):
                for node in _walk(method.node.body, into_scopes=True):
                    if type(node) is cst.Attribute:
                        attr = _self_attr(node, self_name)
                        if attr:
                            released.add(attr)
        for base in cls.bases:
            if base is not None and len(base) == 1 and base[0] in self.classes and depth < 5:
                released |= self._released_attrs(self.classes[base[0]], depth + 1)
        return released

    def _module_released_attrs(self) -> set[str]:
        """`await app.state.pool.close()` anywhere in the module releases attribute `pool`."""
        released: set[str] = set()
        for info in self.functions:
            for call in info.calls:
                func = call.func
                if type(func) is cst.Attribute and func.attr.value in _GENERIC_RELEASE:
                    recv = func.value
                    if type(recv) is cst.Attribute and not (
                        type(recv.value) is cst.Name and recv.value.value in ("self", "cls")
                    ):
                        released.add(recv.attr.value)
        return released


def _is_main_guard(test: cst.BaseExpression) -> bool:
    if type(test) is not cst.Comparison or len(test.comparisons) != 1:
        return False
    left = test.left
    right = test.comparisons[0].comparator
    names = {
        _last_name(left),
        getattr(right, "evaluated_value", None) if type(right) is cst.SimpleString else "",
    }
    return "__name__" in names and "__main__" in names


def _self_attr(expr: cst.BaseExpression, self_name: str) -> str:
    if (
        type(expr) is cst.Attribute
        and type(expr.value) is cst.Name
        and expr.value.value == self_name
    ):
        return expr.attr.value
    return ""


def _names_in(target: cst.CSTNode) -> list[str]:
    out: set[str] = set()
    ModuleAnalysis._bind_names(target, out)
    return list(out)


def _named_source(parts: list[str]) -> ResourceSpec | None:
    """`pool.acquire`, `self.db_pool.acquire`, `async_engine.connect` on a receiver of unknown
    type: its name says what it is (resources.NAMED_SOURCES)."""
    receiver = parts[-2].lower()
    for suffix, method, _product in NAMED_SOURCES:
        if parts[-1] == method and receiver.endswith(suffix):
            return _NAMED_CALLABLES[method]
    return None


_NAMED_METHODS = frozenset(method for _suffix, method, _product in NAMED_SOURCES)
_NAMED_CALLABLES = {
    method: callable_of(dataclasses.replace(product, awaited=True))
    for _suffix, method, product in NAMED_SOURCES
}
_NAMED_PRODUCTS = frozenset(id(spec.call) for spec in _NAMED_CALLABLES.values())


def _apply_attrs(spec: ResourceSpec, rest: list[str]) -> ResourceSpec | None:
    if not rest:
        return spec
    if len(rest) == 1:
        product = spec.product(rest[0])
        if product is not None:
            return callable_of(product)
    return None


# ------------------------------------------------------------------------------------------
# The per-function interpreter

OPEN, CLOSED, GONE, LOST = 1, 2, 3, 4
_MAX_PATHS = 48
_GIVE_UP = 400


class _GiveUp(Exception):
    """Too many paths: no verdict for this function rather than a guess."""


class Path:
    __slots__ = ("held", "status", "consts", "exc", "unused")

    def __init__(
        self,
        held: dict[str, int],
        status: dict[int, int],
        consts: dict[str, object],
        exc: bool = False,
        unused: set[int] | None = None,
    ):
        self.held = held
        self.status = status
        self.consts = consts
        self.exc = exc  # reached through an exception handler: a leak here is an error-path leak
        # Sessions not used yet on this path: a SQLAlchemy session takes a connection at its
        # first query, so an exception before that strands nothing.
        self.unused = unused if unused is not None else set()

    def copy(self) -> Path:
        return Path(
            dict(self.held), dict(self.status), dict(self.consts), self.exc, set(self.unused)
        )

    def key(self) -> tuple:
        return (
            tuple(sorted(self.held.items())),
            tuple(sorted(self.status.items())),
            tuple(sorted((k, repr(v)) for k, v in self.consts.items())),
            self.exc,
            tuple(sorted(self.unused)),
        )

    def open_any(self) -> bool:
        for value in self.status.values():
            if value == OPEN:
                return True
        return False


class Flow:
    __slots__ = ("normal", "ret", "exc", "brk", "cont")

    def __init__(self, normal: list[Path] | None = None) -> None:
        self.normal = normal if normal is not None else []
        self.ret: list[Path] = []
        self.exc: list[Path] = []
        self.brk: list[Path] = []
        self.cont: list[Path] = []

    def absorb(self, other: Flow, normal: bool = True) -> None:
        if normal:
            self.normal.extend(other.normal)
        self.ret.extend(other.ret)
        self.exc.extend(other.exc)
        self.brk.extend(other.brk)
        self.cont.extend(other.cont)


def _dedupe(paths: list[Path]) -> list[Path]:
    if len(paths) <= 1:
        return paths
    seen: dict[tuple, Path] = {}
    for path in paths:
        seen.setdefault(path.key(), path)
    out = list(seen.values())
    if len(out) > _GIVE_UP:
        raise _GiveUp
    return out


class Use:
    """How a value (a fresh resource or a name holding one) is used by its parent expression."""

    __slots__ = (
        "kind",
        "awaited",
        "method",
        "callee",
        "outer",
        "node",
        "targets",
        "cond",
        "is_async",
        "index",
        "keyword",
        "recv",
    )

    def __init__(
        self,
        kind: str,
        *,
        awaited: bool = False,
        method: str = "",
        callee: str = "",
        outer: Use | None = None,
        node: cst.CSTNode | None = None,
        targets: tuple = (),
        cond: bool = False,
        is_async: bool = False,
        index: int = -1,
        keyword: str = "",
        recv: cst.CSTNode | None = None,
    ) -> None:
        self.kind = kind
        self.awaited = awaited
        self.method = method
        self.callee = callee
        self.outer = outer
        self.node = node
        self.targets = targets
        self.cond = cond
        self.is_async = is_async
        self.index = index
        self.keyword = keyword
        self.recv = recv

    def with_await(self) -> Use:
        use = Use(
            self.kind,
            awaited=True,
            method=self.method,
            callee=self.callee,
            outer=self.outer,
            node=self.node,
            targets=self.targets,
            cond=self.cond,
            is_async=self.is_async,
            index=self.index,
            keyword=self.keyword,
            recv=self.recv,
        )
        return use

    def conditional(self) -> Use:
        use = (
            self.with_await()
            if self.awaited
            else Use(
                self.kind,
                method=self.method,
                callee=self.callee,
                outer=self.outer,
                node=self.node,
                targets=self.targets,
                is_async=self.is_async,
                index=self.index,
                keyword=self.keyword,
                recv=self.recv,
            )
        )
        use.cond = True
        return use


NEUTRAL = Use("neutral")
DISCARD = Use("discard")
RETURN = Use("return")
YIELD = Use("yield")
CONTAINER = Use("container")
CAPTURE = Use("capture")


# Session methods that only touch its in-memory state: none takes a connection.
_IN_MEMORY_METHODS = frozenset({"add", "add_all", "expunge", "expunge_all", "is_modified"})


def _may_connect(use: Use, spec: ResourceSpec) -> bool:
    """Whether this use of a session not used yet may make it take a connection. An
    AsyncSession queries only when awaited, here or by whoever it is lent to (yielded,
    returned, stored, captured): handing it to a wrapper or a closure factory that is not
    awaited (`repo = Repository(session)`) takes nothing."""
    if use.kind == "method" and use.method in _IN_MEMORY_METHODS:
        return False
    if spec.is_async:
        return use.awaited or use.kind not in ("arg", "bind", "method")
    return True


class FunctionAnalysis:
    def __init__(self, module: ModuleAnalysis, info: FunctionInfo) -> None:
        self.m = module
        self.info = info
        self.fates: dict[int, Fate] = {}
        self.rid_of: dict[int, int] = {}
        self.specs: dict[int, ResourceSpec] = {}
        self.events_cache: dict[int, tuple[list, bool]] = {}
        self.tracked: set[str] = set()
        self.created_in_handler: set[int] = set()
        # `s = A() if flag else B()`: each path makes one of the two, and what happens to `s`
        # happens to it; the earlier alternative (A) follows the fate of the one bound last.
        self.alternative_of: dict[int, int] = {}
        self.in_finally = 0
        self.expect_failure = 0  # inside `with pytest.raises(...)`: creations are meant to fail
        self.in_cleanup = 0  # inside finally/except: a second failure there is not our finding
        self.shielded = 0
        decorators = info.decorators
        if any(ex.is_fixture_decorator(d) for d in decorators):
            self.kind = "fixture"
        elif any(ex.is_generator_cm_decorator(d) for d in decorators):
            self.kind = "cm"
        elif info.name in module.depends:
            self.kind = "dependency"
        else:
            self.kind = "plain"

    # ---------------------------------------------------------------- setup

    def _track(self) -> None:
        """Names that may hold a resource: assigned from a creation, or from such a name."""
        tracked = self.tracked
        for _ in range(4):
            before = len(tracked)
            for target, value in self.info.assigns:
                names = _names_in(target)
                if not names:
                    continue
                if self._may_hold(value):
                    tracked.update(names)
            if len(tracked) == before:
                break

    def _may_hold(self, value: cst.BaseExpression) -> bool:
        for node in _walk(value):
            t = type(node)
            if t is cst.Call:
                if self.m._creation_spec(node, self.info) is not None:
                    return True
            elif t is cst.Name and node.value in self.tracked:
                return True
        return False

    def _relevant_names(self) -> set[str]:
        """Names worth remembering facts about: tested more than once, or copied/flag-assigned.
        Remembering every tested name multiplies paths without changing any verdict."""
        counts: dict[str, int] = {}
        for node in _walk(self.info.node.body):
            t = type(node)
            if t is cst.If or t is cst.While or t is cst.IfExp:
                for inner in _walk(node.test):
                    if type(inner) is cst.Name:
                        counts[inner.value] = counts.get(inner.value, 0) + 1
        relevant = {name for name, n in counts.items() if n > 1}
        for target, value in self.info.assigns:
            if type(target) is cst.Name and type(value) in (
                cst.Name,
                cst.Comparison,
                cst.UnaryOperation,
            ):
                relevant.add(target.value)
                if type(value) is cst.Name:
                    relevant.add(value.value)
        return relevant | self.tracked

    def run(self) -> None:
        self._track()
        self.relevant = self._relevant_names()
        start = Path({}, {}, {})
        flow = self.exec_block(self.info.node.body, [start])
        for path in flow.normal + flow.ret:
            for rid, status in path.status.items():
                if status == OPEN and path.exc and rid not in self.created_in_handler:
                    if rid not in path.unused:
                        self.fates[rid].leak_exception = True
                elif status == OPEN:
                    fate = self.fates[rid]
                    fate.leak_normal = True
                    if not fate.reason:
                        fate.reason = (
                            "not closed on every path" if fate.released else "never closed"
                        )
        for path in flow.exc:
            for rid, status in path.status.items():
                if status == OPEN and rid not in path.unused:
                    self.fates[rid].leak_exception = True
        for earlier, later in self.alternative_of.items():
            self._share_fate(self.fates[earlier], self.fates[later])
        for fate in self.fates.values():
            if fate.conditional and fate.released:
                # `db or AsyncSessionLocal()` closed under `if db is None`: the condition that
                # created it guards the close; we do not track that correlation, so trust it.
                fate.leak_normal = fate.leak_exception = False
            if fate.spec.scoped and not fate.released and not fate.unawaited:
                # A scoped session is cleaned up by registry.remove() wherever the app
                # tears down its scope; only a function that removes it itself is judged.
                continue
            self.m.fates.append(fate)

    @staticmethod
    def _share_fate(earlier: Fate, later: Fate) -> None:
        for name in ("leak_normal", "leak_exception", "released", "escaped", "sync_with"):
            setattr(earlier, name, getattr(earlier, name) or getattr(later, name))
        earlier.reason = earlier.reason or later.reason
        # One of them is made on every path, as by a plain call: no benefit of the doubt that a
        # close under a condition gets when `db or F()` may have made nothing.
        earlier.conditional = later.conditional = False
        earlier.unawaited = earlier.unawaited or later.unawaited
        earlier.mistaken = earlier.mistaken or later.mistaken

    # ---------------------------------------------------------------- resources

    def _rid(self, node: cst.CSTNode, spec: ResourceSpec, use: Use | None = None) -> int:
        key = id(node)
        rid = self.rid_of.get(key)
        if rid is None:
            rid = len(self.rid_of) + 1
            self.rid_of[key] = rid
            self.specs[rid] = spec
            self.fates[rid] = Fate(
                spec,
                node,
                "function",
                self.info.name,
                conditional=bool(use and use.cond),
                in_async=self.info.is_async,
            )
        return rid

    def _release(self, path: Path, rid: int) -> None:
        if path.status.get(rid) == OPEN:
            path.status[rid] = CLOSED
        self.fates[rid].released = True

    def _escape(self, path: Path, rid: int) -> None:
        if path.status.get(rid) == OPEN:
            path.status[rid] = GONE
        self.fates[rid].escaped = True

    def _unbind(self, path: Path, name: str, overwritten: bool = True) -> None:
        rid = path.held.pop(name, None)
        if rid is None:
            return
        if path.status.get(rid) != OPEN:
            return
        for other in path.held.values():
            if other == rid:
                return
        path.status[rid] = LOST
        fate = self.fates[rid]
        fate.leak_normal = True
        if not fate.reason:
            fate.reason = (
                "overwritten before it is closed" if overwritten else "deleted without being closed"
            )

    # ---------------------------------------------------------------- events

    def events(self, stmt: cst.CSTNode) -> tuple[list, bool]:
        cached = self.events_cache.get(id(stmt))
        if cached is not None:
            return cached
        self._ev: list = []
        self._raises = False
        t = type(stmt)
        if t is cst.Expr:
            self.value(stmt.value, DISCARD)
        elif t is cst.Assign or t is cst.AnnAssign:
            value = stmt.value
            if value is not None:
                targets = [tt.target for tt in stmt.targets] if t is cst.Assign else [stmt.target]
                self._assign(targets, value)
            else:
                self.neutral(stmt.annotation)
        elif t is cst.AugAssign:
            self.neutral(stmt.value)
        elif t is cst.Return:
            if stmt.value is not None:
                self.value(stmt.value, RETURN)
        elif t is cst.Raise:
            self._raises = True
            if stmt.exc is not None:
                self.neutral(stmt.exc)
        elif t is cst.Del:
            names = _names_in(stmt.target)
            for name in names:
                self._ev.append(("del", name))
        elif t is cst.Assert:
            self._raises = True
            self.neutral(stmt.test)
        else:
            for child in _children(stmt):
                self.neutral(child)
        result = (self._ev, self._raises)
        self.events_cache[id(stmt)] = result
        return result

    def _assign(self, targets: list[cst.BaseExpression], value: cst.BaseExpression) -> None:
        names: list[str] = []
        stores: list[cst.BaseExpression] = []
        pairwise = False
        if (
            len(targets) == 1
            and type(targets[0]) in (cst.Tuple, cst.List)
            and type(value) in (cst.Tuple, cst.List)
        ):
            tel = targets[0].elements
            vel = value.elements
            if len(tel) == len(vel) and not any(
                type(e) is cst.StarredElement for e in (*tel, *vel)
            ):
                pairwise = True
                for target_el, value_el in zip(tel, vel, strict=True):
                    self._assign([target_el.value], value_el.value)
                return
        for target in targets:
            tt = type(target)
            if tt is cst.Name:
                names.append(target.value)
            elif tt is cst.Attribute or tt is cst.Subscript:
                stores.append(target)
                self.neutral(target.value)
            else:
                names.extend(_names_in(target))
                stores.append(target)  # unpacking into several names: ownership unclear
        if not pairwise:
            if stores and not names:
                self.value(value, Use("store", targets=tuple(stores)))
            elif stores:
                self.value(value, Use("container"))
            else:
                self.value(value, Use("bind", targets=tuple(names)))
        self._ev.append(("assign", tuple(names), value))

    def neutral(self, node: cst.CSTNode) -> None:
        self.value(node, NEUTRAL)

    def value(self, node: cst.CSTNode, use: Use) -> None:
        t = type(node)
        if t is cst.Name:
            if node.value in self.tracked and use.kind not in ("neutral", "discard"):
                self._ev.append(("name", node.value, use))
            return
        if t is cst.Await:
            self._raises = True
            self.value(node.expression, use.with_await())
            return
        if t is cst.Call:
            self._call(node, use)
            return
        if t is cst.BooleanOperation:
            self.value(node.left, use.conditional() if use.kind != "neutral" else use)
            self.value(node.right, use.conditional() if use.kind != "neutral" else use)
            return
        if t is cst.IfExp:
            self.neutral(node.test)
            self.value(node.body, use.conditional() if use.kind != "neutral" else use)
            self.value(node.orelse, use.conditional() if use.kind != "neutral" else use)
            return
        if t is cst.NamedExpr:
            names = _names_in(node.target)
            self.value(node.value, Use("bind", targets=tuple(names)))
            self._ev.append(("assign", tuple(names), node.value))
            return
        if t is cst.List or t is cst.Tuple or t is cst.Set:
            for el in node.elements:
                self.value(el.value, CONTAINER)
            return
        if t is cst.Dict:
            for el in node.elements:
                if type(el) is cst.DictElement:
                    self.neutral(el.key)
                self.value(el.value, CONTAINER)
            return
        if t is cst.ListComp or t is cst.SetComp or t is cst.GeneratorExp:
            self.value(node.elt, CONTAINER)
            self.neutral(node.for_in)
            return
        if t is cst.DictComp:
            self.neutral(node.key)
            self.value(node.value, CONTAINER)
            self.neutral(node.for_in)
            return
        if t is cst.Lambda or t is cst.FunctionDef or t is cst.ClassDef:
            for inner in _walk(node, into_scopes=True):
                if type(inner) is cst.Name and inner.value in self.tracked:
                    self._ev.append(("name", inner.value, CAPTURE))
            return
        if t is cst.Yield:
            self._raises = self._raises or self.kind != "fixture"
            if node.value is not None:
                if type(node.value) is cst.From:
                    self.neutral(node.value.item)
                else:
                    self.value(node.value, YIELD)
            return
        if t is cst.Attribute:
            recv = node.value
            if use.kind == "arg" and type(recv) is cst.Name and recv.value in self.tracked:
                # stack.push_async_callback(s.close) / stack.callback(conn.close)
                self._ev.append(("name", recv.value, Use("callback", method=node.attr.value)))
                return
            self.neutral(recv)
            return
        if t is cst.Subscript:
            self.neutral(node.value)
            for el in node.slice:
                self.neutral(el)
            return
        if t is cst.StarredElement:
            self.value(node.value, CONTAINER)
            return
        for child in _children(node):
            self.value(child, NEUTRAL)

    def _call(self, call: cst.Call, use: Use) -> None:
        func = call.func
        spec = self.m._creation_spec(call, self.info)
        if spec is None and not _harmless(call) and self._touches_tracked(call):
            # Error paths worth a finding: every await (a cancellation point, see `value`) and
            # every call on or with the resource itself. A plain sync call that does not touch
            # it (a metric, a log line, a parse) is not where anyone expects the close to be
            # skipped, and constructing another session does no I/O.
            self._raises = True
        if spec is not None and use.kind == "discard" and id(spec) in _NAMED_PRODUCTS:
            # `await self._pool.acquire()` as a statement is a semaphore's idiom, not a pool's
            spec = None
        if spec is not None and (use.awaited or not spec.awaited or use.kind == "with"):
            self._ev.append(("create", call, spec, use))
            for arg in call.args:
                self.neutral(arg.value)
            return
        if spec is not None:
            # An awaitable factory used without await (passed on as a coroutine): not created here.
            for arg in call.args:
                self.neutral(arg.value)
            return
        callee = ""
        method = ""
        if type(func) is cst.Attribute:
            method = func.attr.value
            recv = func.value
            # `pool.terminate()`: every connection that pool handed out ends here
            teardown = ex.is_pool_teardown(method) and not call.args
            if type(recv) is cst.Name and recv.value in self.tracked:
                self._ev.append(
                    (
                        "name",
                        recv.value,
                        Use("method", method=method, awaited=use.awaited, outer=use, node=call),
                    )
                )
                if teardown:
                    self._ev.append(("pool-teardown", recv.value))
            elif type(recv) is cst.Name:
                binding = self.m.callee_binding(recv, self.info)
                if (
                    binding is not None
                    and binding.call is not None
                    and binding.call.scoped
                    and method in ("remove", "close")
                ):
                    self._ev.append(("registry", method))
                elif teardown:
                    self._ev.append(("pool-teardown", ""))
            else:
                if teardown:
                    self._ev.append(("pool-teardown", ""))
                self.value(
                    recv, Use("method", method=method, awaited=use.awaited, outer=use, node=call)
                )
            callee = method
        else:
            callee = _last_name(func)
            if type(func) is not cst.Name:
                self.neutral(func)
            if callee == "anext" and call.args:
                inner = call.args[0].value
                if type(inner) is cst.Call and self.m.resource_generator(inner.func) is not None:
                    self._ev.append(("gen", inner))
        if ex.is_release_all(callee) and not call.args:
            self._ev.append(("release-all", callee))
        if (
            callee in ("wait_for", "shield")
            and use.awaited
            and call.args
            and call.args[0].keyword is None
        ):
            # `conn = await asyncio.wait_for(asyncpg.connect(dsn), 10)`: the awaited result is
            # the connection itself.
            self.value(call.args[0].value, use)
            for arg in call.args[1:]:
                self.neutral(arg.value)
            return
        index = 0
        for arg in call.args:
            keyword = arg.keyword.value if arg.keyword is not None else ""
            self.value(
                arg.value,
                Use(
                    "arg",
                    callee=callee,
                    method=method,
                    awaited=use.awaited,
                    outer=use,
                    node=call,
                    index=index,
                    keyword=keyword,
                ),
            )
            if arg.keyword is None and not arg.star:
                index += 1

    def _touches_tracked(self, call: cst.Call) -> bool:
        tracked = self.tracked
        if not tracked:
            return False
        parts = dotted(call.func)
        if parts is not None and parts[0] in tracked:
            return True
        for arg in call.args:
            value = arg.value
            if type(value) is cst.Name:
                if value.value in tracked:
                    return True
            elif type(value) is not cst.SimpleString and type(value) is not cst.Integer:
                for node in _walk(value):
                    if type(node) is cst.Name and node.value in tracked:
                        return True
        return False

    # ---------------------------------------------------------------- deciding a use

    def decide(self, use: Use, spec: ResourceSpec, fresh: bool) -> tuple[str, object]:
        """Map a use to an action: bind, store, release, escape, leak, unawaited, mistaken,
        return, yield, use, managed, sync-with."""
        kind = use.kind
        if kind == "bind":
            return "bind", use.targets
        if kind == "store":
            return "store", use.targets
        if kind == "return":
            return "return", None
        if kind == "yield":
            return "yield", None
        if kind == "discard":
            return ("leak", "dropped without being closed") if fresh else ("use", None)
        if kind in ("container", "capture"):
            return "escape", None
        if kind == "neutral":
            return ("escape", None) if fresh else ("use", None)
        if kind == "callback":
            if use.method in spec.release_methods or use.method in ("__aexit__", "__exit__"):
                return "release", None
            return "escape", None
        if kind == "with":
            if not use.is_async and spec.is_async and spec.async_cm and not spec.sync_cm:
                return "sync-with", None
            return "managed", None
        if kind == "method":
            return self._decide_method(use, spec, fresh)
        if kind == "arg":
            return self._decide_arg(use, spec, fresh)
        return "use", None

    def _decide_method(self, use: Use, spec: ResourceSpec, fresh: bool) -> tuple[str, object]:
        method = use.method
        outer = use.outer
        if method in spec.release_async:
            if use.awaited or (
                outer is not None and outer.kind in ("arg", "bind", "return", "container", "store")
            ):
                return "release", None
            return "unawaited", use.node
        if method in spec.release_sync or method in ("__aexit__", "__exit__"):
            return "release", None
        if not spec.release_async and not spec.release_sync and method in ("close", "aclose"):
            return "release", None
        if outer is not None and outer.kind == "with":
            if method in spec.mistaken_release:
                # Also `async with AsyncSessionLocal().begin():` (not the maker's own .begin()):
                # the block ends the transaction, and nothing closes the session.
                return "mistaken", method
            if fresh:
                # `with eng.connect().execution_options(...) as conn:`: such methods return the
                # resource itself (or a wrapper the with statement closes).
                return "managed", None
            return "use", None
        if method in spec.mistaken_release:
            if fresh:
                return "leak", f'used inline by "{method}()" and never closed'
            return "mistaken", method
        if fresh:
            if (
                not use.awaited
                and outer is not None
                and outer.kind in ("bind", "return", "store", "container", "arg", "neutral")
            ):
                return "escape", None  # the call's result may keep it (a Query, a wrapper)
            return "leak", f'used inline by "{method}()" and never closed'
        return "use", None

    def _decide_arg(self, use: Use, spec: ResourceSpec, fresh: bool) -> tuple[str, object]:
        callee = use.callee
        method = use.method
        if method:
            if ex.is_exit_stack_method(method):
                return "escape", None
            if method in spec.release_on_source:
                return "release", None
            if ex.is_container_method(method):
                return "escape", None
        if ex.is_ownership_sink(callee):
            return "escape", None
        summary = self._summary_for(use)
        if summary == "closes":
            return "release", None
        if summary == "escapes":
            return "escape", None
        if ex.is_release_helper(callee):
            return "release", None
        outer = use.outer
        if not method and type(use.node) is cst.Call and outer is not None and outer.kind == "bind":
            made = self.m.callee_binding(use.node.func, self.info)
            if made is not None and made.call is not None and made.call.kind == "maker":
                # `maker = async_sessionmaker(engine)`: the maker uses the engine but never
                # disposes it; follow the maker as an alias of the engine.
                return "bind", outer.targets
            # `repo = Repository(session)`: the wrapper holds it; follow the wrapper as an alias
            # (returning, storing or closing the wrapper settles the resource too).
            if outer is not None and outer.kind == "bind" and not use.awaited and outer.targets:
                return "bind", outer.targets
            return "escape", None
        if (
            outer is not None
            and outer.kind == "arg"
            and (ex.is_ownership_sink(outer.callee) or ex.is_exit_stack_method(outer.method))
        ):
            return "escape", None
        result_kept = outer is not None and outer.kind in (
            "bind",
            "return",
            "store",
            "container",
            "arg",
            "with",
            "yield",
        )
        if summary == "uses":
            if fresh:
                return "leak", f'passed to "{callee}()", which does not close it'
            return "use", None
        if not use.awaited and result_kept:
            return "escape", None
        if fresh:
            if use.awaited or (outer is not None and outer.kind == "discard"):
                return "leak", f'passed to "{callee}()" and never closed'
            return "escape", None
        return "use", None

    def _summary_for(self, use: Use) -> str:
        """What a same-file callee does with the parameter this value is passed as."""
        call = use.node
        if type(call) is not cst.Call:
            return ""
        func = call.func
        target: FunctionInfo | None = None
        if type(func) is cst.Name:
            target = self.m.module_functions.get(func.value)
        elif (
            type(func) is cst.Attribute
            and type(func.value) is cst.Name
            and self.info.cls is not None
            and func.value.value == self.info.self_name
        ):
            target = self.info.cls.methods.get(func.attr.value)
        if target is None:
            return ""
        params = (
            target.params[1:] if target.self_name and type(func) is cst.Attribute else target.params
        )
        if use.keyword:
            name = use.keyword if use.keyword in params else ""
        else:
            name = params[use.index] if 0 <= use.index < len(params) else ""
        if not name:
            return ""
        return _param_summary(self.m, target, name)

    # ---------------------------------------------------------------- applying events

    def apply(self, path: Path, events: list, exc_mode: bool = False) -> Path | None:
        """Apply a statement's events to one path. In exc_mode (the state an exception in this
        statement leaves behind) only releases and escapes count; nothing is created or bound."""
        bound: dict[str, int] = {}
        for event in events:
            tag = event[0]
            if tag == "create":
                if exc_mode:
                    continue
                _, node, spec, use = event
                self._apply_create(path, node, spec, use, bound)
            elif tag == "name":
                _, name, use = event
                rid = path.held.get(name)
                if rid is None:
                    continue
                self._apply_name(path, name, rid, use, bound, exc_mode)
            elif tag == "assign":
                if exc_mode:
                    continue
                _, names, value = event
                for name in names:
                    if name in self.info.globals:
                        rid = bound.get(name)
                        if rid is not None:
                            self._escape(path, rid)
                        continue
                    new = bound.get(name)
                    old = path.held.get(name)
                    if old is not None and old != new:
                        self._unbind(path, name)
                    if new is not None:
                        path.held[name] = new
                    self._set_const(path, name, value)
            elif tag == "del":
                if exc_mode:
                    continue
                self._unbind(path, event[1], overwritten=False)
            elif tag == "release-all":
                for rid, status in list(path.status.items()):
                    if status == OPEN and self.specs[rid].kind == "session":
                        self._release(path, rid)
            elif tag == "registry":
                for rid, status in list(path.status.items()):
                    if status == OPEN and self.specs[rid].scoped:
                        self._release(path, rid)
            elif tag == "pool-teardown":
                held = path.held.get(event[1], -1)
                if held >= 0 and self.specs[held].kind != "pool":
                    continue  # `conn.terminate()` ends that connection only
                for rid, status in list(path.status.items()):
                    if status == OPEN and "release" in self.specs[rid].release_on_source:
                        self._release(path, rid)
            elif tag == "gen":
                if exc_mode:
                    continue
                node = event[1]
                info = self.m.resource_generator(node.func)
                spec = None
                if info is not None:
                    for call in info.calls:
                        spec = self.m._creation_spec(call, info)
                        if spec is not None:
                            break
                if spec is not None:
                    rid = self._rid(node, spec)
                    fate = self.fates[rid]
                    fate.leak_normal = True
                    fate.reason = (
                        f'yielded by the generator "{info.name}()", which is never finished, '
                        "so its cleanup never runs"
                    )
                    fate.advice = (
                        'keep the generator and finish it ("await gen.aclose()"), or make it '
                        'an @asynccontextmanager and use "async with"'
                    )
        return path

    def _set_const(self, path: Path, name: str, value: cst.BaseExpression) -> None:
        t = type(value)
        if t is cst.Name and value.value in ("True", "False", "None"):
            path.consts[name] = {"True": True, "False": False, "None": None}[value.value]
            return
        if t in (cst.Comparison, cst.UnaryOperation, cst.BooleanOperation):
            verdict = self.truth(path, value)
            if verdict is not None:
                path.consts[name] = verdict
                return
        path.consts.pop("~" + name, None)
        if name in path.held:
            path.consts.pop(name, None)
            return
        path.consts.pop(name, None)
        if t is cst.Name and value.value not in path.held:
            # `db_session = db`: a later `if db is None` says the same about db_session
            path.consts["~" + name] = value.value
            if value.value in path.consts:
                path.consts[name] = path.consts[value.value]
            return
        if t in (
            cst.Integer,
            cst.SimpleString,
            cst.Call,
            cst.Attribute,
            cst.Await,
            cst.List,
            cst.Dict,
        ):
            if t is not cst.Call and t is not cst.Attribute and t is not cst.Await:
                path.consts[name] = "notnone"

    def _apply_create(
        self, path: Path, node: cst.CSTNode, spec: ResourceSpec, use: Use, bound: dict[str, int]
    ) -> None:
        if self.expect_failure:
            return
        if spec.kind == "session" and _bound_to_connection(node):
            return  # joins an outer connection's transaction; that connection holds the resource
        rid = self._rid(node, spec, use)
        fate = self.fates[rid]
        if path.status.get(rid) == OPEN:
            # Created again while the previous one is still open (a loop, a retry).
            fate.leak_normal = True
            if not fate.reason:
                fate.reason = "created again before the previous one is closed"
        action, extra = self.decide(use, spec, True)
        if path.exc:
            self.created_in_handler.add(rid)
        if action == "bind":
            path.status[rid] = OPEN
            if spec.kind == "session":
                path.unused.add(rid)
            for name in extra:
                earlier = bound.get(name)
                if use.cond and earlier is not None and earlier != rid:
                    path.status[earlier] = GONE
                    self.alternative_of[earlier] = rid
                bound[name] = rid
            if len(extra) == 1 and not fate.var:
                fate.var = next(iter(extra))  # the advice then names the user's own variable
            if not extra:
                path.status[rid] = GONE
        elif action == "store":
            self._store(path, rid, extra)
        elif action == "return":
            self._return(path, rid)
        elif action == "yield":
            if self.kind in ("cm", "dependency", "fixture"):
                fate.leak_normal = True
                fate.reason = fate.reason or "yielded but never closed"
            fate.escaped = True
        elif action == "release":
            fate.released = True
        elif action == "unawaited":
            fate.unawaited = extra
            fate.leak_normal = True
            fate.reason = fate.reason or "never closed"
        elif action == "leak":
            fate.leak_normal = True
            fate.reason = fate.reason or extra
        elif action == "mistaken":  # made only to enter its transaction
            fate.leak_normal = True
            fate.mistaken = fate.mistaken or extra
        elif action == "sync-with":
            fate.sync_with = True
            fate.released = True
        elif action == "managed":
            fate.released = True
        else:
            fate.escaped = True

    def _apply_name(
        self, path: Path, name: str, rid: int, use: Use, bound: dict[str, int], exc_mode: bool
    ) -> None:
        spec = self.specs[rid]
        fate = self.fates[rid]
        if rid in path.unused and _may_connect(use, spec):
            path.unused.discard(rid)
        action, extra = self.decide(use, spec, False)
        if action == "bind":
            if not exc_mode:
                for target in extra:
                    bound[target] = rid
        elif action == "store":
            self._store(path, rid, extra)
        elif action == "return":
            self._return(path, rid)
        elif action == "yield":
            if self.kind in ("cm", "dependency", "fixture") or name in self.info.released_names:
                return  # lent to the caller; the generator still owns it
            self._escape(path, rid)
        elif action == "release":
            self._release(path, rid)
            if self.in_finally and self.m.uses_trio and not self.shielded and use.awaited:
                fate.unshielded = fate.unshielded or use.node
        elif action == "unawaited":
            fate.unawaited = fate.unawaited or extra
        elif action == "mistaken":
            fate.mistaken = fate.mistaken or extra
        elif action in ("escape", "managed"):
            self._escape(path, rid)
        elif action == "sync-with":
            fate.sync_with = True
            self._escape(path, rid)

    def _store(self, path: Path, rid: int, targets: tuple) -> None:
        fate = self.fates[rid]
        self._escape(path, rid)
        path.status[rid] = GONE
        for target in targets:
            attr = _self_attr(target, self.info.self_name) if self.info.self_name else ""
            if attr and self.info.cls is not None and self.info.outer is None:
                if ex.is_memoized_getter(self.info.returns, self.info.self_name, attr):
                    continue
                fate.stored_attr = attr
                fate.owner_class = self.info.cls.name

    def _return(self, path: Path, rid: int) -> None:
        fate = self.fates[rid]
        spec = self.specs[rid]
        self._escape(path, rid)
        if self.info.is_generator or spec.kind not in ("session", "connection"):
            return
        if self.kind == "dependency":
            fate.returned_by = "FastAPI dependency"
        elif self.kind == "fixture":
            fate.returned_by = "pytest fixture"

    # ---------------------------------------------------------------- conditions

    def truth(self, path: Path, test: cst.BaseExpression) -> bool | None:
        t = type(test)
        if t is cst.Name:
            name = test.value
            if name in ("True", "False", "None"):
                return name == "True"
            if name in path.held:
                return True
            value = path.consts.get(name, "?")
            if value == "?" or value == "notnone":
                return None
            return bool(value)
        if t is cst.UnaryOperation and type(test.operator) is cst.Not:
            inner = self.truth(path, test.expression)
            return None if inner is None else not inner
        if t is cst.Comparison and len(test.comparisons) == 1:
            target = test.comparisons[0]
            op = type(target.operator)
            if (
                type(target.comparator) is cst.Name
                and target.comparator.value == "None"
                and op in (cst.Is, cst.IsNot, cst.Equal, cst.NotEqual)
            ):
                is_none = self._is_none(path, test.left)
                if is_none is None:
                    return None
                return is_none if op in (cst.Is, cst.Equal) else not is_none
            return None
        if t is cst.BooleanOperation:
            left = self.truth(path, test.left)
            right = self.truth(path, test.right)
            if type(test.operator) is cst.And:
                if left is False or right is False:
                    return False
                if left is True and right is True:
                    return True
                return None
            if left is True or right is True:
                return True
            if left is False and right is False:
                return False
            return None
        return None

    def _is_none(self, path: Path, expr: cst.BaseExpression) -> bool | None:
        if type(expr) is not cst.Name:
            return None
        name = expr.value
        if name in path.held:
            return False
        if name in path.consts:
            value = path.consts[name]
            if value is None:
                return True
            return False
        if name in self.tracked and name not in self.info.params:
            # A tracked local that holds no resource on this path: never assigned (unbound)
            # or assigned something we do not follow; treat as unknown.
            return None
        return None

    def refine(self, path: Path, test: cst.BaseExpression, outcome: bool) -> Path | None:
        """The path under the assumption `bool(test) == outcome`; None when impossible."""
        t = type(test)
        if t is cst.Name:
            name = test.value
            if name in path.held:
                return path if outcome else None
            if name not in ("True", "False", "None") and name in self.relevant:
                path.consts[name] = (
                    outcome if outcome is False else path.consts.get(name, True) or True
                )
                if outcome is False:
                    path.consts[name] = False
                self._same(path, name)
            return path
        if t is cst.UnaryOperation and type(test.operator) is cst.Not:
            return self.refine(path, test.expression, not outcome)
        if t is cst.Comparison and len(test.comparisons) == 1:
            target = test.comparisons[0]
            op = type(target.operator)
            if (
                type(target.comparator) is cst.Name
                and target.comparator.value == "None"
                and type(test.left) is cst.Name
            ):
                if op in (cst.Is, cst.Equal):
                    is_none = outcome
                elif op in (cst.IsNot, cst.NotEqual):
                    is_none = not outcome
                else:
                    return path
                name = test.left.value
                if name in path.held:
                    return None if is_none else path
                if name in self.relevant:
                    path.consts[name] = None if is_none else "notnone"
                    self._same(path, name)
            return path
        if t is cst.BooleanOperation:
            is_and = type(test.operator) is cst.And
            if is_and and outcome:
                first = self.refine(path, test.left, True)
                return None if first is None else self.refine(first, test.right, True)
            if not is_and and not outcome:
                first = self.refine(path, test.left, False)
                return None if first is None else self.refine(first, test.right, False)
        return path

    @staticmethod
    def _same(path: Path, name: str) -> None:
        """Carry a fact about `name` over to the names it was copied from and to."""
        value = path.consts[name]
        source = path.consts.get("~" + name)
        if isinstance(source, str) and source not in path.held:
            path.consts[source] = value
        for key, other in list(path.consts.items()):
            if key.startswith("~") and other == name and key[1:] not in path.held:
                path.consts[key[1:]] = value

    def branch(self, paths: list[Path], test: cst.BaseExpression) -> tuple[list[Path], list[Path]]:
        yes: list[Path] = []
        no: list[Path] = []
        for path in paths:
            verdict = self.truth(path, test)
            if verdict is True:
                yes.append(path)
            elif verdict is False:
                no.append(path)
            else:
                a = self.refine(path.copy(), test, True)
                b = self.refine(path.copy(), test, False)
                if a is not None:
                    yes.append(a)
                if b is not None:
                    no.append(b)
        return yes, no

    # ---------------------------------------------------------------- statements

    def exec_block(self, suite: cst.CSTNode, paths: list[Path]) -> Flow:
        flow = Flow()
        current = paths
        for stmt in _stmts(suite):
            if not current:
                break
            step = self.exec_stmt(stmt, current)
            flow.absorb(step, normal=False)
            current = _dedupe(step.normal)
            if len(current) > _MAX_PATHS:
                current = self._merge(current)
        flow.normal = current
        return flow

    @staticmethod
    def _merge(paths: list[Path]) -> list[Path]:
        # Keep the paths whose resource states differ; forget constant facts first.
        for path in paths:
            path.consts.clear()
        return _dedupe(paths)

    def simple(self, stmt: cst.CSTNode, paths: list[Path]) -> Flow:
        events, raises = self.events(stmt)
        flow = Flow()
        if raises and not self.in_cleanup:
            for path in paths:
                if path.open_any():
                    flow.exc.append(self.apply(path.copy(), events, exc_mode=True))
        out = []
        for path in paths:
            new = self.apply(path.copy() if events else path, events)
            if new is not None:
                out.append(new)
        t = type(stmt)
        if t is cst.Return:
            flow.ret = out
        elif t is cst.Raise:
            flow.exc.extend(out)
        elif t is cst.Break:
            flow.brk = out
        elif t is cst.Continue:
            flow.cont = out
        else:
            flow.normal = out
        return flow

    def exec_stmt(self, stmt: cst.CSTNode, paths: list[Path]) -> Flow:
        t = type(stmt)
        if t is cst.If:
            return self._if(stmt, paths)
        if t is cst.Try or t is cst.TryStar:
            return self._try(stmt, paths)
        if t is cst.For or t is cst.While:
            return self._loop(stmt, paths)
        if t is cst.With:
            return self._with(stmt, paths)
        if t is cst.Match:
            return self._match(stmt, paths)
        if t is cst.FunctionDef or t is cst.ClassDef:
            return self._nested(stmt, paths)
        if (
            t is cst.Global
            or t is cst.Nonlocal
            or t is cst.Pass
            or t is cst.Import
            or t is cst.ImportFrom
        ):
            return Flow(paths)
        return self.simple(stmt, paths)

    def _nested(self, stmt: cst.CSTNode, paths: list[Path]) -> Flow:
        key = id(stmt)
        if key not in self.events_cache:
            captured = [
                n.value
                for n in _walk(stmt, into_scopes=True)
                if type(n) is cst.Name and n.value in self.tracked
            ]
            self.events_cache[key] = ([("name", n, CAPTURE) for n in captured], False)
        events, _ = self.events_cache[key]
        return Flow([self.apply(p.copy(), events) for p in paths] if events else paths)

    def _test_events(self, test: cst.BaseExpression, paths: list[Path], flow: Flow) -> list[Path]:
        key = id(test)
        cached = self.events_cache.get(key)
        if cached is None:
            self._ev = []
            self._raises = False
            self.neutral(test)
            cached = (self._ev, self._raises)
            self.events_cache[key] = cached
        events, raises = cached
        if raises and not self.in_cleanup:
            for path in paths:
                if path.open_any():
                    flow.exc.append(self.apply(path.copy(), events, exc_mode=True))
        if not events:
            return paths
        return [self.apply(p.copy(), events) for p in paths]

    def _if(self, stmt: cst.If, paths: list[Path]) -> Flow:
        flow = Flow()
        paths = self._test_events(stmt.test, paths, flow)
        yes, no = self.branch(paths, stmt.test)
        body = self.exec_block(stmt.body, yes) if yes else Flow()
        flow.absorb(body)
        orelse = stmt.orelse
        if orelse is None:
            flow.normal.extend(no)
        elif type(orelse) is cst.If:
            flow.absorb(self._if(orelse, no) if no else Flow())
        else:
            flow.absorb(self.exec_block(orelse.body, no) if no else Flow())
        return flow

    def _match(self, stmt: cst.Match, paths: list[Path]) -> Flow:
        flow = Flow()
        paths = self._test_events(stmt.subject, paths, flow)
        for case in stmt.cases:
            flow.absorb(self.exec_block(case.body, [p.copy() for p in paths]))
        flow.normal.extend(paths)
        return flow

    def _try(self, stmt: cst.Try, paths: list[Path]) -> Flow:
        body = self.exec_block(stmt.body, paths)
        flow = Flow()
        flow.ret.extend(body.ret)
        flow.brk.extend(body.brk)
        flow.cont.extend(body.cont)
        exc_in = _dedupe(body.exc)
        synthetic = False
        if not exc_in and stmt.handlers:
            # No open resource at any raising point: the handlers still run, from a state
            # like the one the try started with (what they create is theirs to release).
            # Resources already open are not judged on these guessed paths.
            exc_in = [p.copy() for p in paths]
            for p in exc_in:
                for rid, status in p.status.items():
                    if status == OPEN:
                        p.status[rid] = GONE
            synthetic = True
        caught_all = False
        for handler in stmt.handlers:
            if exc_in:
                start = [p.copy() for p in exc_in]
                for p in start:
                    p.exc = True
                if handler.name is not None and type(handler.name.name) is cst.Name:
                    for p in start:
                        p.held.pop(handler.name.name.value, None)
                self.in_cleanup += 1
                try:
                    result = self.exec_block(handler.body, start)
                finally:
                    self.in_cleanup -= 1
                flow.absorb(result)
                if ex.is_catch_all_handler(handler) and (
                    ex.catches_cancellation(handler) or _releases(start, result)
                ):
                    caught_all = True
        if not caught_all and not synthetic:  # (with nothing in, nothing goes on either)
            flow.exc.extend(exc_in)
        if stmt.orelse is not None:
            flow.absorb(self.exec_block(stmt.orelse.body, body.normal) if body.normal else Flow())
        else:
            flow.normal.extend(body.normal)
        if stmt.finalbody is None:
            return flow
        out = Flow()
        self.in_finally += 1
        self.in_cleanup += 1
        try:
            for bucket in ("normal", "ret", "exc", "brk", "cont"):
                items = _dedupe(getattr(flow, bucket))
                if not items:
                    continue
                result = self.exec_block(stmt.finalbody.body, items)
                getattr(out, bucket).extend(result.normal)
                out.ret.extend(result.ret)
                out.exc.extend(result.exc)
                out.brk.extend(result.brk)
                out.cont.extend(result.cont)
        finally:
            self.in_finally -= 1
            self.in_cleanup -= 1
        return out

    def _loop(self, stmt: cst.For | cst.While, paths: list[Path]) -> Flow:
        flow = Flow()
        infinite = False
        if type(stmt) is cst.For:
            paths = self._test_events(stmt.iter, paths, flow)
            target_names = _names_in(stmt.target)
            if stmt.asynchronous is not None:
                for path in paths:
                    if path.open_any():
                        flow.exc.append(path.copy())
        else:
            test = stmt.test
            infinite = (
                type(test) is cst.Name
                and test.value == "True"
                or (type(test) is cst.Integer and test.value != "0")
            )
            paths = self._test_events(test, paths, flow)
            target_names = []
        entry = [p.copy() for p in paths]
        for p in entry:
            for name in target_names:
                if name in p.held:
                    self._unbind(p, name)
        first = self.exec_block(stmt.body, entry)
        again_in = _dedupe([p.copy() for p in first.normal + first.cont])
        for p in again_in:
            for name in target_names:
                if name in p.held:
                    self._unbind(p, name)
        second = self.exec_block(stmt.body, again_in) if again_in else Flow()
        flow.ret.extend(first.ret + second.ret)
        flow.exc.extend(first.exc + second.exc)
        ends = [] if infinite else paths + first.normal + first.cont + second.normal + second.cont
        if type(stmt) is cst.While and not infinite:
            ends = self.branch(_dedupe(ends), stmt.test)[1]
        if stmt.orelse is not None and ends:
            flow.absorb(self.exec_block(stmt.orelse.body, _dedupe(ends)))
        else:
            flow.normal.extend(ends)
        flow.normal.extend(first.brk + second.brk)
        return flow

    def _with(self, stmt: cst.With, paths: list[Path]) -> Flow:
        key = id(stmt)
        cached = self.events_cache.get(key)
        is_async = stmt.asynchronous is not None
        if cached is None:
            self._ev = []
            self._raises = False
            for item in stmt.items:
                use = Use("with", is_async=is_async)
                expr = item.item
                inner, _ = _unwrap_await(expr)
                names = _names_in(item.asname.name) if item.asname is not None else []
                if type(inner) is cst.NamedExpr:
                    # `async with (s := F()):` enters what F() made, and names it as `as s` would
                    names += _names_in(inner.target)
                    expr, inner = inner.value, _unwrap_await(inner.value)[0]
                if (
                    type(inner) is cst.Call
                    and _last_name(inner.func) in ("aclosing", "closing")
                    and inner.args
                ):
                    self._raises = True
                    self.value(inner.args[0].value, use)
                else:
                    self.value(expr, use)
                if names:
                    self._ev.append(("assign", tuple(names), cst.Name("object")))
            if is_async:
                self._raises = True
            cached = (self._ev, self._raises)
            self.events_cache[key] = cached
        events, raises = cached
        flow = Flow()
        if raises and not self.in_cleanup:
            for path in paths:
                if path.open_any():
                    flow.exc.append(self.apply(path.copy(), events, exc_mode=True))
        entered = [self.apply(p.copy(), events) for p in paths]
        shield = (
            any(ex.is_shielding_with(node_text(item.item)) for item in stmt.items)
            if self.in_finally
            else False
        )
        expects = any(ex.is_expected_failure(_last_name(item.item)) for item in stmt.items)
        self.shielded += shield
        self.expect_failure += expects
        try:
            body = self.exec_block(stmt.body, entered)
        finally:
            self.shielded -= shield
            self.expect_failure -= expects
        flow.absorb(body)
        return flow


def _releases(start: list[Path], result: Flow) -> bool:
    """Whether a handler entered with `start` releases (or hands on) something open there."""
    opened = {rid for path in start for rid, status in path.status.items() if status == OPEN}
    for bucket in (result.normal, result.exc, result.ret, result.brk, result.cont):
        for path in bucket:
            if any(path.status.get(rid) != OPEN for rid in opened):
                return True
    return False


def _bound_to_connection(call: cst.CSTNode) -> bool:
    """`Session(bind=connection)`: the test-isolation recipe. Such a session holds no pooled
    connection of its own; whoever owns `connection` owns the resource."""
    if type(call) is not cst.Call:
        return False
    for index, arg in enumerate(call.args):
        if (arg.keyword is not None and arg.keyword.value == "bind") or (
            arg.keyword is None and index == 0 and not arg.star
        ):
            name = _last_name(arg.value)
            # `bind=connection`, alembic's `bind = op.get_bind()`, `bind=session.connection()`
            if "conn" in name.lower() or name in ("bind", "get_bind"):
                return True
    return False


_HARMLESS_METHODS = frozenset(
    {
        "debug",
        "info",
        "warning",
        "warn",
        "error",
        "exception",
        "critical",
        "log",
        "msg",
    }
)
_HARMLESS_FUNCTIONS = frozenset(
    {
        "print",
        "len",
        "str",
        "repr",
        "int",
        "float",
        "bool",
        "isinstance",
        "issubclass",
        "hasattr",
        "getattr",
        "id",
        "type",
        "dict",
        "list",
        "tuple",
        "set",
        "frozenset",
        "sorted",
        "min",
        "max",
        "format",
        "monotonic",
        "perf_counter",
        "time",
        "uuid4",
        "now",
        "utcnow",
    }
)


def _harmless(call: cst.Call) -> bool:
    """Logging and plain builtins: calls whose failure is not a path worth a finding."""
    func = call.func
    if type(func) is cst.Attribute:
        return func.attr.value in _HARMLESS_METHODS or func.attr.value in (
            "time",
            "monotonic",
            "perf_counter",
            "now",
            "utcnow",
            "uuid4",
        )
    return type(func) is cst.Name and func.value in _HARMLESS_FUNCTIONS


def _registered_elsewhere(info: FunctionInfo, name: str) -> bool:
    """The factory also hands the resource to something that cleans up (`_sessions.add(s)`,
    `atexit.register(s.close)`, `self.s = s`): its callers do not own what it returns."""
    for call in info.calls:
        callee = _last_name(call.func)
        for arg in call.args:
            value = arg.value
            if _release_method_of(value, {name}):
                return True  # atexit.register(s.close)
            if type(value) is cst.Name and value.value == name:
                if (
                    ex.is_container_method(callee)
                    or ex.is_exit_stack_method(callee)
                    or ex.is_ownership_sink(callee)
                    or ex.is_release_helper(callee)
                ):
                    return True
    for target, value in info.assigns:
        if (
            type(value) is cst.Name
            and value.value == name
            and type(target) in (cst.Attribute, cst.Subscript)
        ):
            return True
    return False


def _release_method_of(expr: cst.BaseExpression, aliases: set[str]) -> bool:
    """`s.close` where `s` is one of `aliases`: called, or handed on as a callback."""
    return (
        type(expr) is cst.Attribute
        and type(expr.value) is cst.Name
        and expr.value.value in aliases
        and expr.attr.value in _GENERIC_RELEASE
    )


def _param_summary(module: ModuleAnalysis, target: FunctionInfo, name: str, depth: int = 0) -> str:
    """closes | escapes | uses: what `target` does with its parameter `name`, flow-insensitively."""
    if target.summary is None:
        target.summary = {}
    if name in target.summary:
        return target.summary[name]
    target.summary[name] = "uses"  # recursion guard
    verdict = "uses"
    aliases = {name}
    for tgt, value in target.assigns:
        if type(value) is cst.Name and value.value in aliases:
            aliases.update(_names_in(tgt))
    for node in _walk(target.node.body):
        t = type(node)
        if t is cst.Call:
            func = node.func
            if _release_method_of(func, aliases):
                verdict = "closes"
                break
            callee = _last_name(func)
            for arg in node.args:
                value = arg.value
                if _release_method_of(value, aliases):
                    verdict = "closes"  # stack.push_async_callback(s.close)
                if type(value) is not cst.Name or value.value not in aliases:
                    continue
                if ex.is_release_helper(callee):
                    verdict = "closes"
                elif (
                    ex.is_exit_stack_method(callee)
                    or ex.is_ownership_sink(callee)
                    or ex.is_container_method(callee)
                ):
                    verdict = "escapes"
            if verdict == "closes":
                break
        elif t is cst.WithItem:
            item, _ = _unwrap_await(node.item)
            if type(item) is cst.Name and item.value in aliases:
                verdict = "closes"
                break
            if (
                type(item) is cst.Call
                and _last_name(item.func) in ("aclosing", "closing")
                and item.args
            ):
                arg = item.args[0].value
                if type(arg) is cst.Name and arg.value in aliases:
                    verdict = "closes"
                    break
        elif t is cst.Return or (t is cst.Yield and target.is_generator):
            value = node.value
            if type(value) is cst.Name and value.value in aliases and verdict == "uses":
                verdict = "escapes"
        elif t is cst.Assign:
            for tgt in node.targets:
                if (
                    type(tgt.target) in (cst.Attribute, cst.Subscript)
                    and type(node.value) is cst.Name
                    and node.value.value in aliases
                    and verdict == "uses"
                ):
                    verdict = "escapes"
    target.summary[name] = verdict
    return verdict
