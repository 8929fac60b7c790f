"""Tests of the IR → JAX stage (`runtime/lower.py` and its helpers).

IR is built by hand here (small constructors below), so these tests do not depend on the parser or
checker; one test lowers the `examples/*.hsbi` files when `hierdsl.compile` is available. Every
jitted function is built once per module and reused, to keep the file fast on a small CPU.
"""

from __future__ import annotations

import functools
import math
import pathlib

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats as st
from hierdsl.compiler.ir import (
    Constant,
    E,
    ExternIR,
    FunctionIR,
    ModelIR,
    Support,
    Variable,
)
from hierdsl.runtime import distributions as D
from hierdsl.runtime.errors import NonFiniteSimulationError, RuntimeModelError
from hierdsl.runtime.lower import LoweredModel, _Interpreter, _Keys, check_simulations
from hierdsl.runtime.ode import odesolve
from scipy.integrate import solve_ivp

# ----------------------------------------------------------------------------- IR constructors


def f(x: float) -> E:
    return E("lit", (), (float(x), "float"))


def i(x: int) -> E:
    return E("lit", (), (int(x), "int"))


def s(x: str) -> E:
    return E("lit", (), (x, "str"))


def v(name: str) -> E:
    return E("var", (), (name,))


def const(cid: str) -> E:
    return E("const", (), (cid,))


def op(tag: str, *args: E) -> E:
    return E(tag, tuple(args))


def call(name: str, *args: E, **kwargs: E) -> E:
    kws = tuple(E("kw", (value,), (key,)) for key, value in kwargs.items())
    return E("call", tuple(args) + kws, (name,))


def ucall(fid: str, *args: E) -> E:
    return E("ucall", tuple(args), (fid,))


def vec(*items: E) -> E:
    return E("vector", tuple(items))


def index(value: E, *indices: E) -> E:
    return E("index", (value,) + tuple(indices))


def block(*statements: E) -> E:
    return E("block", tuple(statements))


def let(names: str, value: E) -> E:
    return E("let", (value,), tuple(names.split(",")))


def draw(name: str, dist: E) -> E:
    return E("draw", (dist,), (name,))


COLON = E("colon")


def var(name, role, expr, shape=(), support="real", deps=(), stochastic=None, dtype="float", lower=None, upper=None):
    if stochastic is None:
        stochastic = role in ("global", "local", "observation")
    return Variable(name, role, stochastic, expr, tuple(shape), dtype, Support(support, lower, upper), tuple(deps))


def model(name, *variables, functions=(), constants=(), externs=(), args=()):
    return ModelIR(name, tuple(args), "i", 10, tuple(variables), tuple(functions), tuple(constants), tuple(externs))


# ----------------------------------------------------------------------------- benchmark models, by hand

GAUSSIAN_LINEAR = model(
    "GaussianLinear",
    var("sigma", "global", call("HalfNormal", f(1)), support="positive"),
    var("mu", "local", call("Normal", f(0), f(1))),
    var("x", "observation", call("Normal", v("mu"), v("sigma")), deps=("mu", "sigma")),
    args=(("n_sites", 50),),
)

_pi = call("pi")
TWO_MOONS_FN = FunctionIR(
    "two_moons/1", "two_moons", ("theta",),
    block(
        draw("a", call("Uniform", op("neg", op("div", _pi, f(2))), op("div", _pi, f(2)))),
        draw("r", call("Normal", f(0.1), f(0.01))),
        let("p", vec(op("add", op("mul", v("r"), call("cos", v("a"))), f(0.25)), op("mul", v("r"), call("sin", v("a"))))),
        let("z", vec(
            op("div", op("add", index(v("theta"), i(1)), index(v("theta"), i(2))), call("sqrt", f(2))),
            op("div", op("add", op("neg", index(v("theta"), i(1))), index(v("theta"), i(2))), call("sqrt", f(2))),
        )),
        op("add", v("p"), vec(op("neg", call("abs", index(v("z"), i(1)))), index(v("z"), i(2)))),
    ),
    random=True,
)
TWO_MOONS = model(
    "TwoMoons",
    var("mu", "global", call("Uniform", vec(f(-1), f(-1)), vec(f(1), f(1))), shape=(2,), support="interval", lower=-1.0, upper=1.0),
    var("sigma", "global", call("Uniform", vec(f(0.1), f(0.1)), vec(f(3), f(3))), shape=(2,), support="interval", lower=0.1, upper=3.0),
    var("theta", "local", call("TruncatedNormal", v("mu"), v("sigma"), f(-1), f(1)), shape=(2,), support="interval",
        lower=-1.0, upper=1.0, deps=("mu", "sigma")),
    var("x", "observation", ucall("two_moons/1", v("theta")), shape=(2,), deps=("theta",), stochastic=False),
    functions=(TWO_MOONS_FN,),
)


def _sq(e: E) -> E:
    return op("pow", e, i(2))


_off_diagonal = op("mul", op("mul", call("tanh", v("rho")), _sq(v("s1"))), _sq(v("s2")))
SLCP = model(
    "SLCP",
    var("s1", "global", call("Uniform", f(0.1), f(3)), support="interval", lower=0.1, upper=3.0),
    var("s2", "global", call("Uniform", f(0.1), f(3)), support="interval", lower=0.1, upper=3.0),
    var("rho", "global", call("Uniform", f(-3), f(3)), support="interval", lower=-3.0, upper=3.0),
    var("Sigma", "global_det", E("matrix", (op("pow", v("s1"), i(4)), _off_diagonal, _off_diagonal, op("pow", v("s2"), i(4))), (2, 2)),
        shape=(2, 2), deps=("s1", "s2", "rho")),
    var("m", "local", call("Uniform", vec(f(-3), f(-3)), vec(f(3), f(3))), shape=(2,), support="interval", lower=-3.0, upper=3.0),
    var("x", "observation", call("iid", call("MvNormal", v("m"), v("Sigma")), i(4)), shape=(4, 2), deps=("m", "Sigma")),
)

_N = const("Epidemics.N")
SIR_RHS = FunctionIR(
    "Epidemics.sir_rhs/3", "sir_rhs", ("t", "u", "p"),
    block(
        let("beta,gamma", v("p")),
        let("s,i,r", v("u")),
        let("f", op("div", op("mul", op("mul", v("beta"), v("s")), v("i")), _N)),
        vec(op("neg", v("f")), op("sub", v("f"), op("mul", v("gamma"), v("i"))), op("mul", v("gamma"), v("i"))),
    ),
    random=False,
)
SIR_PREVALENCE = FunctionIR(
    "Epidemics.sir_prevalence/3", "sir_prevalence", ("beta", "gamma", "times"),
    block(
        let("u", call("odesolve", E("fnref", (), ("Epidemics.sir_rhs/3",)), vec(op("sub", _N, f(1)), f(1), f(0)), v("times"),
                      params=E("tuple", (v("beta"), v("gamma"))))),
        call("clamp", op("div", index(v("u"), COLON, i(2)), _N), f(0), f(1)),
    ),
    random=False,
)
SIR_CONSTANTS = (Constant("Epidemics.N", 1.0e6, (), "float"),)


def _sir(irregular: bool) -> ModelIR:
    times = (
        var("t", "input", call("SortedUniform", f(0), f(160), i(10)), shape=(10,), support="interval", stochastic=True)
        if irregular
        else var("t", "global_det", E("range", (i(0), i(17), i(153))), shape=(10,), dtype="int")
    )
    return model(
        "SIRIrregular" if irregular else "SIR",
        var("gamma", "global", call("LogNormal", call("log", f(0.125)), f(0.2)), support="positive"),
        *([] if irregular else [times]),
        *([times] if irregular else []),
        var("beta", "local", call("LogNormal", call("log", f(0.4)), f(0.5)), support="positive"),
        var("prevalence", "site_det", ucall("Epidemics.sir_prevalence/3", v("beta"), v("gamma"), v("t")), shape=(10,),
            deps=("beta", "gamma", "t")),
        var("y", "observation", call("Binomial", i(1000), v("prevalence")), shape=(10,), deps=("prevalence",), dtype="int",
            support="nonnegative_integer"),
        functions=(SIR_RHS, SIR_PREVALENCE),
        constants=SIR_CONSTANTS,
    )


SIR = _sir(irregular=False)
SIR_IRREGULAR = _sir(irregular=True)

EIGHT_SCHOOLS = model(
    "EightSchools",
    var("mu", "global", call("Normal", f(0), f(5))),
    var("tau", "global", call("HalfCauchy", f(5)), support="positive"),
    var("sigma_j", "input", call("Uniform", f(9), f(18)), support="interval", lower=9.0, upper=18.0, stochastic=True),
    var("theta", "local", call("Normal", v("mu"), v("tau")), deps=("mu", "tau")),
    var("y", "observation", call("Normal", v("theta"), v("sigma_j")), deps=("theta", "sigma_j")),
)

GAUSSIAN_MIXTURE = model(
    "GaussianMixture",
    var("mu", "global", call("Uniform", f(-10), f(10)), support="interval", lower=-10.0, upper=10.0),
    var("sigma", "global", call("HalfNormal", f(1)), support="positive"),
    var("theta", "local", call("TruncatedNormal", v("mu"), v("sigma"), f(-10), f(10)), support="interval",
        lower=-10.0, upper=10.0, deps=("mu", "sigma")),
    var("x", "observation", call("Mixture", vec(f(0.5), f(0.5)), vec(call("Normal", v("theta"), f(1)), call("Normal", v("theta"), f(0.1)))),
        deps=("theta",)),
)

# Supports that exercise every bijector: parameter-dependent bounds, mixed one-sided bounds in one
# vector, a simplex and an ordered vector, with a deterministic value between them.
SUPPORTS = model(
    "Supports",
    var("s", "global", call("HalfNormal", f(1)), support="positive"),
    var("w", "global", call("Dirichlet", vec(f(1), f(2), f(3))), shape=(3,), support="simplex"),
    var("half", "global_det", op("mul", v("s"), f(0.5)), deps=("s",)),
    var("h", "global", call("TruncatedNormal", f(0), f(1), vec(f(-math.inf), f(0)), vec(f(0), f(math.inf))), shape=(2,),
        support="interval"),
    var("c", "input", call("Uniform", f(1), f(2)), support="interval", stochastic=True),
    var("u", "local", call("Uniform", v("c"), op("add", v("c"), v("half"))), support="interval", deps=("c", "half")),
    var("o", "local", call("SortedUniform", f(-1), v("c"), i(3)), shape=(3,), support="interval", deps=("c",)),
    var("x", "observation", call("Normal", op("add", v("u"), call("sum", v("o"))), f(1)), deps=("u", "o")),
)

MODELS = {
    "gaussian_linear": GAUSSIAN_LINEAR,
    "two_moons": TWO_MOONS,
    "slcp": SLCP,
    "sir": SIR,
    "sir_irregular": SIR_IRREGULAR,
    "eight_schools": EIGHT_SCHOOLS,
    "gaussian_mixture": GAUSSIAN_MIXTURE,
    "supports": SUPPORTS,
}
NUM_SITES = 4
# Models whose compilation takes longest (a second ODE solve); `-m "not slow"` skips them.
SLOW_MODELS = {"sir_irregular"}
EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def lowered():
    """Each model lowered once, with its jitted simulator (compiled on first use)."""
    out = {}
    for name, ir in MODELS.items():
        m = LoweredModel(ir)
        out[name] = (m, jax.jit(m.simulate, static_argnums=1))
    return out


# ----------------------------------------------------------------------------- whole models


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_MODELS else n for n in sorted(MODELS)]
)
def test_models_simulate_with_ir_shapes_and_finite_values(lowered, name):
    m, simulate = lowered[name]
    out = simulate(jax.random.key(0), NUM_SITES)
    assert set(out) == {v.name for v in m.ir.variables}
    for var_ in m.ir.variables:
        expected = ((NUM_SITES,) if var_.per_site else ()) + var_.shape
        assert out[var_.name].shape == expected, var_.name
        assert np.all(np.isfinite(np.asarray(out[var_.name], np.float64))), var_.name
    check_simulations({k: out[k] for k in (v.name for v in m.ir.variables if v.per_site)}, out)
    # A fixed key gives identical samples; another key different ones.
    again = simulate(jax.random.key(0), NUM_SITES)
    other = simulate(jax.random.key(1), NUM_SITES)
    for var_ in m.ir.globals + m.ir.locals:
        np.testing.assert_array_equal(out[var_.name], again[var_.name])
        assert not np.array_equal(out[var_.name], other[var_.name])


def test_simulated_values_respect_the_model(lowered):
    _, simulate = lowered["slcp"]
    out = simulate(jax.random.key(3), NUM_SITES)
    s1, s2, rho = (float(out[k]) for k in ("s1", "s2", "rho"))
    c = math.tanh(rho) * s1**2 * s2**2
    np.testing.assert_allclose(out["Sigma"], [[s1**4, c], [c, s2**4]], rtol=1e-5)
    _, simulate = lowered["two_moons"]
    out = simulate(jax.random.key(4), NUM_SITES)
    assert np.all(np.abs(out["theta"]) <= 1) and np.all((out["sigma"] >= 0.1) & (out["sigma"] <= 3))
    _, simulate = lowered["sir"]
    out = simulate(jax.random.key(5), NUM_SITES)
    np.testing.assert_array_equal(out["t"], np.arange(0, 154, 17))
    assert np.all((out["y"] >= 0) & (out["y"] <= 1000)) and np.all(out["y"] == np.round(out["y"]))


@pytest.mark.slow
def test_irregular_times_are_sorted_per_site(lowered):
    _, simulate = lowered["sir_irregular"]
    out = simulate(jax.random.key(6), NUM_SITES)
    assert np.all(np.diff(out["t"], axis=1) >= 0) and np.all((out["t"] >= 0) & (out["t"] <= 160))
    assert not np.array_equal(out["t"][0], out["t"][1])  # each site has its own times


def test_simulate_uses_given_parameters_and_splits_site_phases(lowered):
    m, simulate = lowered["gaussian_linear"]
    given = {"sigma": jnp.float32(1e-3), "mu": jnp.arange(NUM_SITES, dtype=jnp.float32)}
    out = simulate(jax.random.key(0), NUM_SITES, given)
    assert float(out["sigma"]) == pytest.approx(1e-3)
    np.testing.assert_allclose(out["x"], given["mu"], atol=0.01)
    key = jax.random.key(1)
    globals_ = jax.eval_shape(m.sample_globals, key)
    assert set(globals_) == {"sigma"}
    site_params = jax.eval_shape(m.sample_site_params, key, globals_)
    assert set(site_params) == {"mu"}
    assert set(jax.eval_shape(m.simulate_site, key, globals_, site_params)) == {"x"}
    # SIR: the prevalence does not depend on the observation, so it is a site parameter value.
    sir = lowered["sir"][0]
    assert set(jax.eval_shape(sir.sample_site_params, key, {"gamma": 0.125})) == {"beta", "prevalence"}
    assert set(jax.eval_shape(sir.sample_site, key, {"gamma": 0.125})) == {"beta", "prevalence", "y"}


def test_site_simulator_is_one_call_per_site_and_permutation_equivariant(lowered):
    m, _ = lowered["eight_schools"]
    globals_ = {"mu": jnp.float32(1.0), "tau": jnp.float32(2.0)}
    keys = jax.random.split(jax.random.key(0), NUM_SITES)
    site_params = jax.vmap(m.sample_site_params, in_axes=(0, None))(keys, globals_)
    simulate_sites = jax.jit(jax.vmap(m.simulate_site, in_axes=(0, None, 0)))
    out = simulate_sites(keys, globals_, site_params)
    perm = np.array([2, 0, 3, 1])
    permuted = simulate_sites(keys[perm], globals_, jax.tree.map(lambda a: a[perm], site_params))
    np.testing.assert_array_equal(out["y"][perm], permuted["y"])


# ----------------------------------------------------------------------------- distributions


# name: (distribution, grid over which its density is integrated). All are sampled and evaluated in
# one jitted function (one compilation for the lot).
CONTINUOUS = {
    "Normal": (lambda: D.Normal(1.0, 2.0), -15, 17),
    "HalfNormal": (lambda: D.HalfNormal(1.5), 0, 12),
    "LogNormal": (lambda: D.LogNormal(0.2, 0.5), 0, 20),
    "Uniform": (lambda: D.Uniform(-2.0, 3.0), -2, 3),
    "TruncatedNormal": (lambda: D.TruncatedNormal(1.0, 2.0, -1.0, 0.5), -1, 0.5),
    "TruncatedNormalTail": (lambda: D.TruncatedNormal(0.0, 0.5, 2.0, 4.0), 2, 4),
    "Beta": (lambda: D.Beta(2.0, 5.0), 0, 1),
    "Gamma": (lambda: D.Gamma(3.0, 2.0), 0, 20),
    "Exponential": (lambda: D.Exponential(1.5), 0, 20),
    "Cauchy": (lambda: D.Cauchy(0.5, 0.1), -40, 40),
    "HalfCauchy": (lambda: D.HalfCauchy(0.2), 0, 80),
    "StudentT": (lambda: D.StudentT(4.0, 1.0, 0.5), -30, 30),
    "Laplace": (lambda: D.Laplace(-1.0, 0.7), -20, 18),
    "Mixture": (lambda: D.Mixture(np.array([0.3, 0.7], np.float32), [D.Normal(-1.0, 0.2), D.Laplace(2.0, 1.0)]), -4, 25),
}
GRID_POINTS = 20001


@pytest.fixture(scope="module")
def continuous_draws():
    @jax.jit
    def run(key):
        out = {}
        for n, (name, (make, lo, hi)) in enumerate(CONTINUOUS.items()):
            dist = make()
            grid = jnp.linspace(lo, hi, GRID_POINTS)
            out[name] = (dist.sample(jax.random.fold_in(key, n), (4000,)), dist.log_prob(grid))
        return out

    return jax.device_get(run(jax.random.key(7)))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONTINUOUS))
def test_continuous_sampler_agrees_with_log_prob(continuous_draws, name):
    _, lo, hi = CONTINUOUS[name]
    draws, log_density = continuous_draws[name]
    grid = np.linspace(lo, hi, GRID_POINTS)
    density = np.exp(np.asarray(log_density, np.float64))
    cumulative = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2 * np.diff(grid))])
    assert cumulative[-1] == pytest.approx(1.0, abs=0.01)  # log_prob is normalised
    assert draws.dtype == np.float32 and np.all(np.isfinite(draws))
    inside = draws[(draws >= lo) & (draws <= hi)].astype(np.float64)
    assert st.kstest(inside, lambda x: np.interp(x, grid, cumulative / cumulative[-1])).pvalue > 1e-3


DISCRETE = {
    "Binomial": lambda: D.Binomial(1000.0, 0.3),
    "BinomialRare": lambda: D.Binomial(1000.0, 0.004),
    "BinomialCommon": lambda: D.Binomial(1000.0, 0.98),
    "BinomialSmall": lambda: D.Binomial(7.0, 0.5),
    "Poisson": lambda: D.Poisson(3.5),
    "Bernoulli": lambda: D.Bernoulli(0.3),
    "Categorical": lambda: D.Categorical(np.array([0.2, 0.5, 0.3], np.float32)),
}


@pytest.fixture(scope="module")
def discrete_draws():
    @jax.jit
    def run(key):
        values = jnp.arange(0, 1001, dtype=jnp.float32)
        out = {
            name: (make().sample(jax.random.fold_in(key, n), (20000,)), make().log_prob(values))
            for n, (name, make) in enumerate(DISCRETE.items())
        }
        # Per-site keys and probabilities, one of them NaN (a failed simulation upstream).
        p = jnp.array([[0.1, 0.5], [jnp.nan, 0.9]], jnp.float32)
        sample = jax.vmap(lambda k, p: D.Binomial(1000.0, p).sample(k))
        out["vmapped"] = sample(jax.random.split(key, 2), p)
        return out

    return jax.device_get(run(jax.random.key(11)))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(DISCRETE))
def test_discrete_sampler_agrees_with_log_prob(discrete_draws, name):
    draws, log_pmf = discrete_draws[name]
    pmf = np.exp(np.asarray(log_pmf, np.float64))
    assert pmf.sum() == pytest.approx(1.0, abs=1e-3)
    likely = np.flatnonzero(pmf > 1e-4)
    frequencies = np.array([(draws == x).mean() for x in likely])
    np.testing.assert_allclose(frequencies, pmf[likely], atol=0.012)


@pytest.mark.slow
def test_binomial_is_vmappable_and_propagates_nan(discrete_draws):
    out = discrete_draws["vmapped"]
    assert np.isnan(out[1, 0]) and np.all(np.isfinite(out[[0, 0, 1], [0, 1, 1]]))


@pytest.mark.slow
def test_multivariate_distributions():
    mean = np.array([1.0, -1.0], np.float32)
    cov = np.array([[2.0, 0.6], [0.6, 0.5]], np.float32)
    alpha = np.array([1.0, 2.0, 3.0], np.float32)
    x = np.array([[0.3, 0.2], [1.0, -2.0]], np.float32)
    point = np.array([0.2, 0.3, 0.5], np.float32)
    unsorted = np.array([0.5, 0.2, 1.0], np.float32)

    @jax.jit
    def run(key):
        keys = jax.random.split(key, 3)
        mvn, dirichlet, ordered = D.MvNormal(mean, cov), D.Dirichlet(alpha), D.SortedUniform(0.0, 2.0, 3)
        return (
            D.IID(mvn, (20000,)).sample(keys[0]), mvn.log_prob(x),
            dirichlet.sample(keys[1], (20000,)), dirichlet.log_prob(point),
            ordered.sample(keys[2], (5000,)), ordered.log_prob(point * 2), ordered.log_prob(unsorted),
        )

    mvn_draws, mvn_lp, dir_draws, dir_lp, ord_draws, ord_lp, ord_unsorted = jax.device_get(run(jax.random.key(0)))
    np.testing.assert_allclose(mvn_lp, st.multivariate_normal(mean, cov).logpdf(x), rtol=1e-5)
    assert mvn_draws.shape == (20000, 2)
    np.testing.assert_allclose(mvn_draws.mean(0), mean, atol=0.05)
    np.testing.assert_allclose(np.cov(mvn_draws.T), cov, atol=0.06)
    np.testing.assert_allclose(dir_lp, st.dirichlet(alpha).logpdf(point), rtol=1e-5)
    np.testing.assert_allclose(dir_draws.mean(0), alpha / alpha.sum(), atol=0.01)
    np.testing.assert_allclose(dir_draws.sum(-1), 1.0, atol=1e-5)
    assert np.all(np.diff(ord_draws, axis=-1) >= 0)
    np.testing.assert_allclose(ord_draws.mean(0), [0.5, 1.0, 1.5], atol=0.03)  # order statistics of U(0, 2)
    assert ord_lp == pytest.approx(math.log(6 / 8), rel=1e-5)  # 3! / (2 - 0)^3
    assert ord_unsorted == -np.inf


def test_vector_arguments_broadcast_and_iid_adds_a_leading_axis():
    key = jax.random.key(0)

    def shape(dist, sample_shape=()):
        return jax.eval_shape(lambda k: dist.sample(k, sample_shape), key).shape

    dist = D.Normal(np.zeros(3, np.float32), 1.0)
    assert dist.shape == (3,) and shape(dist, (5,)) == (5, 3)
    assert shape(D.iid(dist, np.int32(4))) == (4, 3)
    assert D.iid(D.MvNormal(np.zeros(2, np.float32), np.eye(2, dtype=np.float32)), 4).shape == (4, 2)
    mixture = D.Mixture(np.array([0.5, 0.5], np.float32), [D.Normal(np.zeros(3, np.float32), 1.0), D.Normal(5.0, 0.1)])
    assert shape(mixture, (2,)) == (2, 3)
    lower, upper = mixture.support
    assert np.all(lower == -np.inf) and np.all(upper == np.inf)
    assert D.Uniform(0.0, np.array([1.0, 2.0], np.float32)).support[1].tolist() == [1.0, 2.0]
    with pytest.raises(RuntimeModelError, match="takes 2 argument"):
        D.make_distribution("Normal", [0.0])
    with pytest.raises(RuntimeModelError, match="must be known before"):
        jax.jit(lambda k: D.iid(D.Normal(0.0, 1.0), k).shape)(3)


# ----------------------------------------------------------------------------- priors and bijectors


def _grid_cdf(grid: np.ndarray, log_density: np.ndarray):
    density = np.exp(np.asarray(log_density, np.float64))
    cumulative = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2 * np.diff(grid))])
    return cumulative[-1], lambda x: np.interp(x, grid, cumulative / cumulative[-1])


@pytest.mark.slow
def test_prior_sampler_matches_log_prior_on_marginals(lowered):
    m, _ = lowered["gaussian_mixture"]
    globals_ = {"mu": jnp.float32(8.0), "sigma": jnp.float32(3.0)}
    sigma_grid, theta_grid = np.linspace(0.0, 6.0, 4001), np.linspace(-10.0, 10.0, 4001)

    @jax.jit
    def run(key):
        key_globals, key_sites = jax.random.split(key)
        sigma = jax.vmap(m.sample_globals)(jax.random.split(key_globals, 4000))["sigma"]
        sigma_log_p = jax.vmap(lambda sg: m.global_log_prior({"mu": jnp.float32(0.0), "sigma": sg}))(sigma_grid)
        theta = jax.vmap(m.sample_site_params, in_axes=(0, None))(jax.random.split(key_sites, 4000), globals_)["theta"]
        theta_log_p = jax.vmap(lambda th: m.site_log_prior(globals_, {"theta": th}))(theta_grid)
        return sigma, sigma_log_p, theta, theta_log_p

    sigma, sigma_log_p, theta, theta_log_p = run(jax.random.key(0))
    # The globals' log prior includes mu's: Uniform(-10, 10) has density 1/20 everywhere.
    for draws, grid, log_p, mass in ((sigma, sigma_grid, sigma_log_p, 1 / 20), (theta, theta_grid, theta_log_p, 1.0)):
        total, cdf = _grid_cdf(grid, log_p)
        assert total == pytest.approx(mass, rel=0.01)
        assert st.kstest(np.asarray(draws, np.float64), cdf).pvalue > 1e-3


def test_log_prior_sums_globals_and_sites(lowered):
    m, simulate = lowered["eight_schools"]
    out = simulate(jax.random.key(2), NUM_SITES)

    @jax.jit
    def densities(params):
        per_site = jax.vmap(m.site_log_prior, in_axes=(None, 0))(params, {"theta": params["theta"]})
        outside = m.log_prior({**params, "tau": jnp.float32(-1.0)})
        return m.log_prior(params), m.global_log_prior(params) + per_site.sum(), outside

    total, by_parts, outside = densities(out)
    expected = st.norm(0, 5).logpdf(out["mu"]) + st.halfcauchy(scale=5).logpdf(out["tau"])
    expected += st.norm(out["mu"], out["tau"]).logpdf(out["theta"]).sum()
    assert float(total) == pytest.approx(expected, rel=1e-5)
    assert float(by_parts) == pytest.approx(expected, rel=1e-5)
    assert float(outside) == -np.inf  # not NaN, although theta's prior then has a negative scale


@pytest.mark.parametrize("name", ["gaussian_mixture", "two_moons", "slcp", "supports", "sir"])
def test_bijectors_round_trip_and_log_det_matches_jacobian(lowered, name):
    m, simulate = lowered[name]
    params = simulate(jax.random.key(9), NUM_SITES)
    names = m.parameter_names
    # A simplex drops its last part, so that the Jacobian is square.
    keep = {n: (lambda x: x[..., :-1]) if m.ir.variable(n).support.kind == "simplex" else (lambda x: x) for n in names}

    @jax.jit
    def check(params):
        z = m.to_unconstrained(params)
        back, log_det = m.to_constrained(z)
        inputs = {k: params[k] for k in m.prior_inputs}
        flat_z, unflatten = jax.flatten_util.ravel_pytree({n: z[n] for n in names})

        def forward(flat):
            x, _ = m.to_constrained({**unflatten(flat), **inputs})
            return jnp.concatenate([jnp.ravel(keep[n](x[n])) for n in names])

        return z, back, log_det, jax.jacfwd(forward)(flat_z)

    z, back, log_det, jac = check(params)
    for n, shape in m.unconstrained_shapes.items():
        assert z[n].shape == ((NUM_SITES,) if m.ir.variable(n).per_site else ()) + shape
        assert np.all(np.isfinite(z[n]))
        np.testing.assert_allclose(back[n], params[n], rtol=2e-4, atol=2e-5)
    # The full Jacobian is block-triangular (bounds read earlier parameters), so its log |det| is
    # the sum of the per-parameter ones that to_constrained returns.
    sign, logabsdet = np.linalg.slogdet(np.asarray(jac, np.float64))
    assert sign != 0
    assert float(log_det) == pytest.approx(logabsdet, rel=1e-3, abs=1e-3)


def test_discrete_prior_has_no_bijector():
    ir = model("Discrete", var("k", "global", call("Poisson", f(3))), var("x", "observation", call("Normal", v("k"), f(1))))
    with pytest.raises(RuntimeModelError, match="discrete prior"):
        LoweredModel(ir).to_unconstrained({"k": jnp.float32(2.0)})


# ----------------------------------------------------------------------------- odesolve


def _decay(t, u, k):
    return -k * u


def test_odesolve_matches_closed_form_and_is_vmappable():
    times = jnp.array([0.0, 0.5, 1.0, 2.0, 4.0])
    u0 = jnp.array([1.0, 3.0])
    rates = jnp.array([0.1, 0.7, 2.0])
    # (Differentiability is checked on SIR below: each gradient costs a long compilation.)
    out = jax.jit(jax.vmap(lambda k: odesolve(_decay, u0, times, params=k)))(rates)
    assert out.shape == (3, 5, 2)
    expected = np.exp(-np.asarray(rates)[:, None, None] * np.asarray(times)[None, :, None]) * np.asarray(u0)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-6)


def test_odesolve_failure_is_nan_and_bad_solver_is_an_error():
    out = odesolve(_decay, jnp.array([1.0]), jnp.array([1.0, 100.0]), params=1.0, max_steps=2)
    assert np.all(np.isnan(out))
    with pytest.raises(RuntimeModelError, match="tsit5"):
        odesolve(_decay, jnp.array([1.0]), jnp.array([1.0]), params=1.0, solver="rk45")


@pytest.mark.slow
def test_sir_odesolve_is_accurate_and_differentiable_at_extreme_parameters(lowered):
    m, _ = lowered["sir"]
    betas = jnp.asarray(0.4 * np.exp([-1.0, 0.0, 1.0]), jnp.float32)

    def prevalence(beta):
        return m.sample_site_params(jax.random.key(0), {"gamma": 0.125}, {"beta": beta})["prevalence"]

    out, grad = jax.jit(jax.vmap(lambda b: (prevalence(b), jax.grad(lambda b: prevalence(b)[3])(b))))(betas)
    times = np.arange(0, 154, 17.0)
    for beta, row in zip(np.asarray(betas, np.float64), np.asarray(out)):
        np.testing.assert_allclose(row, _sir_reference(beta, times), atol=2e-6)
    # The gradient matches a central finite difference of the reference solution.
    for beta, g in zip(np.asarray(betas, np.float64), np.asarray(grad)):
        step = 1e-4 * beta
        finite_difference = (_sir_reference(beta + step, [51.0]) - _sir_reference(beta - step, [51.0])) / (2 * step)
        assert np.isfinite(g) and g == pytest.approx(finite_difference[0], rel=0.02, abs=1e-6)


def _sir_reference(beta: float, times, gamma: float = 0.125, population: float = 1e6) -> np.ndarray:
    """Prevalence I(t)/N from SciPy's DOP853 in float64 at tight tolerances."""

    def rhs(t, u):
        infections = beta * u[0] * u[1] / population
        return [-infections, infections - gamma * u[1], gamma * u[1]]

    solution = solve_ivp(rhs, (0, times[-1]), [population - 1, 1, 0], t_eval=times, method="DOP853", rtol=1e-11, atol=1e-9)
    return solution.y[1] / population


# ----------------------------------------------------------------------------- externs


def _extern_model() -> ModelIR:
    externs = (ExternIR("curve", "curve", ("b",), ((),), (3,), False, None), ExternIR("wave", "wave", ("b",), ((),), (3,), True, None))
    return model(
        "Extern",
        var("a", "global", call("Normal", f(0), f(1))),
        var("b", "local", call("Normal", v("a"), f(1)), deps=("a",)),
        var("x", "observation", call("Normal", E("xcall", (v("b"),), ("curve",)), f(0.01)), shape=(3,), deps=("b",)),
        var("y", "observation", call("Normal", E("xcall", (v("b"),), ("wave",)), f(0.01)), shape=(3,), deps=("b",)),
        externs=externs,
    )


def _curve(b):
    return b * jnp.arange(1.0, 4.0)


def test_traceable_and_host_externs():
    calls = []

    def wave(b):
        calls.append(float(b))  # plain Python: fine on the host
        return [math.sin(float(b))] * 3

    m = LoweredModel(_extern_model(), functions={"curve": _curve, "wave": wave})
    out = jax.jit(m.simulate, static_argnums=1)(jax.random.key(0), NUM_SITES)
    np.testing.assert_allclose(out["x"], np.asarray(out["b"])[:, None] * np.arange(1.0, 4.0), atol=0.1)
    np.testing.assert_allclose(out["y"], np.sin(np.asarray(out["b"]))[:, None].repeat(3, 1), atol=0.1)
    assert len(calls) == NUM_SITES  # one host call per site


def test_extern_errors_are_clear():
    wave = lambda b: np.zeros(3)
    with pytest.raises(RuntimeModelError, match=r"`curve` has no Python binding.*functions=\{'curve'"):
        LoweredModel(_extern_model(), functions={"curv": _curve, "wave": wave})
    untraceable = LoweredModel(_extern_model(), functions={"curve": lambda b: np.full(3, float(b)), "wave": wave})
    with pytest.raises(RuntimeModelError, match="extern host function curve") as info:
        jax.eval_shape(lambda k: untraceable.simulate(k, 2), jax.random.key(0))
    assert "Traceback" not in str(info.value) and info.value.__cause__ is None
    wrong_shape = LoweredModel(_extern_model(), functions={"curve": lambda b: jnp.zeros(4), "wave": wave})
    with pytest.raises(RuntimeModelError, match="declared to return shape"):
        jax.eval_shape(lambda k: wrong_shape.simulate(k, 2), jax.random.key(0))


# ----------------------------------------------------------------------------- NaN detection


def test_check_simulations_reports_count_and_first_parameters():
    ir = model(
        "Fragile",
        var("a", "global", call("Normal", f(0), f(1))),
        var("b", "local", call("Normal", v("a"), f(1)), deps=("a",)),
        var("x", "observation", call("Normal", call("log", v("b")), f(0.1)), deps=("b",)),
    )
    m = LoweredModel(ir)
    out = jax.jit(m.simulate, static_argnums=1)(jax.random.key(0), 64)
    bad = int(np.sum(np.asarray(out["b"]) < 0))
    assert 0 < bad < 64
    with pytest.raises(NonFiniteSimulationError, match=f"{bad} of 64 simulations") as info:
        check_simulations({"x": out["x"]}, out)
    first = int(np.flatnonzero(np.asarray(out["b"]) < 0)[0])
    assert info.value.count == bad and info.value.first_params["b"] == out["b"][first]
    assert info.value.first_params["a"] == out["a"]  # shared globals shown whole
    check_simulations({"x": np.ones((5, 2))}, {})  # finite: no error


# ----------------------------------------------------------------------------- interpreter semantics


def _eval(expr: E, env=None, functions=(), constants=(), key=None):
    interpreter = _Interpreter(model("Scratch", var("x", "observation", f(0)), functions=functions, constants=constants), {})
    return interpreter.eval(expr, dict(env or {}), _Keys(key, "test"))


def test_indexing_is_one_based_with_colons_slices_and_dynamic_indices():
    matrix = jnp.arange(12.0).reshape(3, 4)
    assert _eval(index(v("m"), i(2), i(3)), {"m": matrix}) == 6.0
    np.testing.assert_array_equal(_eval(index(v("m"), COLON, i(2)), {"m": matrix}), [1.0, 5.0, 9.0])
    np.testing.assert_array_equal(_eval(index(v("m"), E("slice", (), (2, 1, 3)), i(1)), {"m": matrix}), [4.0, 8.0])
    np.testing.assert_array_equal(_eval(index(v("m"), i(1), E("slice", (), (4, -2, 1))), {"m": matrix}), [3.0, 1.0])
    dynamic = jax.jit(lambda k: _eval(index(v("m"), v("k"), i(1)), {"m": matrix, "k": k}))
    assert float(dynamic(jnp.float32(3.0))) == 8.0  # a float category index works too
    assert _eval(index(E("tuple", (f(1), f(2))), i(2))) == 2.0


def test_literals_vectors_matrices_ranges_and_static_folding():
    np.testing.assert_array_equal(_eval(E("matrix", (f(1), f(2), f(3), f(4)), (2, 2))), [[1, 2], [3, 4]])
    assert _eval(vec(vec(f(1), f(2)), vec(f(3), f(4)))).shape == (2, 2)
    np.testing.assert_array_equal(_eval(E("range", (i(1), i(2), i(7)))), [1, 3, 5, 7])
    np.testing.assert_allclose(_eval(E("range", (f(0), f(0.1), f(0.3)))), [0.0, 0.1, 0.2, 0.3])
    # Sizes computed from static values stay static inside jit.
    sized = jax.jit(lambda x: _eval(op("add", call("zeros", op("mul", i(2), v("n"))), v("x")), {"n": np.int32(3), "x": x}))
    assert sized(jnp.float32(1.0)).shape == (6,)
    assert _eval(op("div", i(1), i(2))).dtype == np.float32  # `/` is float division, as in Julia


def test_control_flow_blocks_and_functions():
    expr = E("if", (op("lt", v("x"), f(0)), f(-1), op("gt", v("x"), f(0)), f(1), f(0)))
    np.testing.assert_array_equal(_eval(expr, {"x": jnp.array([-2.0, 0.0, 3.0])}), [-1.0, 0.0, 1.0])
    np.testing.assert_array_equal(_eval(E("select", (v("c"), f(1), f(2))), {"c": jnp.array([True, False])}), [1.0, 2.0])
    body = block(let("a,b", v("p")), let("c", op("mul", v("a"), v("b"))), op("add", v("c"), const("K")))
    fn = FunctionIR("g/1", "g", ("p",), body, False)
    out = _eval(ucall("g/1", E("tuple", (f(2), f(3)))), functions=(fn,), constants=(Constant("K", 10.0, (), "float"),))
    assert float(out) == 16.0
    noisy = FunctionIR("h/0", "h", (), block(draw("e", call("Normal", f(0), f(1))), v("e")), True)
    one = _eval(vec(ucall("h/0"), ucall("h/0")), functions=(noisy,), key=jax.random.key(0))
    assert one[0] != one[1]  # each call gets its own key
    np.testing.assert_array_equal(one, _eval(vec(ucall("h/0"), ucall("h/0")), functions=(noisy,), key=jax.random.key(0)))
    with pytest.raises(RuntimeModelError, match="draws random numbers"):
        _eval(ucall("h/0"), functions=(noisy,))


BUILTIN_CASES = [
        (call("min", vec(f(3), f(1), f(2))), 1.0),
        (call("max", f(1), vec(f(0), f(5))), [1.0, 5.0]),
        (call("clamp", vec(f(-1), f(0.5), f(2)), f(0), f(1)), [0.0, 0.5, 1.0]),
        (call("sum", E("matrix", (f(1), f(2), f(3), f(4)), (2, 2)), dims=i(1)), [[4.0, 6.0]]),
        (call("prod", vec(f(2), f(3))), 6.0),
        (call("mean", vec(f(2), f(4))), 3.0),
        (call("cumsum", vec(f(1), f(2), f(3))), [1.0, 3.0, 6.0]),
        (call("length", E("matrix", (f(1), f(2), f(3), f(4)), (2, 2))), 4),
        (call("fill", f(2), i(2)), [2.0, 2.0]),
        (call("ones", i(2), i(1)), [[1.0], [1.0]]),
        (call("dot", vec(f(1), f(2)), vec(f(3), f(4))), 11.0),
        (call("matmul", E("matrix", (f(1), f(2), f(3), f(4)), (2, 2)), vec(f(1), f(1))), [3.0, 7.0]),
        (call("transpose", vec(f(1), f(2))), [[1.0, 2.0]]),
        (call("vcat", vec(f(1), f(2)), f(3)), [1.0, 2.0, 3.0]),
        (call("hcat", vec(f(1), f(2)), vec(f(3), f(4))), [[1.0, 3.0], [2.0, 4.0]]),
        (call("sigmoid", f(0)), 0.5),
        (call("logit", f(0.5)), 0.0),
        (call("softplus", f(0)), math.log(2)),
        (call("floor", f(-1.5)), -2.0),
        (op("pow", i(2), i(-1)), 0.5),
        (op("and", E("lit", (), (True, "bool")), op("not", E("lit", (), (False, "bool")))), True),
]


@pytest.mark.parametrize("expr,expected", BUILTIN_CASES)
def test_builtins_fold_static_arguments(expr, expected):
    np.testing.assert_allclose(_eval(expr), expected, rtol=1e-6)


def test_builtins_on_traced_arguments_agree_with_folding():
    cases = BUILTIN_CASES
    # Multiplying by a traced one makes each expression a traced computation.
    traced = jax.jit(lambda one: [_eval(op("mul", expr, v("one")), {"one": one}) for expr, _ in cases])(jnp.float32(1.0))
    for (expr, expected), value in zip(cases, traced):
        np.testing.assert_allclose(value, expected, rtol=1e-6, err_msg=str(expr.data))


def test_shape_mismatch_with_the_ir_is_reported():
    ir = model("Bad", var("a", "global", call("Normal", vec(f(0), f(0)), f(1)), shape=(3,)),
               var("x", "observation", call("Normal", f(0), f(1))))
    with pytest.raises(RuntimeModelError, match=r"`a` has shape \(3,\) in the IR, but its distribution draws shape \(2,\)"):
        LoweredModel(ir).sample_globals(jax.random.key(0))


# ----------------------------------------------------------------------------- the example files


def test_examples_lower_with_ir_shapes():
    """Every example model lowers and traces with the IR's shapes (traced only, not compiled:
    the hand-built models above are the ones that run)."""
    try:
        from hierdsl import compile as compile_model
    except ImportError:
        pytest.skip("hierdsl.compile is not available yet")
    paths = [p for p in sorted(EXAMPLES.glob("*.hsbi")) if "\nmodel " in "\n" + p.read_text()]
    if not paths:
        pytest.skip("no example models yet")
    key = jax.random.key(0)
    for path in paths:
        compiled = compile_model(path, import_targets=True)
        m = LoweredModel(compiled.ir, compiled.functions)
        out = jax.eval_shape(functools.partial(m.simulate, num_sites=3), key)
        for var_ in compiled.ir.variables:
            assert out[var_.name].shape == ((3,) if var_.per_site else ()) + var_.shape, (path.name, var_.name)
        assert jax.eval_shape(m.log_prior, out).shape == ()
        z = jax.eval_shape(m.to_unconstrained, out)
        assert jax.eval_shape(m.to_constrained, {**out, **z})[1].shape == ()
