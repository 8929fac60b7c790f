"""Tests for the frontend parser: `.hsbi` text → AST, and syntax errors."""

from __future__ import annotations

import pytest
from hierdsl.compiler import ast
from hierdsl.compiler.ast import (
    Assign,
    Binary,
    Bool,
    Call,
    Colon,
    Const,
    End,
    Export,
    ExprStmt,
    Extern,
    Function,
    IfExpr,
    Include,
    Index,
    Keyword,
    MatrixLit,
    Model,
    Module,
    Name,
    Num,
    Param,
    Range,
    Return,
    Sites,
    Str,
    Ternary,
    Tilde,
    TupleLit,
    TypeAnn,
    Unary,
    Using,
    VectorLit,
)
from hierdsl.compiler.errors import HsbiError
from hierdsl.compiler.parse import _EXAMPLES, _probe, parse
from hierdsl.compiler.pretty import pretty
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lark.exceptions import UnexpectedToken

SPEC_FIRST_LOOK = """\
# hierarchical_gaussian_linear.hsbi
model HierarchicalGaussianLinear(n_sites::Int = 50)
    sigma ~ HalfNormal(1.0)                # global parameter: declared outside `sites`

    sites i in 1:n_sites                   # exchangeable sites; `i` names the site axis
        mu ~ Normal(0.0, 1.0)              # local parameter: one per site
        observe x ~ Normal(mu, sigma)      # the site's observation
    end
end
"""

SPEC_FUNCTIONS = """\
function two_moons(theta)
    a ~ Uniform(-pi/2, pi/2)        # inside a function `~` is simulator randomness, never inferred
    r ~ Normal(0.1, 0.01)
    p = [r * cos(a) + 0.25, r * sin(a)]
    z = [(theta[1] + theta[2]) / sqrt(2), (-theta[1] + theta[2]) / sqrt(2)]
    return p + [-abs(z[1]), z[2]]
end

square(x) = x * x                   # short form
"""

SPEC_MODULE = """\
# epidemics.hsbi
module Epidemics
export sir_prevalence
const N = 1.0e6
function sir_rhs(t, u, p)
    beta, gamma = p
    s, i, r = u
    f = beta * s * i / N
    return [-f, f - gamma * i, gamma * i]
end
function sir_prevalence(beta, gamma, times)
    u = odesolve(sir_rhs, [N - 1.0, 1.0, 0.0], times; params = (beta, gamma))
    return clamp(u[:, 2] / N, 0.0, 1.0)
end
end
"""

SPEC_OUTBREAK = """\
# outbreak.hsbi
include("epidemics.hsbi")          # path relative to this file; including a file twice is harmless
using .Epidemics                   # brings exported names into scope
using .Epidemics: sir_rhs          # brings the named names, exported or not

model Outbreak(n_sites::Int = 20)
    gamma ~ LogNormal(log(0.125), 0.2)
    sites j in 1:n_sites
        input t ~ SortedUniform(0.0, 160.0, 10)     # irregular observation times per site
        beta ~ LogNormal(log(0.4), 0.5)
        observe y ~ Binomial(1000, sir_prevalence(beta, gamma, t))
    end
end
"""

SPEC_EXTERN = """\
extern function drag_curve(re::Real, alpha::Real)::Vector{64}                 # JAX-traceable
extern host function cfd(re::Real)::Vector{64} = "mysims.cfd:run"             # run on the host
"""

VALID_TEXTS = [SPEC_FIRST_LOOK, SPEC_FUNCTIONS, SPEC_MODULE, SPEC_OUTBREAK, SPEC_EXTERN]


def n(name: str) -> Name:
    return Name(tuple(name.split(".")))


def i(value: int) -> Num:
    return Num(value, True)


def f(value: float) -> Num:
    return Num(value, False)


def call(func: str, *args: ast.Expr, **kwargs: ast.Expr) -> Call:
    return Call(n(func), args, tuple(Keyword(k, v) for k, v in kwargs.items()))


def expr(text: str) -> ast.Expr:
    """Parse `text` as the value of a constant."""
    (item,) = parse(f"const c = {text}\n").items
    return item.value


def body(text: str) -> tuple[ast.Stmt, ...]:
    """Parse `text` (already indented) as the body of a model."""
    (model,) = parse(f"model M()\n{text}\nend\n").items
    return model.body


# ----------------------------------------------------------------------------- spec examples


def test_spec_first_look():
    assert parse(SPEC_FIRST_LOOK) == ast.Program((
        Model("HierarchicalGaussianLinear", (Param("n_sites", TypeAnn("Int"), i(50)),), (
            Tilde("param", "sigma", None, call("HalfNormal", f(1.0))),
            Sites("i", i(1), n("n_sites"), (
                Tilde("param", "mu", None, call("Normal", f(0.0), f(1.0))),
                Tilde("observe", "x", None, call("Normal", n("mu"), n("sigma"))),
            )),
        )),
    ))


def test_spec_functions():
    two_moons, square = parse(SPEC_FUNCTIONS).items
    assert two_moons.name == "two_moons" and not two_moons.short
    assert two_moons.body[0] == Tilde(
        "param", "a", None,
        call("Uniform", Binary("/", Unary("-", n("pi")), i(2)), Binary("/", n("pi"), i(2))),
    )
    assert two_moons.body[-1] == Return(Binary("+", n("p"), VectorLit((
        Unary("-", call("abs", Index(n("z"), (i(1),)))),
        Index(n("z"), (i(2),)),
    ))))
    assert square == Function("square", (Param("x"),), (Return(Binary("*", n("x"), n("x"))),),
                              short=True)


def test_spec_module():
    (module,) = parse(SPEC_MODULE).items
    export, const, rhs, prevalence = module.body
    assert module.name == "Epidemics"
    assert export == Export(("sir_prevalence",))
    assert const == Const("N", f(1.0e6))
    assert rhs.body[0] == Assign("det", ("beta", "gamma"), None, n("p"))
    assert prevalence.body[0] == Assign("det", ("u",), None, call(
        "odesolve", n("sir_rhs"),
        VectorLit((Binary("-", n("N"), f(1.0)), f(1.0), f(0.0))), n("times"),
        params=TupleLit((n("beta"), n("gamma"))),
    ))
    assert prevalence.body[1] == Return(call(
        "clamp", Binary("/", Index(n("u"), (Colon(), i(2))), n("N")), f(0.0), f(1.0)))


def test_spec_outbreak():
    include, using_all, using_some, model = parse(SPEC_OUTBREAK).items
    assert include == Include("epidemics.hsbi")
    assert using_all == Using(("Epidemics",), None, True)
    assert using_some == Using(("Epidemics",), ("sir_rhs",), True)
    sites = model.body[1]
    assert sites.body[0] == Tilde("input", "t", None,
                                  call("SortedUniform", f(0.0), f(160.0), i(10)))


def test_spec_extern():
    traced, host = parse(SPEC_EXTERN).items
    assert traced == Extern("drag_curve", (Param("re", TypeAnn("Real")),
                                           Param("alpha", TypeAnn("Real"))),
                            TypeAnn("Vector", (64,)), host=False)
    assert host == Extern("cfd", (Param("re", TypeAnn("Real")),), TypeAnn("Vector", (64,)),
                          host=True, target="mysims.cfd:run")


# ----------------------------------------------------------------------------- expressions


@pytest.mark.parametrize("text, expected", [
    ("1", i(1)),
    ("2.5", f(2.5)),
    ("1e-3", f(1e-3)),
    ("1.0e6", f(1.0e6)),
    ("true", Bool(True)),
    ("false", Bool(False)),
    ("pi", n("pi")),
    ("Inf", n("Inf")),
    ("Epidemics.sir_prevalence", n("Epidemics.sir_prevalence")),
    ('"tsit5"', Str("tsit5")),
    ("-x^2", Unary("-", Binary("^", n("x"), i(2)))),
    ("a^b^c", Binary("^", n("a"), Binary("^", n("b"), n("c")))),
    ("2^-x", Binary("^", i(2), Unary("-", n("x")))),
    ("a - b - c", Binary("-", Binary("-", n("a"), n("b")), n("c"))),
    ("a + b * c", Binary("+", n("a"), Binary("*", n("b"), n("c")))),
    ("a .* b .+ c ./ d .- e .^ 2",
     Binary("-", Binary("+", Binary("*", n("a"), n("b")), Binary("/", n("c"), n("d"))),
            Binary("^", n("e"), i(2)))),
    ("!a && b || c", Binary("||", Binary("&&", Unary("!", n("a")), n("b")), n("c"))),
    ("a < b == (c >= d)", None),  # non-associative comparisons: an error (see below)
    ("a + 1 <= b", Binary("<=", Binary("+", n("a"), i(1)), n("b"))),
    ("x != y", Binary("!=", n("x"), n("y"))),
    ("x .== y", Binary("==", n("x"), n("y"))),
    ("c ? a : b", Ternary(n("c"), n("a"), n("b"))),
    ("c ? 1:2 : 3", Ternary(n("c"), Range(i(1), None, i(2)), i(3))),
    ("a ? b : c ? d : e", Ternary(n("a"), n("b"), Ternary(n("c"), n("d"), n("e")))),
    ("x > 0 || y ? a + 1 : b", Ternary(Binary("||", Binary(">", n("x"), i(0)), n("y")),
                                     Binary("+", n("a"), i(1)), n("b"))),
    ("1:n", Range(i(1), None, n("n"))),
    ("0:17:153", Range(i(0), i(17), i(153))),
    ("1:n-1", Range(i(1), None, Binary("-", n("n"), i(1)))),
    ("f.(x)", call("f", n("x"))),
    ("f()", call("f")),
    ("M.f(x, y; k = 1)", Call(n("M.f"), (n("x"), n("y")), (Keyword("k", i(1)),))),
    ("odesolve(f, u0, t; params = (b, g), rtol = 1e-6)",
     call("odesolve", n("f"), n("u0"), n("t"), params=TupleLit((n("b"), n("g"))), rtol=f(1e-6))),
    ("g(a, k = 2)", call("g", n("a"), k=i(2))),
    ("v[2]", Index(n("v"), (i(2),))),
    ("M[:, 2]", Index(n("M"), (Colon(), i(2)))),
    ("v[2:4]", Index(n("v"), (Range(i(2), None, i(4)),))),
    ("v[end]", Index(n("v"), (End(),))),
    ("v[end-1]", Index(n("v"), (Binary("-", End(), i(1)),))),
    ("v[min(end, 3)]", Index(n("v"), (call("min", End(), i(3)),))),
    ("v[w[end]][1]", Index(Index(n("v"), (Index(n("w"), (End(),)),)), (i(1),))),
    ("[a, b, c]", VectorLit((n("a"), n("b"), n("c")))),
    ("[]", VectorLit(())),
    ("[a]", VectorLit((n("a"),))),
    ("[a b]", MatrixLit(((n("a"), n("b")),))),
    ("[a b; c d]", MatrixLit(((n("a"), n("b")), (n("c"), n("d"))))),
    ("[a b\n c d]", MatrixLit(((n("a"), n("b")), (n("c"), n("d"))))),
    ("[a;]", MatrixLit(((n("a"),),))),
    ("[a; b]", MatrixLit(((n("a"),), (n("b"),)))),
    ("[1 -2]", MatrixLit(((i(1), Unary("-", i(2))),))),
    ("[1 - 2]", VectorLit((Binary("-", i(1), i(2)),))),
    ("[1-2]", VectorLit((Binary("-", i(1), i(2)),))),
    ("[f(a, b) c[1] (d)]", MatrixLit(((call("f", n("a"), n("b")), Index(n("c"), (i(1),)),
                                        n("d")),))),
    ("[\n    1, 2,\n    3,\n]", VectorLit((i(1), i(2), i(3)))),
    ("(a, b)", TupleLit((n("a"), n("b")))),
    ("(a,)", TupleLit((n("a"),))),
    ("(a)", n("a")),
    ("()", TupleLit(())),
    ("(a +\n b)", Binary("+", n("a"), n("b"))),
    ("a +\n b", Binary("+", n("a"), n("b"))),
    ("if a 1 elseif b 2 else 3 end",
     IfExpr(((n("a"), (ExprStmt(i(1)),)), (n("b"), (ExprStmt(i(2)),))), (ExprStmt(i(3)),))),
    ("f(if c\n  1\nelse\n  2\nend)",
     call("f", IfExpr(((n("c"), (ExprStmt(i(1)),)),), (ExprStmt(i(2)),)))),
])
def test_expressions(text, expected):
    if expected is None:
        with pytest.raises(HsbiError, match="comparisons cannot be chained"):
            expr(text)
    else:
        assert expr(text) == expected


# ----------------------------------------------------------------------------- statements and items


def test_model_statements():
    stmts = body(
        "    a ~ Normal(0, 1)\n"
        "    b::Vector{3} ~ Dirichlet(w)\n"
        "    c = a + 1\n"
        "    d::Real = 2\n"
        "    e, g = pair(a)\n"
        "    sites k in 1:n\n"
        "        observe y ~ Normal(a, 1)\n"
        "        observe z = y * 2\n"
        "        input t ~ Uniform(0, 1)\n"
        "        input s::Int = 3\n"
        "    end\n"
        "    w = if a > 0 1.0 else 0.0 end\n"
        "    f(a); return a"
    )
    assert stmts == (
        Tilde("param", "a", None, call("Normal", i(0), i(1))),
        Tilde("param", "b", TypeAnn("Vector", (3,)), call("Dirichlet", n("w"))),
        Assign("det", ("c",), None, Binary("+", n("a"), i(1))),
        Assign("det", ("d",), TypeAnn("Real"), i(2)),
        Assign("det", ("e", "g"), None, call("pair", n("a"))),
        Sites("k", i(1), n("n"), (
            Tilde("observe", "y", None, call("Normal", n("a"), i(1))),
            Assign("observe", ("z",), None, Binary("*", n("y"), i(2))),
            Tilde("input", "t", None, call("Uniform", i(0), i(1))),
            Assign("input", ("s",), TypeAnn("Int"), i(3)),
        )),
        Assign("det", ("w",), None,
               IfExpr(((Binary(">", n("a"), i(0)), (ExprStmt(f(1.0)),)),), (ExprStmt(f(0.0)),))),
        ExprStmt(call("f", n("a"))),
        Return(n("a")),
    )


def test_items():
    text = (
        "const K = 3\n"
        "using M\n"
        "using .A.B: x, y\n"
        "export p, q\n"
        "module Inner\n"
        "    const L = 1\n"
        "end\n"
        "extern function g(x)\n"
        "extern host function h(v::Matrix{2,2}, k::Int = 1)\n"
        "function w(x::Real, y = 2.0)\n"
        "    x + y\n"
        "end\n"
        "model Empty()\n"
        "end\n"
    )
    assert parse(text).items == (
        Const("K", i(3)),
        Using(("M",), None, relative=False),
        Using(("A", "B"), ("x", "y"), relative=True),
        Export(("p", "q")),
        Module("Inner", (Const("L", i(1)),)),
        Extern("g", (Param("x"),), None, host=False),
        Extern("h", (Param("v", TypeAnn("Matrix", (2, 2))), Param("k", TypeAnn("Int"), i(1))),
               None, host=True),
        Function("w", (Param("x", TypeAnn("Real")), Param("y", None, f(2.0))),
                 (ExprStmt(Binary("+", n("x"), n("y"))),)),
        Model("Empty", (), ()),
    )


def test_empty_and_blank_programs():
    assert parse("").items == ()
    assert parse("\n\n  # only a comment\n;\n").items == ()


def test_comments_and_unicode():
    text = (
        "#= a block comment\n"
        "   #= nested =# still a comment\n"
        "=#\n"
        "const σ = 1.5 # trailing comment\n"
        "const μ₀ = #= inline =# σ * 2\n"
        "const θ_1 = μ₀\n"
    )
    assert parse(text).items == (
        Const("σ", f(1.5)),
        Const("μ₀", Binary("*", n("σ"), i(2))),
        Const("θ_1", n("μ₀")),
    )


def test_semicolons_separate_statements():
    assert body("    a = 1; b = 2;") == (Assign("det", ("a",), None, i(1)),
                                         Assign("det", ("b",), None, i(2)))


def test_int_and_float_literals_differ():
    assert expr("1") != expr("1.0")
    assert expr("1").is_int and isinstance(expr("1").value, int)
    assert not expr("1e3").is_int and expr("1e3").value == 1000.0


# ----------------------------------------------------------------------------- spans


def test_spans():
    program = parse(SPEC_FIRST_LOOK, file="hier.hsbi")
    (model,) = program.items
    assert model.span == ast.Span("hier.hsbi", 2, 1, 9, 4)
    sigma, sites = model.body
    assert sigma.span == ast.Span("hier.hsbi", 3, 5, 3, 28)
    assert sigma.dist.span == ast.Span("hier.hsbi", 3, 13, 3, 28)
    assert sigma.dist.args[0].span == ast.Span("hier.hsbi", 3, 24, 3, 27)
    assert sites.span == ast.Span("hier.hsbi", 5, 5, 8, 8)
    observe = sites.body[1]
    assert observe.span == ast.Span("hier.hsbi", 7, 9, 7, 38)
    assert observe.dist.args[1].span == ast.Span("hier.hsbi", 7, 32, 7, 37)
    assert model.params[0].span == ast.Span("hier.hsbi", 2, 34, 2, 51)


def test_spans_count_unicode_characters_as_one_column():
    (const,) = parse("const σ = μ + θ\n").items
    assert const.value.right.span == ast.Span("<string>", 1, 15, 1, 16)


# ----------------------------------------------------------------------------- syntax errors


@pytest.mark.parametrize("text, rendered", [
    (
        "model M()\n    x ~ Normal(0, 1)\n",
        "error: missing `end` for this `model`\n"
        " --> bad.hsbi:1:1\n"
        "  |\n"
        "1 | model M()\n"
        "  | ^^^^^ this `model` block is never closed\n"
        "  = note: the file ends before its `end`",
    ),
    (
        "model M()\n    x ~ Normal(0, 1)\n\nfunction g(x)\n    x\nend\n",
        "error: missing `end` for this `model`\n"
        " --> bad.hsbi:1:1\n"
        "  |\n"
        "1 | model M()\n"
        "  | ^^^^^ this `model` block is never closed\n"
        "  = note: found keyword `function` on line 4 before its `end`",
    ),
    (
        "const x = .5",
        "error: `.5` is not a number\n"
        " --> bad.hsbi:1:11\n"
        "  |\n"
        "1 | const x = .5\n"
        "  |           ^^ write `0.5`",
    ),
    (
        "model M()\n    x ~ Normal(0, 1\n    y ~ Normal(0, 1)\nend\n",
        "error: unclosed `(`\n"
        " --> bad.hsbi:2:15\n"
        "  |\n"
        "2 |     x ~ Normal(0, 1\n"
        "  |               ^ this `(` is never closed\n"
        "  = note: still inside it at line 3, where the name `y` was unexpected",
    ),
    (
        "const x = [1, 2)\n",
        "error: mismatched `)`\n"
        " --> bad.hsbi:1:16\n"
        "  |\n"
        "1 | const x = [1, 2)\n"
        "  |                ^ expected `]` to close the `[` on line 1, column 11",
    ),
    (
        "model M()\n    y = x = 1\nend\n",
        "error: `=` assigns; use `==` to compare\n"
        " --> bad.hsbi:2:11\n"
        "  |\n"
        "2 |     y = x = 1\n"
        "  |           ^ write `==` for equality\n"
        "  = note: found `=`",
    ),
    (
        "model M()\n    input = 3\nend\n",
        "error: `input` is a keyword and cannot be used as a name\n"
        " --> bad.hsbi:2:5\n"
        "  |\n"
        "2 |     input = 3\n"
        "  |     ^^^^^ choose another name",
    ),
    (
        "model M()\n    sites i in 1:n\n        observe y\n    end\nend\n",
        "error: missing `~` or `=` after an observed or input name\n"
        " --> bad.hsbi:3:18\n"
        "  |\n"
        "3 |         observe y\n"
        "  |                  ^ write `observe y ~ Dist(…)` or `observe y = expr`\n"
        "  = note: found end of line",
    ),
    (
        "const x = 1 2\n",
        "error: unexpected text after the end of the statement\n"
        " --> bad.hsbi:1:13\n"
        "  |\n"
        "1 | const x = 1 2\n"
        "  |             ^ put each statement on its own line, or separate them with `;`\n"
        "  = note: found number `2`",
    ),
])
def test_rendered_syntax_errors(text, rendered):
    with pytest.raises(HsbiError) as info:
        parse(text, file="bad.hsbi")
    assert str(info.value) == rendered


@pytest.mark.parametrize("text, headline, line, column", [
    ("const x = f(1, 2", "unclosed `(`", 1, 12),
    ("const x = f(a))", "unmatched `)`", 1, 15),
    ("const x = c ? 1:2", "a conditional needs spaces around its `:`", 1, 18),
    ("const x = 1 < 2 < 3", "comparisons cannot be chained", 1, 17),
    ("const x = f (1)", "a function name must be followed directly by `(`", 1, 13),
    ("const x = f(a b)", "missing operator or `,` between two expressions", 1, 15),
    ("const x = 1.", "`1.` is not a number", 1, 11),
    ("const x = 2x", "a number cannot be followed directly by a name", 1, 11),
    ('const x = "abc', "unterminated string", 1, 11),
    ("#= abc", "unterminated block comment", 1, 1),
    ("const x = a & b", "unexpected character `&`", 1, 13),
    ("function f(x) = x", "the long form of a function has no `=`", 1, 15),
    ("model M()\n    sites i in 1:2:n\n    end\nend", "`sites` needs a range `start:count`", 2, 16),
    ("model M()\n    sites i = 1:n\n    end\nend", "`sites` needs an index and a range", 2, 13),
    ("const x = f(a = 1, 2)", "positional argument after a keyword argument", 1, 20),
    ("extern function f(x::Vector{2.5})", "a type parameter must be a whole number", 1, 29),
    ("x ~ Normal(0, 1)", "only definitions may appear at the top level", 1, 3),
    ("end", "`end` without an open block", 1, 1),
    ("const x = 1 +", "incomplete expression", 1, 14),
    ("model M()\n    end = 2\nend", "unexpected `=`", 2, 9),
    ("const model = 1", "`model` is a keyword and cannot be used as a name", 1, 7),
    ("function f(x)\n    if x = 1\n        1\n    end\nend", "`=` assigns; use `==` to compare",
     2, 10),
])
def test_syntax_error_headlines(text, headline, line, column):
    with pytest.raises(HsbiError) as info:
        parse(text, file="bad.hsbi")
    (diagnostic,) = info.value.diagnostics
    assert diagnostic.message == headline
    assert (diagnostic.span.line, diagnostic.span.column) == (line, column)
    rendered = str(info.value)
    assert f"bad.hsbi:{line}:{column}" in rendered and "^" in rendered


@pytest.mark.parametrize("snippet", [s for snippets in _EXAMPLES.values() for s in snippets])
def test_error_examples_are_parser_errors(snippet):
    """Every labelled example must fail in the parser (not parse, nor fail in the tokeniser)."""
    with pytest.raises(UnexpectedToken):
        _probe(snippet)


def test_deep_nesting_is_an_hsbi_error():
    with pytest.raises(HsbiError):
        parse("const x = " + "[" * 5000 + "1" + "]" * 5000)


# ----------------------------------------------------------------------------- fuzzing


def _parses_or_hsbi_error(text: str) -> None:
    try:
        program = parse(text, file="fuzz.hsbi")
    except HsbiError as exc:
        assert str(exc).startswith("error: ")
        return
    # Whatever parses must also survive the formatter.
    assert parse(pretty(program)) == program


_FUZZ_ALPHABET = st.sampled_from(
    list("abxyσ_019 .,;:()[]{}+-*/^<>=!?~&|#\"\n\t") +
    ["end", "if", "else", "model", "sites", "in", "observe", "function", "#=", "=#", "::", "1e-3"]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_FUZZ_ALPHABET, max_size=40).map("".join))
def test_fuzz_random_text(text):
    _parses_or_hsbi_error(text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=60))
def test_fuzz_arbitrary_unicode(text):
    _parses_or_hsbi_error(text)


_MUTATION_PIECES = st.sampled_from(
    list(" \n()[],;:=~.+-*^?#\"") + ["end", "sites", "observe", "if", "else", " ? ", " : ", ".5",
                                      "[1 -2]", "x", "1", "#=", "function"]
)


@st.composite
def mutated_texts(draw) -> str:
    text = draw(st.sampled_from(VALID_TEXTS))
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(text)))
        action = draw(st.sampled_from(["delete", "insert", "replace", "delete_span"]))
        if action == "delete":
            text = text[:position] + text[position + 1:]
        elif action == "delete_span":
            text = text[:position] + text[position + draw(st.integers(1, 12)):]
        else:
            piece = draw(_MUTATION_PIECES)
            skip = 1 if action == "replace" else 0
            text = text[:position] + piece + text[position + skip:]
    return text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_texts())
def test_fuzz_mutations_of_valid_models(text):
    _parses_or_hsbi_error(text)
