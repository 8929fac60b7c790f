"""Frontend stage: the abstract syntax tree of a `.hsbi` file.

Input: nothing (these are the node types); output of `parse`: a `Program`.

Every node is a frozen dataclass carrying a `span` (file, line, column, end line, end column).
Spans are excluded from equality and hashing, so two programs that differ only in layout or
comments compare equal; this is what makes `parse(pretty(ast)) == ast` meaningful.

Dotted operators (`.+`), broadcast calls (`f.(x)`) and the two keyword separators are
normalised away by the parser: they mean the same thing, so the AST has one form for each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union


@dataclass(frozen=True)
class Span:
    """A half-open source region: 1-based line and column of its first and one-past-last character."""

    file: str
    line: int
    column: int
    end_line: int
    end_column: int

    def to_json(self) -> dict:
        return {
            "file": self.file,
            "line": self.line,
            "column": self.column,
            "end_line": self.end_line,
            "end_column": self.end_column,
        }


NO_SPAN = Span("<builder>", 0, 0, 0, 0)


def _span() -> Span:
    return field(default=NO_SPAN, compare=False, repr=False, kw_only=True)


# ----------------------------------------------------------------------------- annotations


@dataclass(frozen=True)
class TypeAnn:
    """A type annotation: `Real`, `Int`, `Bool`, `Vector`, `Vector{3}`, `Matrix{2,2}`, `Tuple`."""

    name: str
    params: tuple[int, ...] = ()
    span: Span = _span()


# ----------------------------------------------------------------------------- expressions


@dataclass(frozen=True)
class Num:
    """A numeric literal. `is_int` keeps `1` and `1.0` apart (they have different dtypes)."""

    value: float | int
    is_int: bool
    span: Span = _span()


@dataclass(frozen=True)
class Bool:
    value: bool
    span: Span = _span()


@dataclass(frozen=True)
class Str:
    value: str
    span: Span = _span()


@dataclass(frozen=True)
class Name:
    """A plain or qualified name: `x`, `Epidemics.sir_prevalence` (parts `("Epidemics", "sir_prevalence")`)."""

    parts: tuple[str, ...]
    span: Span = _span()

    @property
    def dotted(self) -> str:
        return ".".join(self.parts)


@dataclass(frozen=True)
class End:
    """`end` inside an index expression: the length of the indexed axis."""

    span: Span = _span()


@dataclass(frozen=True)
class Colon:
    """A bare `:` index: the whole axis."""

    span: Span = _span()


@dataclass(frozen=True)
class Unary:
    op: str  # "-", "+", "!"
    operand: "Expr"
    span: Span = _span()


@dataclass(frozen=True)
class Binary:
    """A binary operator. `op` is one of + - * / ^ < <= > >= == != && ||."""

    op: str
    left: "Expr"
    right: "Expr"
    span: Span = _span()


@dataclass(frozen=True)
class Ternary:
    cond: "Expr"
    then: "Expr"
    otherwise: "Expr"
    span: Span = _span()


@dataclass(frozen=True)
class Range:
    """An inclusive range `start:stop` or `start:step:stop`."""

    start: "Expr"
    step: Optional["Expr"]
    stop: "Expr"
    span: Span = _span()


@dataclass(frozen=True)
class Keyword:
    name: str
    value: "Expr"
    span: Span = _span()


@dataclass(frozen=True)
class Call:
    """A call `f(a, b; k = v)`; `func` is a `Name`. Broadcast calls `f.(x)` parse to the same node."""

    func: Name
    args: tuple["Expr", ...]
    kwargs: tuple[Keyword, ...] = ()
    span: Span = _span()


@dataclass(frozen=True)
class Index:
    """`value[i, j]`; each index is an expression, a `Range`, or `Colon`; `End` may appear inside."""

    value: "Expr"
    indices: tuple["Expr", ...]
    span: Span = _span()


@dataclass(frozen=True)
class VectorLit:
    items: tuple["Expr", ...]
    span: Span = _span()


@dataclass(frozen=True)
class MatrixLit:
    """`[a b; c d]`: rows of equal length (checked later)."""

    rows: tuple[tuple["Expr", ...], ...]
    span: Span = _span()


@dataclass(frozen=True)
class TupleLit:
    items: tuple["Expr", ...]
    span: Span = _span()


@dataclass(frozen=True)
class IfExpr:
    """`if c1 … elseif c2 … else … end` as an expression; each branch is a block of statements."""

    branches: tuple[tuple["Expr", tuple["Stmt", ...]], ...]
    otherwise: tuple["Stmt", ...]
    span: Span = _span()


Expr = Union[
    Num, Bool, Str, Name, End, Colon, Unary, Binary, Ternary, Range, Call, Index,
    VectorLit, MatrixLit, TupleLit, IfExpr,
]


# ----------------------------------------------------------------------------- statements


@dataclass(frozen=True)
class Tilde:
    """`[observe|input] name[::T] ~ dist`.

    `role` is "param" (a bare `~`), "observe" or "input". Inside a function body `~` is simulator
    randomness and `role` is always "param".
    """

    role: str
    name: str
    annotation: Optional[TypeAnn]
    dist: "Expr"
    span: Span = _span()


@dataclass(frozen=True)
class Assign:
    """`[observe|input] a[::T] = expr` or a destructuring `a, b = expr` (role "det" only)."""

    role: str  # "det", "observe", "input"
    targets: tuple[str, ...]
    annotation: Optional[TypeAnn]
    value: "Expr"
    span: Span = _span()


@dataclass(frozen=True)
class Return:
    value: "Expr"
    span: Span = _span()


@dataclass(frozen=True)
class ExprStmt:
    value: "Expr"
    span: Span = _span()


@dataclass(frozen=True)
class Sites:
    """`sites i in start:count … end`."""

    index: str
    start: "Expr"
    count: "Expr"
    body: tuple["Stmt", ...]
    span: Span = _span()


Stmt = Union[Tilde, Assign, Return, ExprStmt, Sites]


# ----------------------------------------------------------------------------- top level


@dataclass(frozen=True)
class Param:
    """A function parameter or model argument: `name[::T][ = default]`."""

    name: str
    annotation: Optional[TypeAnn] = None
    default: Optional["Expr"] = None
    span: Span = _span()


@dataclass(frozen=True)
class Const:
    name: str
    value: "Expr"
    span: Span = _span()


@dataclass(frozen=True)
class Function:
    """A function definition; `short` records the one-line form `f(x) = expr` for the formatter."""

    name: str
    params: tuple[Param, ...]
    body: tuple[Stmt, ...]
    short: bool = False
    span: Span = _span()


@dataclass(frozen=True)
class Extern:
    """`extern [host] function name(params)::Ret [= "module:attr"]`."""

    name: str
    params: tuple[Param, ...]
    returns: Optional[TypeAnn]
    host: bool
    target: Optional[str] = None
    span: Span = _span()


@dataclass(frozen=True)
class Model:
    name: str
    params: tuple[Param, ...]
    body: tuple[Stmt, ...]
    span: Span = _span()


@dataclass(frozen=True)
class Include:
    path: str
    span: Span = _span()


@dataclass(frozen=True)
class Using:
    """`using .M`, `using .M: a, b`, `using M.N`; `relative` records the leading dot."""

    module: tuple[str, ...]
    names: Optional[tuple[str, ...]]
    relative: bool = True
    span: Span = _span()


@dataclass(frozen=True)
class Export:
    names: tuple[str, ...]
    span: Span = _span()


@dataclass(frozen=True)
class Module:
    name: str
    body: tuple["Item", ...]
    span: Span = _span()


Item = Union[Const, Function, Extern, Model, Include, Using, Export, Module]


@dataclass(frozen=True)
class Program:
    items: tuple[Item, ...]
    file: str = field(default="<string>", compare=False)
    span: Span = _span()
