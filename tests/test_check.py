"""Checking stage: examples compile to their golden IR, bad programs give their golden errors,
the IR is stable (hash, JSON round trip), and the builder API gives the same IR as files."""

from __future__ import annotations

import os

import pytest

import hierdsl
from hierdsl.compiler.errors import HsbiError
from hierdsl.compiler.ir import ModelIR

from golden_cases import (
    BAD, EXAMPLES, IR_DIR, ROOT, bad_files, cwd, example_files, render_bad, render_example_ir,
)


@pytest.mark.parametrize("name", example_files())
def test_example_ir_matches_golden(name):
    with open(os.path.join(IR_DIR, name.replace(".hsbi", ".json")), encoding="utf-8") as f:
        expected = f.read()
    assert render_example_ir(name) == expected, "run `python tests/golden_cases.py` and review the diff"


@pytest.mark.parametrize("name", bad_files())
def test_bad_program_error_matches_golden(name):
    with open(os.path.join(BAD, name.replace(".hsbi", ".err")), encoding="utf-8") as f:
        expected = f.read()
    got = render_bad(name)
    assert got.startswith("exit status 1\n")
    assert got == expected, "run `python tests/golden_cases.py` and review the diff"


def test_every_error_kind_has_a_bad_program():
    kinds = {
        "unknown_name", "duplicate_definition", "use_before_definition", "observe_outside_sites",
        "input_outside_sites", "cross_site_reference", "site_index_as_value", "missing_observe",
        "discrete_prior", "builtin_arity", "function_arity", "annotation_mismatch", "shape_mismatch",
        "include_cycle", "missing_include", "module_clash", "recursion", "several_errors",
    }
    assert kinds <= {n[:-5] for n in bad_files()}


def test_sir_structure():
    model = hierdsl.compile(os.path.join(EXAMPLES, "sir.hsbi"))
    ir = model.ir
    assert [v.name for v in ir.globals] == ["gamma"]
    assert [v.name for v in ir.locals] == ["beta"]
    (y,) = ir.observations
    assert (y.name, y.shape, y.dtype) == ("y", (10,), "int")
    assert ir.global_tokens == 1 and ir.tokens_per_site == 11
    assert ir.globals[0].support.kind == "positive"


def test_functional_coordinates_found_from_inputs():
    ir = hierdsl.compile(os.path.join(EXAMPLES, "sir_irregular.hsbi")).ir
    assert ir.variable("y").coords == ("t",)
    assert hierdsl.compile(os.path.join(EXAMPLES, "sir.hsbi")).ir.variable("y").coords == ()


def test_supports_and_roles():
    ir = hierdsl.compile(os.path.join(EXAMPLES, "gaussian_mixture.hsbi")).ir
    theta = ir.variable("theta")
    assert (theta.role, theta.support.kind, theta.support.lower, theta.support.upper) == ("local", "interval", -10.0, 10.0)
    ir = hierdsl.compile(os.path.join(EXAMPLES, "eight_schools.hsbi")).ir
    assert [v.role for v in ir.variables] == ["global", "global", "input", "local", "observation"]
    assert ir.site_index == "j" and ir.num_sites == 8


def test_model_arguments_can_be_overridden():
    ir = hierdsl.compile(os.path.join(EXAMPLES, "gaussian_linear.hsbi"), args={"n_sites": 7}).ir
    assert ir.num_sites == 7 and dict(ir.args) == {"n_sites": 7}
    with pytest.raises(HsbiError, match="has no argument `n_site`"):
        hierdsl.compile(os.path.join(EXAMPLES, "gaussian_linear.hsbi"), args={"n_site": 7})


def test_hash_ignores_whitespace_and_comments():
    with open(os.path.join(EXAMPLES, "gaussian_linear.hsbi"), encoding="utf-8") as f:
        text = f.read()
    reformatted = "#= a block comment =#\n" + text.replace("    ", "  ").replace("\n", "\n\n") + "# trailing\n"
    a = hierdsl.compile(text).ir
    b = hierdsl.compile(reformatted).ir
    assert a == b and a.hash == b.hash
    changed = hierdsl.compile(text.replace("Normal(0.0, 1.0)", "Normal(0.0, 2.0)")).ir
    assert changed.hash != a.hash


@pytest.mark.parametrize("name", example_files())
def test_ir_json_round_trip(name):
    with cwd(ROOT):
        ir = hierdsl.compile(os.path.join("examples", name)).ir
    again = ModelIR.loads(ir.dumps())
    assert again == ir and again.hash == ir.hash
    assert hash(again) == hash(ir)


def test_unused_parameter_is_a_warning():
    model = hierdsl.compile("""
model M(n_sites::Int = 3)
    sigma ~ HalfNormal(1.0)
    unused ~ Normal(0.0, 1.0)
    sites i in 1:n_sites
        observe x ~ Normal(0.0, sigma)
    end
end
""")
    (w,) = model.warnings
    assert w.severity == "warning" and "global parameter `unused` is never used" in w.render(dict(model.sources))


def test_several_models_need_a_choice():
    text = """
model A(n::Int = 2)
    s ~ HalfNormal(1.0)
    sites i in 1:n
        observe x ~ Normal(0.0, s)
    end
end
model B(n::Int = 2)
    s ~ HalfNormal(2.0)
    sites i in 1:n
        observe x ~ Normal(0.0, s)
    end
end
"""
    with pytest.raises(HsbiError, match="several models: A, B"):
        hierdsl.compile(text)
    assert hierdsl.compile(text, model="B").ir.name == "B"


def test_language_features_shapes():
    ir = hierdsl.compile("""
const W = [1.0 2.0; 3.0 4.0]
const T = 0:2:10
square(x) = x * x
square(x, y) = x * y
function pick(v)
    a, b = (v[1], v[end])
    m = if a > b
        a
    elseif a < b
        b
    else
        0.0
    end
    return [m, a > 0.0 ? a : -a, sum(v[2:end])]
end
model M(n_sites::Int = 4)
    g ~ Normal(0.0, 1.0)
    sites i in 1:n_sites
        input u = T .* 2
        z ~ iid(Normal(g, 1.0), 3)
        w = matmul(W, z[1:2]) .+ square(g) + square(g, 2.0)
        observe y::Vector{3} ~ Normal(pick(z) + sum(w), 1.0)
        observe c ~ Binomial(10, sigmoid(g) .* ones(6))
        observe d = cumsum(u) .+ g
    end
end
""").ir
    shapes = {v.name: v.shape for v in ir.variables}
    assert shapes == {"g": (), "u": (6,), "z": (3,), "w": (2,), "y": (3,), "c": (6,), "d": (6,)}
    assert ir.variable("c").dtype == "int"
    assert ir.variable("u").expr.tag == "lit"  # a fixed design is folded at compile time
    assert ir.variable("u").expr.data[0] == (0, 4, 8, 12, 16, 20)


def test_extern_functions_are_recorded_and_bound():
    src = """
extern function drag(re::Real, a::Real)::Vector{4}
extern host function slow(x::Real)::Real = "mysim:run"
model M(n_sites::Int = 2)
    g ~ Normal(0.0, 1.0)
    sites i in 1:n_sites
        observe y ~ Normal(drag(g, slow(g)), 1.0)
    end
end
"""
    fn = lambda re, a: re
    model = hierdsl.compile(src, functions={"drag": fn})
    ext = {x.name: x for x in model.ir.externs}
    assert ext["drag"].returns == (4,) and not ext["drag"].host
    assert ext["slow"].host and ext["slow"].target == "mysim:run"
    assert model.functions == {"drag": fn}
    assert model.ir.variable("y").shape == (4,)
    with pytest.raises(HsbiError, match="does not declare"):
        hierdsl.compile(src, functions={"dragg": fn})


def test_extern_import_needs_opt_in(tmp_path):
    path = os.path.join(EXAMPLES, "drag.hsbi")
    assert hierdsl.compile(path).functions == {}
    model = hierdsl.compile(path, import_targets=True)
    assert callable(model.functions["drag_curve"])


# ----------------------------------------------------------------------------- builder ≡ file


def _builder_gaussian_linear():
    from hierdsl.builder import ModelBuilder, dist

    b = ModelBuilder("GaussianLinear", n_sites=50)
    sigma = b.param("sigma", dist.HalfNormal(1.0))
    with b.sites("i", "n_sites") as site:
        mu = site.param("mu", dist.Normal(0.0, 1.0))
        site.observe("x", dist.Normal(mu, sigma))
    return b.compile()


def _builder_eight_schools():
    from hierdsl.builder import ModelBuilder, dist

    b = ModelBuilder("EightSchools", n_schools=8)
    mu = b.param("mu", dist.Normal(0.0, 5.0))
    tau = b.param("tau", dist.HalfCauchy(5.0))
    with b.sites("j", "n_schools") as site:
        sigma = site.input("sigma", dist.Uniform(5.0, 20.0))
        theta = site.param("theta", dist.Normal(mu, tau))
        site.observe("y", dist.Normal(theta, sigma))
    return b.compile()


def _builder_two_moons():
    from hierdsl.builder import ModelBuilder, dist, fn, pi

    b = ModelBuilder("TwoMoons", n_sites=50)

    def body(f, theta):
        a = f.draw("a", dist.Uniform(-pi / 2, pi / 2))
        r = f.draw("r", dist.Normal(0.1, 0.01))
        p = f.let("p", [r * fn.cos(a) + 0.25, r * fn.sin(a)])
        z = f.let("z", [(theta[1] + theta[2]) / fn.sqrt(2.0), (-theta[1] + theta[2]) / fn.sqrt(2.0)])
        return p + [-fn.abs(z[1]), z[2]]

    two_moons = b.function("two_moons", ["theta"], body)
    mu = b.param("mu", dist.Uniform([-1.0, -1.0], [1.0, 1.0]))
    sigma = b.param("sigma", dist.Uniform([0.1, 0.1], [3.0, 3.0]))
    with b.sites("i", "n_sites") as site:
        theta = site.param("theta", dist.TruncatedNormal(mu, sigma, -1.0, 1.0))
        site.observe("x", two_moons(theta))
    return b.compile()


def _builder_sir():
    from hierdsl.builder import ModelBuilder, dist, fn

    b = ModelBuilder("SIR", n_sites=50)
    N = b.const("N", 1.0e6)
    b.const("DAYS", [0.0 + 17.0 * k for k in range(10)])

    def rhs(f, t, u, p):
        beta, gamma = f.let(["beta", "gamma"], p)
        s, i, r = f.let(["s", "i", "r"], u)
        flow = f.let("f", beta * s * i / N)
        return [-flow, flow - gamma * i, gamma * i]

    b.function("sir_rhs", ["t", "u", "p"], rhs)
    from hierdsl.builder import Ex
    from hierdsl.compiler import ast

    def prevalence(f, beta, gamma, times):
        u = f.let("u", fn.odesolve(Ex(ast.Name(("sir_rhs",))), [N - 1.0, 1.0, 0.0], times, params=(beta, gamma)))
        return fn.clamp(u[:, 2] / N, 0.0, 1.0)

    prev = b.function("prevalence", ["beta", "gamma", "times"], prevalence)
    gamma = b.param("gamma", dist.LogNormal(fn.log(0.125), 0.2))
    with b.sites("i", "n_sites") as site:
        beta = site.param("beta", dist.LogNormal(fn.log(0.4), 0.5))
        site.observe("y", dist.Binomial(1000, prev(beta, gamma, Ex(ast.Name(("DAYS",))))), annotation="Vector{10}")
    return b.compile()


@pytest.mark.parametrize("name,build", [
    ("gaussian_linear.hsbi", _builder_gaussian_linear),
    ("eight_schools.hsbi", _builder_eight_schools),
    ("two_moons.hsbi", _builder_two_moons),
    ("sir.hsbi", _builder_sir),
])
def test_builder_matches_file(name, build):
    from_file = hierdsl.compile(os.path.join(EXAMPLES, name)).ir
    built = build().ir
    assert built == from_file
    assert built.hash == from_file.hash


def test_builder_reports_errors_like_files():
    from hierdsl.builder import ModelBuilder, dist

    b = ModelBuilder("M", n_sites=3)
    with b.sites("i", "n_sites") as site:
        site.param("mu", dist.Normal(0.0, 1.0))
    with pytest.raises(HsbiError, match="observes nothing"):
        b.compile()


def test_semicolon_column_is_a_vector_as_in_julia():
    ir = hierdsl.compile("""
model M(n::Int = 2)
    g ~ Normal(0.0, 1.0)
    sites i in 1:n
        observe x ~ Normal([g; 2.0 * g], 1.0)
    end
end
""").ir
    assert ir.variable("x").shape == (2,)
