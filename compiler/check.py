"""Middle stage: semantic checks, AST → IR.

Input: a loaded `Program` (includes spliced in). Output: the `ModelIR` of one model, plus warnings.

One pass over the items in definition order builds the scopes (modules, exports, `using`),
evaluates constants, and checks each model. Expressions are translated to IR `E` nodes and
abstractly evaluated at the same time: every value gets a shape and dtype (and its concrete value
when it is known at compile time, which folds constants, ranges and `end`). User functions are
checked for names once, where they are defined, and specialised per distinct argument signature
where they are called, so shapes inside them are decided statically too.

All errors are collected and raised together as one `HsbiError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from . import ast
from . import builtins as bi
from .builtins import UNKNOWN, Abs, ShapeError
from .errors import Diagnostic, HsbiError, did_you_mean, error, warning
from .ir import (
    Constant, E, ExternIR, FunctionIR, ModelIR, Support, Variable, freeze, lit,
)

FOLD_LIMIT = 4096  # largest static value folded into a literal
MAX_RANGE = 1_000_000  # longest range built at compile time


# ----------------------------------------------------------------------------- scopes


@dataclass
class Entry:
    """A name defined in a module: what it is and where it was defined."""

    kind: str  # "const", "function", "extern", "model", "module"
    name: str
    span: ast.Span
    qualname: str
    node: Any = None
    methods: dict[int, "FunctionDef"] = field(default_factory=dict)
    scope: Optional["Scope"] = None  # modules
    abs: Abs = UNKNOWN  # constants
    const_id: str = ""


@dataclass
class FunctionDef:
    node: ast.Function
    qualname: str
    visible: dict[str, Entry]  # names visible where the function was defined


@dataclass
class Scope:
    """A module's names: its own definitions and what `using` imported."""

    name: str
    path: str  # "" for the file's top level
    entries: dict[str, Entry] = field(default_factory=dict)
    exports: set[str] = field(default_factory=set)
    export_spans: dict[str, ast.Span] = field(default_factory=dict)

    def qual(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name


@dataclass
class Binding:
    """A name bound inside a model or function body."""

    kind: str  # "var" (model variable or local), "site_index", "arg"
    abs: Abs
    role: str = ""  # model variable role
    span: ast.Span = ast.NO_SPAN


class _Skip(Exception):
    """Abandon the current expression; its error is already recorded."""


ROLE_WORDS = {
    "global": "global parameter", "global_det": "global value", "local": "local parameter",
    "input": "input", "site_det": "site value", "observation": "observation",
}


class Checker:
    def __init__(self, sources: dict[str, str], externs: Optional[dict] = None):
        self.sources = sources
        self.diags: list[Diagnostic] = []
        self._seen: set[tuple] = set()
        self.root = Scope("Main", "")
        self.constants: dict[str, Constant] = {}
        self.specialisations: dict[tuple, tuple[str, Abs]] = {}
        self.function_irs: dict[str, FunctionIR] = {}
        self.externs: dict[str, ExternIR] = {}
        self.models: dict[str, Entry] = {}
        self.call_stack: list[str] = []
        self.random_fns: set[str] = set()
        self.definitions: dict[str, str] = {}  # model variable -> source text of its right-hand side
        self.all_names: dict[str, ast.Span] = {}

    # -- diagnostics ---------------------------------------------------------
    def err(self, message: str, span: ast.Span, label: str = "", notes=()) -> None:
        key = ("error", message, span.file, span.line, span.column)
        if key not in self._seen:
            self._seen.add(key)
            self.diags.append(error(message, span, label, notes))

    def warn(self, message: str, span: ast.Span, label: str = "") -> None:
        key = ("warning", message, span.file, span.line, span.column)
        if key not in self._seen:
            self._seen.add(key)
            self.diags.append(warning(message, span, label))

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diags if d.severity == "error"]

    # -- definitions -----------------------------------------------------------
    def define(self, scope: Scope, entry: Entry) -> None:
        old = scope.entries.get(entry.name)
        if old is not None and not (old.kind == entry.kind == "function"):
            self.err(
                f"`{entry.name}` is defined twice", entry.span,
                "rename one of them",
                [f"first defined at {old.span.file}:{old.span.line}:{old.span.column}"],
            )
            return
        scope.entries[entry.name] = entry

    def run_items(self, items, scope: Scope) -> None:
        for item in items:
            if isinstance(item, ast.Const):
                self.define_const(item, scope)
            elif isinstance(item, ast.Function):
                self.define_function(item, scope)
            elif isinstance(item, ast.Extern):
                self.define_extern(item, scope)
            elif isinstance(item, ast.Model):
                entry = Entry("model", item.name, item.span, scope.qual(item.name), node=item)
                entry.scope = scope
                self.define(scope, entry)
                self.models.setdefault(item.name, entry)
                # The model's body sees what is visible now (definition order).
                entry.methods = {}
                entry.abs = Abs()
                entry.node = (item, dict(self.visible(scope)))
            elif isinstance(item, ast.Module):
                inner = Scope(item.name, scope.qual(item.name))
                entry = Entry("module", item.name, item.span, inner.path, scope=inner)
                self.define(scope, entry)
                self.run_items(item.body, inner)
                for name in sorted(inner.exports):
                    if name not in inner.entries:
                        self.err(f"module `{item.name}` exports `{name}`, which it does not define",
                                 inner.export_spans[name], "define it in the module or remove it from `export`")
            elif isinstance(item, ast.Export):
                for name in item.names:
                    scope.exports.add(name)
                    scope.export_spans.setdefault(name, item.span)
            elif isinstance(item, ast.Using):
                self.run_using(item, scope)
            elif isinstance(item, ast.Include):  # pragma: no cover - load splices includes
                self.err("`include` could not be resolved", item.span)

    def visible(self, scope: Scope) -> dict[str, Entry]:
        return dict(scope.entries)

    def run_using(self, item: ast.Using, scope: Scope) -> None:
        target = self.find_module(item.module, scope, item.span)
        if target is None:
            return
        names = item.names if item.names is not None else tuple(sorted(target.exports))
        for name in names:
            entry = target.entries.get(name)
            if entry is None:
                hint = did_you_mean(name, target.entries)
                self.err(f"module `{target.name}` has no `{name}`", item.span,
                         f"did you mean `{hint}`?" if hint else f"`{target.name}` defines: " + ", ".join(sorted(target.entries)))
                continue
            old = scope.entries.get(name)
            if old is not None and old is not entry:
                self.err(
                    f"`using` imports `{name}`, which is already defined here", item.span,
                    "rename one of them, or use the qualified name " + f"`{target.name}.{name}`",
                    [f"`{name}` defined at {old.span.file}:{old.span.line}:{old.span.column}",
                     f"imported `{name}` defined at {entry.span.file}:{entry.span.line}:{entry.span.column}"],
                )
                continue
            scope.entries[name] = entry

    def find_module(self, path: tuple[str, ...], scope: Scope, span: ast.Span) -> Optional[Scope]:
        current = scope.entries.get(path[0])
        if current is None and scope is not self.root:
            current = self.root.entries.get(path[0])
        for i, part in enumerate(path):
            if i > 0:
                current = current.scope.entries.get(part) if current and current.scope else None
            if current is None or current.kind != "module":
                modules = [n for n, e in scope.entries.items() if e.kind == "module"]
                hint = did_you_mean(part, modules)
                self.err(f"unknown module `{'.'.join(path[: i + 1])}`", span,
                         f"did you mean `{hint}`?" if hint else "define it with `module … end` or `include` its file first")
                return None
        return current.scope

    # -- constants -------------------------------------------------------------
    def define_const(self, item: ast.Const, scope: Scope) -> None:
        visible = self.visible(scope)
        tr = Translator(self, visible, {}, context="const")
        try:
            _, value = tr.expr(item.value)
        except _Skip:
            value = UNKNOWN
        if not value.unknown and value.value is None:
            self.err(f"constant `{item.name}` is not known when the model is compiled", item.value.span,
                     "constants may use numbers, other constants and built-in functions only")
            value = UNKNOWN
        qual = scope.qual(item.name)
        entry = Entry("const", item.name, item.span, qual, node=item, abs=value, const_id=qual)
        self.define(scope, entry)
        if not value.unknown and value.value is not None:
            self.constants[qual] = Constant(qual, _to_list(value.value, value.dtype), value.shape, value.dtype)

    # -- functions -------------------------------------------------------------
    def define_function(self, item: ast.Function, scope: Scope) -> None:
        arity = len(item.params)
        qual = scope.qual(item.name)
        entry = scope.entries.get(item.name)
        if entry is not None and entry.kind == "function" and entry.qualname == qual:
            if arity in entry.methods:
                first = entry.methods[arity].node.span
                self.err(f"function `{item.name}` with {arity} argument(s) is defined twice", item.span,
                         "methods of one function must differ in their number of arguments",
                         [f"first defined at {first.file}:{first.line}:{first.column}"])
                return
        else:
            entry = Entry("function", item.name, item.span, qual)
            self.define(scope, entry)
            if scope.entries.get(item.name) is not entry:
                return
        seen_params: set[str] = set()
        for p in item.params:
            if p.name in seen_params:
                self.err(f"parameter `{p.name}` appears twice in `{item.name}`", p.span)
            seen_params.add(p.name)
        visible = self.visible(scope)
        fdef = FunctionDef(item, qual, visible)
        entry.methods[arity] = fdef
        visible[item.name] = entry
        NameChecker(self, visible, fdef).check_function()

    def define_extern(self, item: ast.Extern, scope: Scope) -> None:
        qual = scope.qual(item.name)
        entry = Entry("extern", item.name, item.span, qual, node=item)
        self.define(scope, entry)
        param_shapes = []
        for p in item.params:
            param_shapes.append(_annotation_shape(p.annotation))
        returns = _annotation_shape(item.returns)
        if returns is None:
            self.err(f"extern function `{item.name}` needs a return annotation with a known shape",
                     item.span, "add e.g. `::Real` or `::Vector{64}` after the argument list")
        if item.target is not None and ":" not in item.target:
            self.err(f"extern target `{item.target}` should be \"module:attribute\"", item.span,
                     'for example = "mysims.cfd:run"')
        self.externs[qual] = ExternIR(qual, item.name, tuple(p.name for p in item.params),
                                      tuple(param_shapes), returns, item.host, item.target)

    def specialise(self, fdef: FunctionDef, args: list[Abs], span: ast.Span) -> tuple[str, Abs]:
        """Check a function body for these argument shapes; return its IR id and result."""
        key = (fdef.qualname, len(args), tuple(_abs_key(a) for a in args))
        if key in self.specialisations:
            return self.specialisations[key]
        base = f"{fdef.qualname}/{len(args)}"
        if base in self.call_stack:
            self.err(f"function `{fdef.node.name}` calls itself", span,
                     "recursion is not supported; write the computation without it")
            raise _Skip
        count = sum(1 for k in self.specialisations if k[:2] == key[:2]) + 1
        fid = f"{base}#{count}"
        self.call_stack.append(base)
        try:
            tr = Translator(self, fdef.visible, {}, context="function", fid=fid)
            for p, a in zip(fdef.node.params, args):
                tr.check_annotation(p.annotation, a, p.name, p.span)
                tr.env[p.name] = Binding("arg", a)
            body, result = tr.block(fdef.node.body, fdef.node.span, function=True)
        finally:
            self.call_stack.pop()
        if result.dist is not None:
            self.err(f"function `{fdef.node.name}` returns a distribution", fdef.node.span,
                     "functions return values; write the distribution at the `~`")
            raise _Skip
        self.function_irs[fid] = FunctionIR(fid, fdef.node.name, tuple(p.name for p in fdef.node.params),
                                            body, fid in self.random_fns)
        self.specialisations[key] = (fid, result)
        return fid, result

    # -- models ----------------------------------------------------------------
    def check_model(self, entry: Entry, overrides: dict[str, Any]) -> Optional[ModelIR]:
        item, visible = entry.node
        tr = Translator(self, visible, {}, context="model")
        args: list[tuple[str, Any]] = []
        unknown_overrides = set(overrides) - {p.name for p in item.params}
        for name in sorted(unknown_overrides):
            hint = did_you_mean(name, [p.name for p in item.params])
            self.err(f"model `{item.name}` has no argument `{name}`", item.span,
                     f"did you mean `{hint}`?" if hint else "arguments: " + ", ".join(p.name for p in item.params) or "none")
        for p in item.params:
            if p.name in overrides:
                value = bi.static(overrides[p.name])
            elif p.default is not None:
                try:
                    _, value = tr.expr(p.default)
                except _Skip:
                    continue
                if value.value is None:
                    self.err(f"the default of model argument `{p.name}` must be known when compiling", p.default.span)
                    continue
            else:
                self.err(f"model argument `{p.name}` has no default and no value was given", p.span,
                         f"give it a default (`{p.name} = …`) or pass it when compiling")
                continue
            tr.check_annotation(p.annotation, value, p.name, p.span)
            if p.annotation is not None and p.annotation.name == "Int" and value.dtype == "float":
                if value.shape == () and float(value.value).is_integer():
                    value = bi.static(value.value.astype(np.int64), "int")
            tr.env[p.name] = Binding("arg", value)
            args.append((p.name, _to_list(value.value, value.dtype)))
        sites = [s for s in item.body if isinstance(s, ast.Sites)]
        if not sites:
            self.err(f"model `{item.name}` has no `sites` block", item.span,
                     "declare the exchangeable sites: `sites i in 1:n_sites … end`")
        elif len(sites) > 1:
            self.err("a model has exactly one `sites` block", sites[1].span, "merge the blocks (nested sites come later)")
        variables: list[Variable] = []
        site_index, num_sites = "i", 0
        for stmt in item.body:
            if isinstance(stmt, ast.Sites):
                if stmt is not sites[0]:
                    continue
                site_index = stmt.index
                num_sites = self.site_count(tr, stmt)
                site_tr = tr.child(context="site")
                site_tr.site_names = {getattr(st, "name", None) or st.targets[0] for st in stmt.body
                                      if isinstance(st, (ast.Tilde, ast.Assign))}
                site_tr.env[stmt.index] = Binding("site_index", Abs((), "int"), span=stmt.span)
                for inner in stmt.body:
                    self.model_statement(site_tr, inner, variables, site=True)
            else:
                self.model_statement(tr, stmt, variables, site=False)
        if sites and not any(getattr(st, "role", "") == "observe" for st in sites[0].body):
            self.err(f"model `{item.name}` observes nothing", sites[0].span,
                     "add an `observe name ~ Dist(…)` (or `observe name = …`) statement inside `sites`")
        used = {d for v in variables for d in v.deps}
        for v in variables if not self.errors else ():
            if v.role in ("global", "local") and v.name not in used:
                self.warn(f"{ROLE_WORDS[v.role]} `{v.name}` is never used", v.span,
                          "nothing depends on it, so the data cannot inform it")
        if self.errors:
            return None
        variables = _with_coords(variables)
        reachable = _reachable_functions(variables, self.function_irs)
        consts = _reachable(variables, self.function_irs, reachable, "const")
        externs = _reachable(variables, self.function_irs, reachable, "xcall")
        return ModelIR(
            item.name, tuple(args), site_index, num_sites, tuple(variables),
            tuple(self.function_irs[f] for f in sorted(reachable)),
            tuple(self.constants[c] for c in sorted(consts)),
            tuple(self.externs[x] for x in sorted(externs)),
            span=item.span,
        )

    def site_count(self, tr: "Translator", stmt: ast.Sites) -> int:
        try:
            _, start = tr.expr(stmt.start)
            _, count = tr.expr(stmt.count)
        except _Skip:
            return 0
        if start.value is None or start.shape != () or float(start.value) != 1:
            self.err("sites are numbered from 1", stmt.start.span, f"write `sites {stmt.index} in 1:n`")
        if count.value is None or count.shape != () or not float(count.value).is_integer() or float(count.value) < 1:
            self.err("the number of sites must be a positive whole number known when compiling", stmt.count.span,
                     "use a model argument such as `n_sites::Int = 20`")
            return 0
        return int(count.value)

    def model_statement(self, tr: "Translator", stmt, variables: list[Variable], site: bool) -> None:
        if isinstance(stmt, ast.Sites):
            self.err("sites blocks cannot be nested", stmt.span, "nested sites come in a later version")
            return
        if isinstance(stmt, (ast.Return, ast.ExprStmt)):
            self.err("a model holds `~`, `=`, `observe` and `input` statements only", stmt.span,
                     "move computations into a function")
            return
        role_word = stmt.role
        if role_word in ("observe", "input") and not site:
            what = "observations" if role_word == "observe" else "inputs"
            self.err(f"{what} must be per site: `{role_word}` outside `sites`", stmt.span,
                     "move this statement inside the `sites` block")
            return
        if isinstance(stmt, ast.Assign) and len(stmt.targets) > 1:
            self.err("destructuring is only allowed inside functions", stmt.span,
                     "assign each model variable on its own line")
            return
        name = stmt.name if isinstance(stmt, ast.Tilde) else stmt.targets[0]
        if name in tr.env or name in tr.visible:
            old = tr.env.get(name)
            where = (old.span if old else tr.visible[name].span)
            self.err(f"`{name}` is assigned twice", stmt.span, "every name is defined once",
                     [f"first defined at {where.file}:{where.line}:{where.column}"] if where.line else [])
            return
        role = {
            ("param", False): "global", ("param", True): "local", ("det", False): "global_det",
            ("det", True): "site_det", ("observe", True): "observation", ("input", True): "input",
        }[(stmt.role, site)]
        tr.reads = set()
        tr.subject = f"{ROLE_WORDS[role]} `{name}`"
        try:
            if isinstance(stmt, ast.Tilde):
                node, value = tr.expr(stmt.dist)
                if value.dist is None and not value.unknown:
                    self.err("the right of `~` must be a distribution", stmt.dist.span,
                             f"e.g. `{name} ~ Normal(0.0, 1.0)`; use `=` for a computed value")
                    raise _Skip
            else:
                node, value = tr.expr(stmt.value)
                if value.dist is not None:
                    self.err(f"`{name} = …` assigns a distribution", stmt.value.span, f"write `{name} ~ …` to draw from it")
                    raise _Skip
                if value.fn is not None or value.items is not None:
                    self.err(f"`{name}` must be a number or an array", stmt.value.span)
                    raise _Skip
        except _Skip:
            tr.env[name] = Binding("var", UNKNOWN, span=stmt.span)
            return
        stochastic = isinstance(stmt, ast.Tilde)
        if role in ("global", "local") and value.support is not None and value.support.kind in (
                "integer", "nonnegative_integer", "boolean"):
            self.err(f"{ROLE_WORDS[role]} `{name}` has a discrete prior ({_dist_name(stmt.dist)})", stmt.dist.span,
                     "parameters must be continuous; make it an `input` or use a continuous prior")
        deps = tuple(sorted(tr.reads))
        tr.check_annotation(stmt.annotation, value, name, stmt.span)
        support = value.support if stochastic and value.support is not None else Support(
            "real" if value.dtype == "float" else "integer" if value.dtype == "int" else "boolean")
        tr.env[name] = Binding("var", Abs(value.shape, value.dtype), role=role, span=stmt.span)
        if value.unknown:
            return
        variables.append(Variable(name, role, stochastic, node, value.shape, value.dtype, support, deps, span=stmt.span))
        rhs = stmt.dist if stochastic else stmt.value
        self.definitions[name] = _span_text(self.sources, rhs.span) or _dist_name(rhs)


def _dist_name(expr) -> str:
    return expr.func.dotted if isinstance(expr, ast.Call) else "…"


def _span_text(sources: dict[str, str], span: ast.Span) -> str:
    """The source text under a span, on one line (empty for built ASTs)."""
    text = sources.get(span.file)
    if text is None or span.line <= 0:
        return ""
    lines = text.splitlines()[span.line - 1: span.end_line]
    if not lines:
        return ""
    if len(lines) == 1:
        return lines[0][span.column - 1: span.end_column - 1]
    lines[0] = lines[0][span.column - 1:]
    lines[-1] = lines[-1][: span.end_column - 1]
    return " ".join(line.strip() for line in lines)


def _annotation_shape(ann: Optional[ast.TypeAnn]) -> Optional[tuple[int, ...]]:
    if ann is None:
        return None
    if ann.name in ("Real", "Int", "Bool"):
        return ()
    if ann.name == "Vector" and len(ann.params) == 1:
        return (ann.params[0],)
    if ann.name == "Matrix" and len(ann.params) == 2:
        return tuple(ann.params)
    return None


def _abs_key(a: Abs) -> tuple:
    value = None
    if a.value is not None and a.value.size <= 16:
        value = tuple(np.asarray(a.value, dtype=np.float64).reshape(-1).tolist())
    items = None if a.items is None else tuple(_abs_key(i) for i in a.items)
    return (a.shape, a.dtype, value, a.fn, items, a.dist)


def _to_list(value: Optional[np.ndarray], dtype: str) -> Any:
    """A static value as plain Python numbers in nested tuples (hashable, JSON-able)."""
    if value is None:
        return None
    array = np.asarray(value)
    kind = {"float": np.float64, "int": np.int64}.get(dtype, bool)
    return freeze(array.astype(kind).tolist())


def _walk(node: E):
    yield node
    for a in node.args:
        yield from _walk(a)


def _reachable_functions(variables: list[Variable], functions: dict[str, FunctionIR]) -> set[str]:
    found: set[str] = set()
    todo = [v.expr for v in variables]
    while todo:
        for n in _walk(todo.pop()):
            if n.tag in ("ucall", "fnref") and n.data[0] not in found:
                found.add(n.data[0])
                todo.append(functions[n.data[0]].body)
    return found


def _reachable(variables, functions, reachable, tag) -> set[str]:
    roots = [v.expr for v in variables] + [functions[f].body for f in reachable]
    return {n.data[0] for r in roots for n in _walk(r) if n.tag == tag}


def _with_coords(variables: list[Variable]) -> list[Variable]:
    """Attach functional coordinates: the inputs of length k a per-site (k, …) variable depends on."""
    by_name = {v.name: v for v in variables}
    out = []
    for v in variables:
        coords: tuple[str, ...] = ()
        if v.role in ("observation", "local") and len(v.shape) >= 1 and v.shape[0] > 1:
            seen, todo, found = set(), list(v.deps), []
            while todo:
                d = todo.pop()
                if d in seen or d not in by_name:
                    continue
                seen.add(d)
                dep = by_name[d]
                if dep.role == "input" and dep.shape == (v.shape[0],) and dep.dtype != "bool":
                    found.append(d)
                elif dep.role == "site_det":
                    todo.extend(dep.deps)
            coords = tuple(sorted(found))
        out.append(Variable(v.name, v.role, v.stochastic, v.expr, v.shape, v.dtype, v.support, v.deps,
                            coords, span=v.span))
    return out


# ----------------------------------------------------------------------------- name checks


class NameChecker:
    """Checks the names in a function body where it is defined (shapes are checked per call)."""

    def __init__(self, checker: Checker, visible: dict[str, Entry], fdef: FunctionDef):
        self.checker = checker
        self.visible = visible
        self.fdef = fdef

    def check_function(self) -> None:
        local = {p.name for p in self.fdef.node.params}
        for p in self.fdef.node.params:
            if p.default is not None:
                self.checker.err("function parameters cannot have defaults", p.default.span,
                                 "write a method with fewer arguments instead")
        self.stmts(self.fdef.node.body, local)

    def stmts(self, body, local: set[str]) -> None:
        for stmt in body:
            if isinstance(stmt, ast.Tilde):
                self.expr(stmt.dist, local)
                local.add(stmt.name)
            elif isinstance(stmt, ast.Assign):
                self.expr(stmt.value, local)
                local.update(stmt.targets)
            elif isinstance(stmt, (ast.Return, ast.ExprStmt)):
                self.expr(stmt.value, local)
            elif isinstance(stmt, ast.Sites):
                self.checker.err("`sites` belongs in a model, not in a function", stmt.span)

    def expr(self, node, local: set[str]) -> None:
        if isinstance(node, ast.Name):
            self.name(node, local)
        elif isinstance(node, ast.Call):
            if len(node.func.parts) == 1 and node.func.parts[0] == self.fdef.node.name \
                    and node.func.parts[0] not in local:
                self.checker.err(f"function `{self.fdef.node.name}` calls itself", node.span,
                                 "recursion is not supported; write the computation without it")
            elif not (len(node.func.parts) == 1 and (node.func.parts[0] in bi.DISTRIBUTIONS
                                                     or node.func.parts[0] in bi.FUNCTIONS)):
                self.name(node.func, local, call=True)
            for a in node.args:
                self.expr(a, local)
            for k in node.kwargs:
                self.expr(k.value, local)
        elif isinstance(node, ast.IfExpr):
            for cond, block in node.branches:
                self.expr(cond, local)
                self.stmts(block, set(local))
            self.stmts(node.otherwise, set(local))
        else:
            for child in _children(node):
                self.expr(child, local)

    def name(self, node: ast.Name, local: set[str], call: bool = False) -> None:
        head = node.parts[0]
        if len(node.parts) == 1 and (head in local or head in bi.VALUES):
            return
        if len(node.parts) == 1 and (head in bi.DISTRIBUTIONS or head in bi.FUNCTIONS):
            return
        if head in self.visible:
            return
        candidates = set(local) | set(self.visible) | set(bi.FUNCTIONS) | set(bi.DISTRIBUTIONS) | set(bi.VALUES)
        _unknown_name(self.checker, node, candidates)


def _children(node) -> list:
    if isinstance(node, (ast.Unary,)):
        return [node.operand]
    if isinstance(node, ast.Binary):
        return [node.left, node.right]
    if isinstance(node, ast.Ternary):
        return [node.cond, node.then, node.otherwise]
    if isinstance(node, ast.Range):
        return [x for x in (node.start, node.step, node.stop) if x is not None]
    if isinstance(node, ast.Index):
        return [node.value, *node.indices]
    if isinstance(node, (ast.VectorLit, ast.TupleLit)):
        return list(node.items)
    if isinstance(node, ast.MatrixLit):
        return [x for row in node.rows for x in row]
    return []


def _unknown_name(checker: Checker, node: ast.Name, candidates) -> None:
    name = node.dotted
    later = checker.all_names.get(name)
    if later is not None and (later.file, later.line, later.column) > (node.span.file, node.span.line, node.span.column):
        checker.err(f"`{name}` is used before it is defined", node.span,
                    "names must be defined before they are used; move the definition above this line",
                    [f"`{name}` is defined at {later.file}:{later.line}:{later.column}"])
        return
    hint = did_you_mean(node.parts[-1] if len(node.parts) > 1 else name, candidates)
    label = f"did you mean `{hint}`?" if hint else "define it before this line"
    checker.err(f"unknown name `{name}`", node.span, label)


def _collect_names(items, out: dict[str, ast.Span]) -> None:
    """Every name a program defines, with its first definition (for "used before defined")."""
    def stmts(body):
        for stmt in body:
            if isinstance(stmt, ast.Tilde):
                out.setdefault(stmt.name, stmt.span)
            elif isinstance(stmt, ast.Assign):
                for t in stmt.targets:
                    out.setdefault(t, stmt.span)
            elif isinstance(stmt, ast.Sites):
                stmts(stmt.body)
    for item in items:
        if isinstance(item, (ast.Const, ast.Function, ast.Extern, ast.Model)):
            out.setdefault(item.name, item.span)
        if isinstance(item, (ast.Function, ast.Model)):
            stmts(item.body)
        if isinstance(item, ast.Module):
            out.setdefault(item.name, item.span)
            _collect_names(item.body, out)


# ----------------------------------------------------------------------------- expressions

_BINOPS = {
    "+": "add", "-": "sub", "*": "mul", "/": "div", "^": "pow", "<": "lt", "<=": "le", ">": "gt",
    ">=": "ge", "==": "eq", "!=": "ne", "&&": "and", "||": "or",
}
_NUMPY_BINOPS = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.true_divide, "pow": np.power,
    "lt": np.less, "le": np.less_equal, "gt": np.greater, "ge": np.greater_equal, "eq": np.equal,
    "ne": np.not_equal, "and": np.logical_and, "or": np.logical_or,
}


class Translator:
    """Translates expressions and statements to IR while inferring shapes (abstract evaluation)."""

    def __init__(self, checker: Checker, visible: dict[str, Entry], env: dict[str, Binding], *,
                 context: str, fid: str = ""):
        self.checker = checker
        self.visible = visible
        self.env = env
        self.context = context  # "const", "model", "site", "function"
        self.fid = fid
        self.reads: set[str] = set()
        self.subject = "this expression"  # what is being defined, for messages
        self.site_names: set[str] = set()  # names declared in the model's sites block
        self.end_stack: list[int] = []

    def child(self, context: str) -> "Translator":
        t = Translator(self.checker, self.visible, dict(self.env), context=context, fid=self.fid)
        t.subject = self.subject
        t.site_names = self.site_names
        return t

    def fail(self, message: str, span: ast.Span, label: str = "", notes=()):
        self.checker.err(message, span, label, notes)
        raise _Skip

    # -- annotations -----------------------------------------------------------
    def check_annotation(self, ann: Optional[ast.TypeAnn], value: Abs, name: str, span: ast.Span) -> None:
        if ann is None or value.unknown:
            return
        shape = value.shape
        ok = True
        if ann.name in ("Real", "Int", "Bool"):
            ok = shape == () and value.items is None and value.dist is None
            if ann.name == "Int" and ok and value.dtype == "float":
                ok = value.value is not None and float(value.value).is_integer()
            if ann.name == "Bool" and ok:
                ok = value.dtype == "bool"
        elif ann.name == "Vector":
            ok = len(shape) == 1 and (not ann.params or shape == tuple(ann.params[:1]))
        elif ann.name == "Matrix":
            ok = len(shape) == 2 and (not ann.params or shape == tuple(ann.params))
        elif ann.name == "Tuple":
            ok = value.items is not None
        else:
            self.checker.err(f"unknown type `{ann.name}`", ann.span,
                             "types are Real, Int, Bool, Vector, Vector{n}, Matrix{r,c} and Tuple")
            return
        if not ok:
            what = "a tuple" if value.items is not None else (
                f"shape {bi.fmt_shape(shape)}" + ("" if ann.name != "Bool" else f" and type {value.dtype}"))
            self.checker.err(f"`{name}` is annotated `{_ann_text(ann)}` but has {what}", ann.span,
                             "fix the annotation or the expression")

    # -- statements (function bodies and if-blocks) ----------------------------
    def block(self, body, span: ast.Span, function: bool = False) -> tuple[E, Abs]:
        stmts: list[E] = []
        result: Optional[tuple[E, Abs]] = None
        for n, stmt in enumerate(body):
            last = n == len(body) - 1
            if isinstance(stmt, ast.Return):
                if not last:
                    self.fail("`return` must be the last statement of its block", stmt.span,
                              "code after `return` never runs")
                result = self.expr(stmt.value)
            elif isinstance(stmt, ast.ExprStmt):
                if not last:
                    self.fail("this expression's value is unused", stmt.span, "assign it with `name = …`")
                result = self.expr(stmt.value)
            elif isinstance(stmt, ast.Tilde):
                if stmt.role != "param":
                    self.fail(f"`{stmt.role}` belongs in a model's `sites` block, not in a function", stmt.span)
                node, value = self.expr(stmt.dist)
                if value.dist is None:
                    self.fail("the right of `~` must be a distribution", stmt.dist.span)
                self.check_annotation(stmt.annotation, value, stmt.name, stmt.span)
                stmts.append(E("draw", (node,), (stmt.name,)))
                self.env[stmt.name] = Binding("var", Abs(value.shape, value.dtype))
                if self.fid:
                    self.checker.random_fns.add(self.fid)
                if last:
                    result = (E("var", (), (stmt.name,)), Abs(value.shape, value.dtype))
            elif isinstance(stmt, ast.Assign):
                if stmt.role != "det":
                    self.fail(f"`{stmt.role}` belongs in a model's `sites` block, not in a function", stmt.span)
                node, value = self.expr(stmt.value)
                if value.dist is not None:
                    self.fail("`=` assigns a distribution", stmt.value.span, "write `~` to draw from it")
                if len(stmt.targets) == 1:
                    self.check_annotation(stmt.annotation, value, stmt.targets[0], stmt.span)
                    self.env[stmt.targets[0]] = Binding("var", _strip(value))
                else:
                    parts = self.destructure(stmt, value)
                    for target, part in zip(stmt.targets, parts):
                        self.env[target] = Binding("var", part)
                stmts.append(E("let", (node,), tuple(stmt.targets)))
                if last:
                    result = (E("var", (), (stmt.targets[-1],)) if len(stmt.targets) == 1 else node, value)
            else:
                self.fail("`sites` belongs in a model, not in a function", stmt.span)
        if result is None:
            self.fail("this block has no value", span, "end it with an expression or `return …`")
        node, value = result
        return E("block", (*stmts, node)), value

    def destructure(self, stmt: ast.Assign, value: Abs) -> list[Abs]:
        n = len(stmt.targets)
        if value.unknown:
            return [UNKNOWN] * n
        if value.items is not None:
            if len(value.items) != n:
                self.fail(f"cannot unpack {len(value.items)} values into {n} names", stmt.span)
            return [_strip(i) for i in value.items]
        if not value.shape or value.shape[0] != n:
            self.fail(f"cannot unpack a value of shape {bi.fmt_shape(value.shape)} into {n} names", stmt.span,
                      f"the first axis must have length {n}")
        inner = value.shape[1:]
        parts = []
        for k in range(n):
            v = None if value.value is None else np.asarray(value.value)[k]
            parts.append(Abs(inner, value.dtype, v))
        return parts

    # -- expressions -------------------------------------------------------------
    def exprs(self, nodes) -> list[tuple[E, Abs]]:
        """Translate several expressions, reporting the errors of all before giving up."""
        out, failed = [], False
        for node in nodes:
            try:
                out.append(self.expr(node))
            except _Skip:
                failed = True
        if failed:
            raise _Skip
        return out

    def expr(self, node) -> tuple[E, Abs]:
        method = getattr(self, "x_" + type(node).__name__, None)
        if method is None:
            self.fail(f"unexpected {type(node).__name__.lower()} here", node.span)
        e, a = method(node)
        if a.value is not None and e.tag not in ("lit",) and not a.unknown and a.value.size <= FOLD_LIMIT \
                and a.dist is None and a.fn is None and a.items is None:
            return lit(_to_list(a.value, a.dtype), a.dtype), a
        return e, a

    def x_Num(self, node: ast.Num):
        if node.is_int:
            return lit(int(node.value), "int"), bi.static(int(node.value), "int")
        return lit(float(node.value), "float"), bi.static(float(node.value), "float")

    def x_Bool(self, node: ast.Bool):
        return lit(bool(node.value), "bool"), bi.static(bool(node.value), "bool")

    def x_Str(self, node: ast.Str):
        self.fail("strings are only allowed in `include`, `extern` targets and odesolve's `solver`", node.span)

    def x_End(self, node: ast.End):
        if not self.end_stack:
            self.fail("`end` as a value only works inside an index, e.g. `v[end]`", node.span)
        n = self.end_stack[-1]
        return lit(n, "int"), bi.static(n, "int")

    def x_Colon(self, node: ast.Colon):
        self.fail("`:` alone only works as an index, e.g. `M[:, 2]`", node.span)

    def x_Name(self, node: ast.Name):
        if len(node.parts) == 1:
            name = node.parts[0]
            binding = self.env.get(name)
            if binding is not None:
                if binding.kind == "site_index":
                    self.fail(f"{self.subject} uses the site index `{name}` as a value", node.span,
                              "sites are exchangeable: a site may use globals and its own values only")
                if binding.abs.unknown:
                    raise _Skip
                if binding.kind == "var":
                    self.reads.add(name)
                if binding.kind == "arg" and binding.abs.value is not None:
                    a = binding.abs
                    return lit(_to_list(a.value, a.dtype), a.dtype), a
                return E("var", (), (name,)), binding.abs
            if name in self.visible:
                return self.entry_value(self.visible[name], node)
            if name in bi.VALUES:
                return lit(bi.VALUES[name], "float"), bi.static(bi.VALUES[name], "float")
            if name in bi.FUNCTIONS or name in bi.DISTRIBUTIONS:
                self.fail(f"built-in `{name}` used as a value", node.span, f"call it: `{name}(…)`")
            _unknown_name(self.checker, node, self.candidates())
            raise _Skip
        entry = self.qualified(node)
        return self.entry_value(entry, node)

    def candidates(self) -> set[str]:
        return set(self.env) | set(self.visible) | set(bi.VALUES) | set(bi.FUNCTIONS) | set(bi.DISTRIBUTIONS)

    def qualified(self, node: ast.Name) -> Entry:
        scope_entry = self.visible.get(node.parts[0]) or self.checker.root.entries.get(node.parts[0])
        for i, part in enumerate(node.parts[1:], start=1):
            if scope_entry is None or scope_entry.kind != "module":
                self.fail(f"unknown module `{'.'.join(node.parts[:i])}`", node.span,
                          "define it with `module … end` or `include` its file first")
            inner = scope_entry.scope.entries.get(part)
            if inner is None:
                hint = did_you_mean(part, scope_entry.scope.entries)
                self.fail(f"module `{scope_entry.name}` has no `{part}`", node.span,
                          f"did you mean `{'.'.join(node.parts[:i])}.{hint}`?" if hint else "")
            scope_entry = inner
        return scope_entry

    def entry_value(self, entry: Entry, node: ast.Name) -> tuple[E, Abs]:
        if entry.kind == "const":
            if entry.abs.unknown:
                raise _Skip
            a = entry.abs
            if a.value is not None and a.value.size <= FOLD_LIMIT:
                return lit(_to_list(a.value, a.dtype), a.dtype), a
            return E("const", (), (entry.const_id,)), a
        if entry.kind == "function":
            return E("fnref", (), (entry.qualname,)), Abs(fn=entry.qualname)
        if entry.kind == "model":
            self.fail(f"model `{entry.name}` used as a value", node.span)
        if entry.kind == "module":
            self.fail(f"module `{entry.name}` used as a value", node.span, f"refer to a name in it: `{entry.name}.name`")
        self.fail(f"extern `{entry.name}` used as a value", node.span, f"call it: `{entry.name}(…)`")

    def x_Unary(self, node: ast.Unary):
        e, a = self.expr(node.operand)
        self.numeric(a, node.operand.span, node.op)
        tag = {"-": "neg", "+": "pos", "!": "not"}[node.op]
        fn = {"neg": np.negative, "pos": np.positive, "not": np.logical_not}[tag]
        dtype = "bool" if tag == "not" else ("int" if a.dtype == "bool" else a.dtype)
        value = None if a.value is None else np.asarray(fn(a.value))
        return E(tag, (e,)), Abs(a.shape, dtype, value)

    def numeric(self, a: Abs, span: ast.Span, op: str) -> None:
        if a.dist is not None:
            self.fail(f"`{op}` applied to a distribution", span, "draw from it first with `~`")
        if a.fn is not None:
            self.fail(f"`{op}` applied to a function", span, "call it")
        if a.items is not None:
            self.fail(f"`{op}` applied to a tuple", span, "unpack it first: `a, b = t`")

    def x_Binary(self, node: ast.Binary):
        (le, la), (re, ra) = self.exprs((node.left, node.right))
        self.numeric(la, node.left.span, node.op)
        self.numeric(ra, node.right.span, node.op)
        tag = _BINOPS[node.op]
        try:
            shape = bi.broadcast(la.shape, ra.shape)
        except ShapeError as exc:
            self.fail(f"`{node.op}` of mismatched shapes", node.span, str(exc))
        if tag in ("lt", "le", "gt", "ge", "eq", "ne", "and", "or"):
            dtype = "bool"
        elif tag in ("div",):
            dtype = "float"
        elif tag == "pow":
            dtype = "float" if "float" in (la.dtype, ra.dtype) else "int"
        else:
            dtype = bi.promote(la.dtype, ra.dtype)
            if dtype == "bool":
                dtype = "int"
        value = None
        if la.value is not None and ra.value is not None:
            with np.errstate(all="ignore"):
                left = la.value.astype(np.float64) if tag == "pow" and dtype == "float" else la.value
                value = np.asarray(_NUMPY_BINOPS[tag](left, ra.value))
        return E(tag, (le, re)), Abs(shape, dtype, value)

    def x_Ternary(self, node: ast.Ternary):
        (ce, ca), (te, ta), (oe, oa) = self.exprs((node.cond, node.then, node.otherwise))
        for a, sub in ((ca, node.cond), (ta, node.then), (oa, node.otherwise)):
            self.numeric(a, sub.span, "?:")
        try:
            shape = bi.broadcast(ca.shape, ta.shape, oa.shape)
        except ShapeError as exc:
            self.fail("the branches of `?:` have mismatched shapes", node.span, str(exc))
        value = None
        if ca.value is not None and ta.value is not None and oa.value is not None:
            value = np.where(ca.value, ta.value, oa.value)
        return E("select", (ce, te, oe)), Abs(shape, bi.promote(ta.dtype, oa.dtype), value)

    def range_values(self, node: ast.Range) -> tuple[Abs, Abs, Abs]:
        parts = []
        for sub in (node.start, node.step, node.stop):
            if sub is None:
                parts.append(bi.static(1, "int"))
                continue
            _, a = self.expr(sub)
            if a.value is None or a.shape != ():
                self.fail("range bounds and steps must be numbers known when compiling", sub.span,
                          "ranges are static; use a constant or a model argument")
            parts.append(a)
        if not all(np.isfinite(float(p.value)) for p in parts):
            self.fail("range bounds and steps must be finite", node.span)
        if float(parts[1].value) == 0:
            self.fail("a range's step cannot be zero", node.step.span)
        length = (float(parts[2].value) - float(parts[0].value)) / float(parts[1].value)
        if length > MAX_RANGE:
            self.fail(f"this range has over {MAX_RANGE:,} elements", node.span, "ranges are built when compiling")
        return parts[0], parts[1], parts[2]

    def x_Range(self, node: ast.Range):
        start, step, stop = self.range_values(node)
        dtype = bi.promote(start.dtype, step.dtype, stop.dtype)
        a, s, b = (float(start.value), float(step.value), float(stop.value))
        count = max(0, int(np.floor((b - a) / s + 1e-10)) + 1)
        values = a + s * np.arange(count)
        if dtype == "int":
            values = values.astype(np.int64)
        return lit(_to_list(values, dtype), dtype), bi.static(values, dtype)

    def x_VectorLit(self, node: ast.VectorLit):
        if not node.items:
            self.fail("empty vectors are not supported", node.span, "use `zeros(0)` if you must")
        pairs = self.exprs(node.items)
        for (_, a), item in zip(pairs, node.items):
            if a.dist is not None:
                self.fail("a vector of distributions only appears as Mixture's second argument", item.span)
            self.numeric(a, item.span, "[…]")
        shapes = {a.shape for _, a in pairs}
        if len(shapes) != 1:
            self.fail("vector items have different shapes", node.span,
                      ", ".join(bi.fmt_shape(a.shape) for _, a in pairs))
        inner = pairs[0][1].shape
        dtype = bi.promote(*(a.dtype for _, a in pairs))
        value = None
        if all(a.value is not None for _, a in pairs):
            value = np.stack([np.asarray(a.value) for _, a in pairs]).astype(
                {"float": np.float64, "int": np.int64, "bool": bool}[dtype])
        return E("vector", tuple(e for e, _ in pairs)), Abs((len(pairs), *inner), dtype, value)

    def x_MatrixLit(self, node: ast.MatrixLit):
        if all(len(r) == 1 for r in node.rows):
            # `[a; b]` concatenates vertically, as in Julia: for scalars that is a vector.
            return self.x_VectorLit(ast.VectorLit(tuple(r[0] for r in node.rows), span=node.span))
        widths = {len(r) for r in node.rows}
        if len(widths) != 1:
            self.fail("matrix rows have different lengths", node.span, "every row needs the same number of entries")
        pairs = self.exprs([x for row in node.rows for x in row])
        for (_, a), x in zip(pairs, (x for row in node.rows for x in row)):
            self.numeric(a, x.span, "[…]")
            if a.shape != ():
                self.fail("matrix literal entries must be scalars", x.span, "use vcat/hcat to join arrays")
        rows, cols = len(node.rows), widths.pop()
        dtype = bi.promote(*(a.dtype for _, a in pairs))
        value = None
        if all(a.value is not None for _, a in pairs):
            value = np.array([float(a.value) for _, a in pairs]).reshape(rows, cols)
            if dtype != "float":
                value = value.astype(np.int64 if dtype == "int" else bool)
        return E("matrix", tuple(e for e, _ in pairs), (rows, cols)), Abs((rows, cols), dtype, value)

    def x_TupleLit(self, node: ast.TupleLit):
        pairs = self.exprs(node.items)
        return E("tuple", tuple(e for e, _ in pairs)), Abs(items=tuple(a for _, a in pairs))

    def x_Index(self, node: ast.Index):
        # Exchangeability: indexing a per-site value with the site index reaches into another site.
        if isinstance(node.value, ast.Name) and len(node.value.parts) == 1:
            if node.value.parts[0] in self.site_names and any(self.mentions_site_index(i) for i in node.indices):
                self.fail(f"{self.subject} refers to another site", node.span,
                          "sites are exchangeable: a site may use globals and its own values only")
        ve, va = self.expr(node.value)
        self.numeric(va, node.value.span, "[…]")
        if len(node.indices) > len(va.shape):
            self.fail(f"too many indices: the value has shape {bi.fmt_shape(va.shape)}", node.span,
                      f"it takes at most {len(va.shape)} index(es)")
        parts: list[E] = []
        shape: list[int] = []
        value = va.value
        np_index: list[Any] = []
        for axis, idx in enumerate(node.indices):
            n = va.shape[axis]
            if isinstance(idx, ast.Colon):
                parts.append(E("colon"))
                shape.append(n)
                np_index.append(slice(None))
                continue
            self.end_stack.append(n)
            try:
                if isinstance(idx, ast.Range):
                    start, step, stop = self.range_values(idx)
                    a, s, b = (float(start.value), float(step.value), float(stop.value))
                    if not all(float(v).is_integer() for v in (a, s, b)):
                        self.fail("index ranges must use whole numbers", idx.span)
                    a, s, b = int(a), int(s), int(b)
                    picks = list(range(a, b + (1 if s > 0 else -1), s))
                    bad = [p for p in picks if not 1 <= p <= n]
                    if bad:
                        self.fail(f"index {bad[0]} is out of bounds for an axis of length {n}", idx.span,
                                  "indices start at 1 and end at `end`")
                    parts.append(E("slice", (), (a, s, b)))
                    shape.append(len(picks))
                    np_index.append(np.asarray(picks, dtype=np.int64) - 1)
                    continue
                ie, ia = self.expr(idx)
            finally:
                self.end_stack.pop()
            self.numeric(ia, idx.span, "[…]")
            if ia.shape != ():
                self.fail("indices must be scalars or ranges", idx.span)
            if ia.dtype != "int":
                if ia.value is not None and float(ia.value).is_integer():
                    ie, ia = lit(int(ia.value), "int"), bi.static(int(ia.value), "int")
                else:
                    self.fail("indices must be whole numbers", idx.span, "1-based: the first element is `v[1]`")
            if ia.value is not None:
                k = int(ia.value)
                if not 1 <= k <= n:
                    self.fail(f"index {k} is out of bounds for an axis of length {n}", idx.span,
                              "indices start at 1 and end at `end`")
                np_index.append(k - 1)
            else:
                np_index.append(None)
            parts.append(ie)
        shape.extend(va.shape[len(node.indices):])
        folded = None
        if value is not None and all(i is not None for i in np_index):
            folded = _np_take(np.asarray(value), np_index)
        return E("index", (ve, *parts)), Abs(tuple(shape), va.dtype, folded)

    def mentions_site_index(self, node) -> bool:
        if isinstance(node, ast.Name) and len(node.parts) == 1:
            b = self.env.get(node.parts[0])
            return b is not None and b.kind == "site_index"
        if isinstance(node, (ast.Colon, ast.End)):
            return False
        return any(self.mentions_site_index(c) for c in _children(node))

    def x_IfExpr(self, node: ast.IfExpr):
        args: list[E] = []
        values: list[Abs] = []
        for cond, body in node.branches:
            ce, ca = self.expr(cond)
            self.numeric(ca, cond.span, "if")
            be, ba = self.child_block(body, cond.span)
            args.extend([ce, be])
            values.extend([ca, ba])
        oe, oa = self.child_block(node.otherwise, node.span)
        args.append(oe)
        values.append(oa)
        branch_values = values[1::2] + [oa]
        try:
            shape = bi.broadcast(*(v.shape for v in values))
        except ShapeError as exc:
            self.fail("the branches of `if` have mismatched shapes", node.span, str(exc))
        dtype = bi.promote(*(v.dtype for v in branch_values))
        return E("if", tuple(args)), Abs(shape, dtype)

    def child_block(self, body, span) -> tuple[E, Abs]:
        inner = self.child(self.context)
        inner.reads = self.reads
        e, a = inner.block(body, span)
        return e, a

    # -- calls -------------------------------------------------------------------
    def x_Call(self, node: ast.Call):
        parts = node.func.parts
        name = parts[0] if len(parts) == 1 else None
        if name is not None and name not in self.env and name not in self.visible:
            if name in bi.DISTRIBUTIONS:
                return self.call_distribution(node, name)
            if name in bi.FUNCTIONS:
                return self.call_builtin(node, name)
        if name is not None and name in self.env:
            self.fail(f"`{name}` is a value, not a function", node.func.span)
        if name is not None and name not in self.visible:
            _unknown_name(self.checker, node.func, self.candidates())
            raise _Skip
        entry = self.visible[name] if name is not None else self.qualified(node.func)
        if node.kwargs:
            self.fail(f"`{node.func.dotted}` takes no keyword arguments", node.kwargs[0].span)
        if entry.kind == "function":
            return self.call_user(node, entry)
        if entry.kind == "extern":
            return self.call_extern(node, entry)
        self.fail(f"`{node.func.dotted}` is a {entry.kind}, not a function", node.func.span)

    def check_arity(self, node: ast.Call, name: str, lo: int, hi: int) -> None:
        n = len(node.args)
        if not lo <= n <= hi:
            want = str(lo) if lo == hi else f"{lo} to {hi}"
            self.fail(f"`{name}` takes {want} argument{'s' if hi != 1 else ''}, got {n}", node.span,
                      _SIGNATURES.get(name, ""))

    def call_distribution(self, node: ast.Call, name: str):
        lo, hi, _, _ = bi.DISTRIBUTIONS[name]
        self.check_arity(node, name, lo, hi)
        if node.kwargs:
            self.fail(f"`{name}` takes no keyword arguments", node.kwargs[0].span)
        if name == "Mixture":
            we, wa = self.expr(node.args[0])
            comps = node.args[1]
            if not isinstance(comps, ast.VectorLit):
                self.fail("`Mixture`'s second argument is a list of distributions", comps.span,
                          "e.g. Mixture([0.5, 0.5], [Normal(0, 1), Normal(0, 0.1)])")
            pairs = self.exprs(comps.items)
            args_abs = [wa, Abs(items=tuple(a for _, a in pairs))]
            e_args = (we, E("vector", tuple(e for e, _ in pairs)))
        else:
            pairs = self.exprs(node.args)
            args_abs = [a for _, a in pairs]
            e_args = tuple(e for e, _ in pairs)
        if any(a.unknown for a in args_abs):
            raise _Skip
        try:
            value = bi.distribution(name, args_abs)
        except ShapeError as exc:
            self.fail(f"bad arguments to `{name}`", node.span, str(exc))
        return E("call", e_args, (name,)), value

    def call_builtin(self, node: ast.Call, name: str):
        lo, hi = bi.FUNCTIONS[name]
        self.check_arity(node, name, lo, hi)
        if name == "odesolve":
            return self.call_odesolve(node)
        if node.kwargs:
            self.fail(f"`{name}` takes no keyword arguments", node.kwargs[0].span)
        pairs = self.exprs(node.args)
        if any(a.unknown for _, a in pairs):
            raise _Skip
        try:
            value = bi.function(name, [a for _, a in pairs])
        except ShapeError as exc:
            self.fail(f"bad arguments to `{name}`", node.span, str(exc))
        return E("call", tuple(e for e, _ in pairs), (name,)), value

    def call_odesolve(self, node: ast.Call):
        rhs, u0, times = node.args
        fe, fa = self.expr(rhs)
        if fa.fn is None:
            self.fail("odesolve's first argument must be a function `rhs(t, u, p)`", rhs.span)
        ue, ua = self.expr(u0)
        te, ta = self.expr(times)
        if len(ua.shape) != 1:
            self.fail(f"odesolve's initial state must be a vector, got shape {bi.fmt_shape(ua.shape)}", u0.span)
        if len(ta.shape) != 1:
            self.fail(f"odesolve's times must be a vector, got shape {bi.fmt_shape(ta.shape)}", times.span)
        kws: list[E] = []
        params = Abs(items=())
        for kw in node.kwargs:
            if kw.name not in bi.ODESOLVE_KEYWORDS:
                hint = did_you_mean(kw.name, bi.ODESOLVE_KEYWORDS)
                self.fail(f"odesolve has no keyword `{kw.name}`", kw.span,
                          f"did you mean `{hint}`?" if hint else "keywords: " + ", ".join(sorted(bi.ODESOLVE_KEYWORDS)))
            if kw.name == "solver":
                if not isinstance(kw.value, ast.Str) or kw.value.value not in bi.ODE_SOLVERS:
                    self.fail("odesolve's `solver` must be one of " + ", ".join(f'"{s}"' for s in bi.ODE_SOLVERS),
                              kw.value.span)
                kws.append(E("kw", (lit(kw.value.value, "str"),), ("solver",)))
                continue
            ke, ka = self.expr(kw.value)
            if kw.name == "params":
                params = ka
            elif ka.shape != () or (kw.name in ("rtol", "atol", "max_steps") and ka.value is None):
                self.fail(f"odesolve's `{kw.name}` must be a number" + (
                    " known when compiling" if kw.name != "t0" else ""), kw.value.span)
            kws.append(E("kw", (ke,), (kw.name,)))
        entry_name = fa.fn
        fdef = self.lookup_method(entry_name, 3, rhs.span)
        state = Abs(ua.shape, "float")
        fid, result = self.checker.specialise(fdef, [Abs((), "float"), state, _strip(params)], rhs.span)
        if result.shape != ua.shape:
            self.fail(f"the ODE right-hand side returns shape {bi.fmt_shape(result.shape)} "
                      f"but the state has shape {bi.fmt_shape(ua.shape)}", rhs.span,
                      "rhs(t, u, p) must return du/dt with the shape of u")
        if fid in self.checker.random_fns:
            self.fail("the ODE right-hand side draws random numbers", rhs.span, "ODE right-hand sides must be deterministic")
        return (E("call", (E("fnref", (), (fid,)), ue, te, *kws), ("odesolve",)),
                Abs((ta.shape[0], ua.shape[0]), "float"))

    def lookup_method(self, qualname: str, arity: int, span: ast.Span) -> FunctionDef:
        entry = self.find_function(qualname)
        if arity not in entry.methods:
            have = ", ".join(str(k) for k in sorted(entry.methods))
            self.fail(f"no method of `{entry.name}` takes {arity} argument{'s' if arity != 1 else ''}", span,
                      f"`{entry.name}` is defined with {have} argument(s)")
        return entry.methods[arity]

    def find_function(self, qualname: str) -> Entry:
        scope = self.checker.root
        parts = qualname.split(".")
        for part in parts[:-1]:
            scope = scope.entries[part].scope
        return scope.entries[parts[-1]]

    def call_user(self, node: ast.Call, entry: Entry):
        pairs = self.exprs(node.args)
        if any(a.unknown for _, a in pairs):
            raise _Skip
        for (_, a), arg in zip(pairs, node.args):
            if a.dist is not None:
                self.fail("functions take values, not distributions", arg.span)
        fdef = self.lookup_method(entry.qualname, len(node.args), node.span)
        fid, result = self.checker.specialise(fdef, [_strip(a) if a.fn is None else a for _, a in pairs], node.span)
        if fid in self.checker.random_fns and self.fid:
            self.checker.random_fns.add(self.fid)
        if self.context == "const" and fid in self.checker.random_fns:
            self.fail("constants cannot call functions that draw random numbers", node.span)
        value = result if result.value is not None and fid not in self.checker.random_fns else Abs(
            result.shape, result.dtype, items=result.items)
        return E("ucall", tuple(e for e, _ in pairs), (fid,)), value

    def call_extern(self, node: ast.Call, entry: Entry):
        ext = self.checker.externs[entry.qualname]
        if len(node.args) != len(ext.params):
            self.fail(f"`{ext.name}` takes {len(ext.params)} argument(s), got {len(node.args)}", node.span)
        pairs = self.exprs(node.args)
        if any(a.unknown for _, a in pairs):
            raise _Skip
        for (_, a), arg, param, shape in zip(pairs, node.args, ext.params, ext.param_shapes):
            if shape is not None and a.shape != shape:
                self.fail(f"argument `{param}` of `{ext.name}` must have shape {bi.fmt_shape(shape)}, "
                          f"got {bi.fmt_shape(a.shape)}", arg.span)
        if ext.returns is None:
            raise _Skip
        return E("xcall", tuple(e for e, _ in pairs), (ext.id,)), Abs(ext.returns, "float")


def _np_take(value: np.ndarray, index: list) -> np.ndarray:
    out = value
    axis = 0
    for idx in index:
        if isinstance(idx, slice):
            axis += 1
        elif isinstance(idx, np.ndarray):
            out = np.take(out, idx, axis=axis)
            axis += 1
        else:
            out = np.take(out, idx, axis=axis)
    return np.asarray(out)


def _strip(a: Abs) -> Abs:
    """Forget a distribution/function marker's extras but keep shape, dtype, value and tuple items."""
    if a.items is not None:
        return Abs(items=tuple(_strip(i) for i in a.items))
    return Abs(a.shape, a.dtype, a.value, dist=a.dist, support=a.support, fn=a.fn, unknown=a.unknown)


def _ann_text(ann: ast.TypeAnn) -> str:
    return ann.name + ("{" + ",".join(str(p) for p in ann.params) + "}" if ann.params else "")


_SIGNATURES = {
    "Normal": "Normal(μ, σ)", "HalfNormal": "HalfNormal(σ)", "LogNormal": "LogNormal(μ, σ)",
    "Uniform": "Uniform(a, b)", "TruncatedNormal": "TruncatedNormal(μ, σ, a, b)", "Beta": "Beta(α, β)",
    "Gamma": "Gamma(shape, rate)", "Exponential": "Exponential(rate)", "Cauchy": "Cauchy(μ, s)",
    "HalfCauchy": "HalfCauchy(s)", "StudentT": "StudentT(ν, μ, σ)", "Laplace": "Laplace(μ, b)",
    "Binomial": "Binomial(n, p)", "Poisson": "Poisson(λ)", "Bernoulli": "Bernoulli(p)",
    "Categorical": "Categorical(p)", "MvNormal": "MvNormal(μ, Σ)", "Dirichlet": "Dirichlet(α)",
    "SortedUniform": "SortedUniform(a, b, k)", "Mixture": "Mixture(weights, [D1, D2, …])", "iid": "iid(D, k)",
    "odesolve": "odesolve(rhs, u0, times; params = p)",
}


# ----------------------------------------------------------------------------- entry point


@dataclass(frozen=True)
class CheckResult:
    ir: ModelIR
    warnings: tuple[Diagnostic, ...]
    sources: dict[str, str] = field(compare=False, default_factory=dict)
    definitions: dict[str, str] = field(compare=False, default_factory=dict)


def check(program: ast.Program, sources: dict[str, str], *, model: Optional[str] = None,
          args: Optional[dict[str, Any]] = None) -> CheckResult:
    """Check a loaded program and build the IR of one model (the only one, or `model`)."""
    checker = Checker(sources)
    _collect_names(program.items, checker.all_names)
    checker.run_items(program.items, checker.root)
    top_models = [e for e in checker.root.entries.values() if e.kind == "model"]
    chosen: Optional[Entry] = None
    if model is not None:
        chosen = checker.root.entries.get(model)
        if chosen is None or chosen.kind != "model":
            hint = did_you_mean(model, [m.name for m in top_models])
            checker.err(f"no model named `{model}` in {program.file}", ast.NO_SPAN,
                        f"did you mean `{hint}`?" if hint else "models: " + (", ".join(m.name for m in top_models) or "none"))
            chosen = None
    elif len(top_models) == 1:
        chosen = top_models[0]
    elif not top_models:
        checker.err(f"{program.file} defines no model", ast.NO_SPAN,
                    "add `model Name(…) … end`, or compile the file that uses this one")
    else:
        checker.err(f"{program.file} defines several models: " + ", ".join(m.name for m in top_models),
                    ast.NO_SPAN, "choose one (`--model NAME` on the command line, `model=` in Python)")
    ir = checker.check_model(chosen, dict(args or {})) if chosen is not None else None
    if checker.errors or ir is None:
        raise HsbiError(checker.diags, sources)
    return CheckResult(ir, tuple(d for d in checker.diags if d.severity == "warning"), sources, checker.definitions)
