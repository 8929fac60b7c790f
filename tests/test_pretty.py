"""Tests for the formatter: AST → canonical text, and the round trip through `parse`."""

from __future__ import annotations

import pytest
from hierdsl.compiler import ast
from hierdsl.compiler.ast import (
    Binary,
    Call,
    Colon,
    End,
    Function,
    Index,
    MatrixLit,
    Name,
    Num,
    Range,
    Return,
    Ternary,
    TupleLit,
    Unary,
    VectorLit,
)
from hierdsl.compiler.parse import parse
from hierdsl.compiler.pretty import pretty, pretty_expr
from hypothesis import HealthCheck, given, settings
from strategies import expressions, programs
from test_parse import VALID_TEXTS

x, y, z = Name(("x",)), Name(("y",)), Name(("z",))


def one(value: int) -> Num:
    return Num(value, True)


# ----------------------------------------------------------------------------- canonical layout


def test_canonical_layout():
    messy = (
        "include( \"epidemics.hsbi\" )\n"
        "using .Epidemics:sir_rhs,other\n"
        "const N=1.0e6\n"
        "square( x )=x*x\n"
        "model   M( n::Int=3 )\n"
        "  σ~HalfNormal(1.0)\n"
        "  sites i in 1:n\n"
        "     observe y::Vector{2}~Normal([σ,σ],1.0)\n"
        "     input t = odesolve(f,u0,ts,params=(a,b))\n"
        "  end\n"
        "  r = if σ>1 ; 1 ; else ; 2 ; end\n"
        "end\n"
        "module Inner\n"
        "export g\n"
        "function g(v)\n"
        "  a,b=v;return a^-b\n"
        "end\n"
        "end\n"
    )
    assert pretty(parse(messy)) == (
        'include("epidemics.hsbi")\n'
        "using .Epidemics: sir_rhs, other\n"
        "const N = 1000000.0\n"
        "square(x) = x * x\n"
        "\n"
        "model M(n::Int = 3)\n"
        "    σ ~ HalfNormal(1.0)\n"
        "    sites i in 1:n\n"
        "        observe y::Vector{2} ~ Normal([σ, σ], 1.0)\n"
        "        input t = odesolve(f, u0, ts; params = (a, b))\n"
        "    end\n"
        "    r = if σ > 1\n"
        "        1\n"
        "    else\n"
        "        2\n"
        "    end\n"
        "end\n"
        "\n"
        "module Inner\n"
        "export g\n"
        "\n"
        "function g(v)\n"
        "    a, b = v\n"
        "    return a^-b\n"
        "end\n"
        "end\n"
    )


def test_extern_and_empty_bodies():
    text = (
        'extern host function cfd(re::Real)::Vector{64} = "mysims.cfd:run"\n'
        "extern function g(m::Matrix{2, 2})\n"
        "\n"
        "model Empty()\n"
        "end\n"
    )
    assert pretty(parse(text)) == text


@pytest.mark.parametrize("text", VALID_TEXTS)
def test_spec_examples_round_trip(text):
    program = parse(text)
    formatted = pretty(program)
    assert parse(formatted) == program
    assert pretty(parse(formatted)) == formatted


def test_long_function_returning_one_value_stays_long():
    function = Function("f", (), (Return(x),), short=False)
    program = ast.Program((function,))
    assert pretty(program) == "function f()\n    return x\nend\n"
    assert parse(pretty(program)) == program


# ----------------------------------------------------------------------------- expressions


@pytest.mark.parametrize("expr, text", [
    (Binary("-", Binary("-", x, y), z), "x - y - z"),
    (Binary("-", x, Binary("-", y, z)), "x - (y - z)"),
    (Binary("*", Binary("+", x, y), z), "(x + y) * z"),
    (Binary("+", x, Binary("*", y, z)), "x + y * z"),
    (Unary("-", Binary("^", x, one(2))), "-x^2"),
    (Binary("^", Unary("-", x), one(2)), "(-x)^2"),
    (Binary("^", x, Binary("^", y, z)), "x^y^z"),
    (Binary("^", Binary("^", x, y), z), "(x^y)^z"),
    (Binary("^", x, Unary("-", y)), "x^-y"),
    (Binary("<", Binary("<", x, y), z), "(x < y) < z"),
    (Binary("&&", Binary("||", x, y), z), "(x || y) && z"),
    (Unary("!", Binary("==", x, y)), "!(x == y)"),
    (Unary("-", Unary("-", x)), "--x"),
    (Ternary(Ternary(x, y, z), y, z), "(x ? y : z) ? y : z"),
    (Ternary(x, Ternary(x, y, z), Ternary(x, y, z)), "x ? x ? y : z : x ? y : z"),
    (Ternary(x, Range(one(1), None, y), z), "x ? 1:y : z"),
    (Range(one(1), one(2), Binary("-", y, one(1))), "1:2:y - 1"),
    (Range(Range(one(1), None, y), None, z), "(1:y):z"),
    (Index(Binary("+", x, y), (Colon(), Binary("-", End(), one(1)))), "(x + y)[:, end - 1]"),
    (Call(Name(("M", "f")), (x,), (ast.Keyword("k", y),)), "M.f(x; k = y)"),
    (Call(Name(("f",)), (), (ast.Keyword("k", y),)), "f(; k = y)"),
    (VectorLit((x, Unary("-", y))), "[x, -y]"),
    (MatrixLit(((x, Unary("-", y)), (z, x))), "[x -y; z x]"),
    (MatrixLit(((x,),)), "[x;]"),
    (TupleLit((x,)), "(x,)"),
    (TupleLit(()), "()"),
    (Num(0.1, False), "0.1"),
    (Num(1e-300, False), "1e-300"),
    (Num(2.0, False), "2.0"),
    (Num(10**20, True), "100000000000000000000"),
    (ast.Str('a "b"\n'), '"a \\"b\\"\\n"'),
])
def test_pretty_expr(expr, text):
    assert pretty_expr(expr) == text
    assert parse(f"const c = {text}\n").items[0].value == expr


def test_numbers_keep_value_and_intness():
    for num in [Num(1, True), Num(1.0, False), Num(1e16, False), Num(5e-324, False),
                Num(123456789.125, False)]:
        parsed = parse(f"const c = {pretty_expr(num)}").items[0].value
        assert parsed == num and parsed.is_int == num.is_int and type(parsed.value) is type(num.value)


# ----------------------------------------------------------------------------- properties


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs)
def test_round_trip(program):
    text = pretty(program)
    assert parse(text) == program
    assert pretty(parse(text)) == text


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(expressions(max_leaves=12))
def test_expression_round_trip(expr):
    (const,) = parse(f"const c = {pretty_expr(expr)}\n").items
    assert const.value == expr
