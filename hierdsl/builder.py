"""Public API, builder: write a model in Python instead of a `.hsbi` file.

The builder produces the same AST the parser would, and goes through the same checks, so a model
built here has exactly the IR (and hash) of the equivalent file::

    import hierdsl as hd
    from hierdsl.builder import ModelBuilder, dist, fn

    b = ModelBuilder("GaussianLinear", n_sites=50)
    sigma = b.param("sigma", dist.HalfNormal(1.0))
    with b.sites("i", "n_sites") as site:
        mu = site.param("mu", dist.Normal(0.0, 1.0))
        site.observe("x", dist.Normal(mu, sigma))
    model = b.compile()

Expressions are `Ex` objects: Python numbers, lists and nested lists convert automatically;
arithmetic and comparison operators, indexing (1-based, as in the language) and calls through
`dist.<Name>(…)`, `fn.<name>(…)` and functions defined on the builder build the tree.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

from hierdsl.compiler import ast
from hierdsl.compiler.builtins import DISTRIBUTIONS, FUNCTIONS

ExLike = Union["Ex", int, float, bool, Sequence]


class Ex:
    """A model expression under construction (wraps an AST expression)."""

    __slots__ = ("node",)
    __array_priority__ = 1000  # keep NumPy scalars from hijacking the operators

    def __init__(self, node):
        self.node = node

    def _bin(self, op: str, other: ExLike, flip: bool = False) -> "Ex":
        left, right = (to_node(other), self.node) if flip else (self.node, to_node(other))
        return Ex(ast.Binary(op, left, right))

    __add__ = lambda s, o: s._bin("+", o)
    __radd__ = lambda s, o: s._bin("+", o, True)
    __sub__ = lambda s, o: s._bin("-", o)
    __rsub__ = lambda s, o: s._bin("-", o, True)
    __mul__ = lambda s, o: s._bin("*", o)
    __rmul__ = lambda s, o: s._bin("*", o, True)
    __truediv__ = lambda s, o: s._bin("/", o)
    __rtruediv__ = lambda s, o: s._bin("/", o, True)
    __pow__ = lambda s, o: s._bin("^", o)
    __rpow__ = lambda s, o: s._bin("^", o, True)
    __lt__ = lambda s, o: s._bin("<", o)
    __le__ = lambda s, o: s._bin("<=", o)
    __gt__ = lambda s, o: s._bin(">", o)
    __ge__ = lambda s, o: s._bin(">=", o)

    def eq(self, other: ExLike) -> "Ex":
        """`==` (Python's `==` keeps its usual meaning on `Ex`)."""
        return self._bin("==", other)

    def __neg__(self) -> "Ex":
        return Ex(ast.Unary("-", self.node))

    def __getitem__(self, index) -> "Ex":
        items = index if isinstance(index, tuple) else (index,)
        return Ex(ast.Index(self.node, tuple(_index_node(i) for i in items)))

    def __repr__(self) -> str:
        from hierdsl.compiler.pretty import pretty_expr

        return f"Ex({pretty_expr(self.node)})"


class _End:
    """`end` inside an index: `v[end]` is `v[hd.end]`."""


end = _End()


def _index_node(item):
    if item is end:
        return ast.End()
    if isinstance(item, slice):
        if item.start is None and item.stop is None and item.step is None:
            return ast.Colon()
        step = None if item.step is None else to_node(item.step)
        return ast.Range(_index_node(item.start), step, _index_node(item.stop))
    return to_node(item)


def to_node(value: ExLike):
    """Convert a Python value or `Ex` to an AST expression."""
    if isinstance(value, Ex):
        return value.node
    if isinstance(value, _End):
        return ast.End()
    if isinstance(value, bool):
        return ast.Bool(value)
    if isinstance(value, int):
        return ast.Num(value, True)
    if isinstance(value, float):
        return ast.Num(value, False)
    if isinstance(value, str):
        return ast.Str(value)
    if hasattr(value, "tolist"):  # NumPy arrays and scalars
        return to_node(value.tolist())
    if isinstance(value, tuple):
        return ast.TupleLit(tuple(to_node(v) for v in value))
    if isinstance(value, list):
        if value and all(isinstance(row, list) for row in value):
            return ast.MatrixLit(tuple(tuple(to_node(x) for x in row) for row in value))
        return ast.VectorLit(tuple(to_node(v) for v in value))
    raise TypeError(f"cannot use {type(value).__name__} {value!r} in a model expression")


def _call(name: Sequence[str], args, kwargs) -> Ex:
    return Ex(ast.Call(ast.Name(tuple(name)), tuple(to_node(a) for a in args),
                       tuple(ast.Keyword(k, to_node(v)) for k, v in kwargs.items())))


class _Namespace:
    def __init__(self, names, kind: str):
        self._names = set(names)
        self._kind = kind

    def __getattr__(self, name: str) -> Callable[..., Ex]:
        if name.startswith("_") or name not in self._names:
            raise AttributeError(f"no built-in {self._kind} `{name}`")
        return lambda *args, **kwargs: _call((name,), args, kwargs)


dist = _Namespace(DISTRIBUTIONS, "distribution")
fn = _Namespace(FUNCTIONS, "function")
pi = Ex(ast.Name(("pi",)))
Inf = Ex(ast.Name(("Inf",)))


def _type(annotation: Optional[str]) -> Optional[ast.TypeAnn]:
    """Parse `"Vector{3}"`-style annotation text."""
    if annotation is None:
        return None
    name, _, rest = annotation.partition("{")
    params = tuple(int(p) for p in rest.rstrip("}").split(",")) if rest else ()
    return ast.TypeAnn(name.strip(), params)


def _param(spec) -> ast.Param:
    if isinstance(spec, tuple):
        name, annotation = spec
        return ast.Param(name, _type(annotation))
    return ast.Param(spec)


class Block:
    """Statements of a model body, a sites block or a function body."""

    def __init__(self):
        self.statements: list = []

    def _ref(self, name: str) -> Ex:
        return Ex(ast.Name((name,)))

    def param(self, name: str, distribution: Ex, *, annotation: Optional[str] = None) -> Ex:
        """`name ~ distribution`: a parameter (global or local) — or, in a function, randomness."""
        self.statements.append(ast.Tilde("param", name, _type(annotation), to_node(distribution)))
        return self._ref(name)

    draw = param

    def let(self, name: Union[str, Sequence[str]], value: ExLike, *, annotation: Optional[str] = None):
        """`name = value` (or `a, b = value` with a list of names)."""
        targets = (name,) if isinstance(name, str) else tuple(name)
        self.statements.append(ast.Assign("det", targets, _type(annotation), to_node(value)))
        return self._ref(targets[0]) if len(targets) == 1 else tuple(self._ref(t) for t in targets)


class SitesBlock(Block):
    def observe(self, name: str, value: Ex, *, annotation: Optional[str] = None) -> Ex:
        """`observe name ~ D` when `value` is a distribution call, else `observe name = value`."""
        self.statements.append(_role_statement("observe", name, value, annotation))
        return self._ref(name)

    def input(self, name: str, value: Ex, *, annotation: Optional[str] = None) -> Ex:
        """`input name ~ D` when `value` is a distribution call, else `input name = value`."""
        self.statements.append(_role_statement("input", name, value, annotation))
        return self._ref(name)


def _role_statement(role: str, name: str, value: ExLike, annotation):
    node = to_node(value)
    if isinstance(node, ast.Call) and len(node.func.parts) == 1 and node.func.parts[0] in DISTRIBUTIONS:
        return ast.Tilde(role, name, _type(annotation), node)
    return ast.Assign(role, (name,), _type(annotation), node)


class FunctionBuilder(Block):
    pass


class ModelBuilder(Block):
    """Builds a program holding constants, functions, externs and one model."""

    def __init__(self, name: str, **args: Any):
        super().__init__()
        self.name = name
        self.args = args
        self.annotations: dict[str, str] = {}
        self.items: list = []
        self.functions: dict[str, Callable] = {}

    def arg(self, name: str, default: Any, annotation: Optional[str] = None) -> Ex:
        """Declare a model argument with a default (keyword arguments of the constructor do too)."""
        self.args[name] = default
        if annotation:
            self.annotations[name] = annotation
        return self._ref(name)

    def const(self, name: str, value: ExLike) -> Ex:
        self.items.append(ast.Const(name, to_node(value)))
        return self._ref(name)

    def function(self, name: str, params: Sequence, body: Callable[..., ExLike], *, short: bool = False):
        """Define `function name(params) … end`; `body(fb, *param_refs)` adds statements and returns the value."""
        fb = FunctionBuilder()
        refs = [Ex(ast.Name((_param(p).name,))) for p in params]
        result = body(fb, *refs)
        stmts = (*fb.statements, ast.Return(to_node(result)))
        self.items.append(ast.Function(name, tuple(_param(p) for p in params), stmts, short))
        return lambda *args: _call((name,), args, {})

    def extern(self, name: str, params: Sequence, returns: str, *, host: bool = False,
               target: Optional[str] = None, python: Optional[Callable] = None):
        """Declare `extern [host] function name(params)::returns`, optionally binding `python`."""
        self.items.append(ast.Extern(name, tuple(_param(p) for p in params), _type(returns), host, target))
        if python is not None:
            self.functions[name] = python
        return lambda *args: _call((name,), args, {})

    @contextmanager
    def sites(self, index: str, count: Union[str, int]) -> Iterator[SitesBlock]:
        block = SitesBlock()
        yield block
        count_node = ast.Name((count,)) if isinstance(count, str) else to_node(count)
        self.statements.append(ast.Sites(index, ast.Num(1, True), count_node, tuple(block.statements)))

    def program(self) -> ast.Program:
        params = tuple(
            ast.Param(k, _type(self.annotations.get(k) or ("Int" if isinstance(v, int) and not isinstance(v, bool) else None)),
                      to_node(v))
            for k, v in self.args.items()
        )
        model = ast.Model(self.name, params, tuple(self.statements))
        return ast.Program((*self.items, model), file="<builder>")

    def compile(self, *, functions: Optional[Mapping[str, Callable]] = None, args=None):
        from hierdsl.model import compile_program

        return compile_program(self.program(), functions={**self.functions, **(functions or {})}, args=args)
