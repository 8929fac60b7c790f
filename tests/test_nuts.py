"""Reference posteriors by NUTS: the likelihood read off compiled models (`runtime/likelihood.py`)
against hand-written SciPy formulas, the intractable cases, non-centred coordinates, and NUTS
itself (`hierdsl/nuts.py`) against the exact Gaussian Linear posterior and on the Eight Schools
funnel. Every jitted function is built once per module; the statistical tests are marked slow.
"""

from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats as st
from scipy.integrate import solve_ivp

import hierdsl
from hierdsl.nuts import ReferencePosterior, bulk_ess, reference_posterior, split_r_hat, validate_reference
from hierdsl.reference import sample_gaussian_linear
from hierdsl.runtime.likelihood import (
    IntractableLikelihoodError,
    from_noncentred,
    log_joint_noncentred,
    log_joint_unconstrained,
    log_likelihood,
    noncentred_locals,
    to_noncentred,
)
from hierdsl.runtime.errors import RuntimeModelError
from hierdsl.runtime.metrics import c2st, flatten_draws

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
EIGHT_SCHOOLS_Y = np.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
EIGHT_SCHOOLS_SIGMA = np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
# Gaussian Linear's σ → 0 is a funnel of the likelihood (μᵢ | xᵢ, σ has sd ≈ σ): a high acceptance
# target keeps divergences rare, and thinning makes the draws nearly independent for the C2ST.
# Shared by the NUTS tests on Gaussian Linear, so that they share one compiled sampler.
GAUSSIAN_LINEAR_NUTS = {"num_samples": 2000, "num_warmup": 500, "thinning": 10, "target_accept_prob": 0.95}


@functools.cache
def example(name: str, **args) -> hierdsl.Model:
    return hierdsl.compile(os.path.join(EXAMPLES, f"{name}.hsbi"), args=args or None)


@functools.cache
def jitted(kind: str, name: str, **args):
    """`log_likelihood` or `log_joint_unconstrained` of an example, jitted once."""
    lowered = example(name, **args).lowered()
    fn = {"likelihood": log_likelihood, "joint": log_joint_unconstrained}[kind]
    return jax.jit(functools.partial(fn, lowered))


# ----------------------------------------------------------------------------- log likelihood


def test_log_likelihood_gaussian_linear_matches_scipy():
    rng = np.random.default_rng(0)
    fn = jitted("likelihood", "gaussian_linear", n_sites=10)
    for _ in range(3):
        sigma = rng.uniform(0.2, 2.0)
        mu, x = rng.normal(size=10), rng.normal(scale=2.0, size=10)
        got = fn({"sigma": np.float32(sigma), "mu": mu.astype(np.float32)}, {"x": x})
        np.testing.assert_allclose(got, st.norm.logpdf(x, mu, sigma).sum(), rtol=1e-5)


def test_log_likelihood_eight_schools_reads_the_per_site_input():
    rng = np.random.default_rng(1)
    fn = jitted("likelihood", "eight_schools")
    data = {"y": EIGHT_SCHOOLS_Y, "sigma": EIGHT_SCHOOLS_SIGMA}
    for _ in range(3):
        params = {"mu": np.float32(rng.normal(0, 5)), "tau": np.float32(rng.uniform(0.1, 10)),
                  "theta": rng.normal(5, 10, size=8).astype(np.float32)}
        expected = st.norm.logpdf(EIGHT_SCHOOLS_Y, params["theta"], EIGHT_SCHOOLS_SIGMA).sum()
        np.testing.assert_allclose(fn(params, data), expected, rtol=1e-5)


def test_log_joint_unconstrained_is_prior_plus_jacobian_plus_likelihood():
    rng = np.random.default_rng(2)
    fn = jitted("joint", "eight_schools")
    data = {"y": EIGHT_SCHOOLS_Y, "sigma": EIGHT_SCHOOLS_SIGMA}
    for _ in range(3):
        mu, log_tau, theta = rng.normal(0, 5), rng.normal(0, 1), rng.normal(5, 10, size=8)
        tau = np.exp(log_tau)
        expected = (
            st.norm.logpdf(mu, 0, 5) + st.halfcauchy.logpdf(tau, scale=5) + log_tau  # log |dτ/dz| = z
            + st.norm.logpdf(theta, mu, tau).sum() + st.norm.logpdf(EIGHT_SCHOOLS_Y, theta, EIGHT_SCHOOLS_SIGMA).sum()
        )
        z = {"mu": np.float32(mu), "tau": np.float32(log_tau), "theta": theta.astype(np.float32)}
        np.testing.assert_allclose(fn(z, data), expected, rtol=1e-5)


def test_mixture_and_iid_multivariate_normal_likelihoods_match_scipy():
    rng = np.random.default_rng(3)
    theta, x = rng.normal(size=5), rng.normal(size=5)
    params = {"mu": np.float32(0.3), "sigma": np.float32(1.2), "theta": theta.astype(np.float32)}
    expected = np.logaddexp(np.log(0.5) + st.norm.logpdf(x, theta, 1.0), np.log(0.5) + st.norm.logpdf(x, theta, 0.1))
    got = jitted("likelihood", "gaussian_mixture", n_sites=5)(params, {"x": x})
    np.testing.assert_allclose(got, expected.sum(), rtol=1e-5)

    s1, s2, rho = 1.3, 0.7, 0.4
    c = np.tanh(rho) * s1**2 * s2**2
    cov = np.array([[s1**4, c], [c, s2**4]])
    m, x = rng.uniform(-3, 3, size=(3, 2)), rng.normal(size=(3, 4, 2))
    params = {"s1": np.float32(s1), "s2": np.float32(s2), "rho": np.float32(rho), "m": m.astype(np.float32)}
    expected = sum(st.multivariate_normal.logpdf(x[i], m[i], cov).sum() for i in range(3))
    got = jitted("likelihood", "slcp", n_sites=3)(params, {"x": x})
    np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.slow
def test_binomial_counts_of_an_ode_solution_match_scipy_and_differentiate():
    lowered = example("sir", n_sites=2).lowered()
    beta, gamma = np.array([0.45, 0.3]), 0.11
    days = np.arange(0.0, 154.0, 17.0)
    y = np.array([[0, 5, 300, 200, 60, 15, 4, 1, 0, 0], [0, 1, 12, 50, 90, 80, 50, 25, 10, 5]], np.float32)
    expected = 0.0
    for b, counts in zip(beta, y):
        rhs = lambda t, u, b=b: [-b * u[0] * u[1] / 1e6, b * u[0] * u[1] / 1e6 - gamma * u[1], gamma * u[1]]
        solution = solve_ivp(rhs, (0.0, days[-1]), [1e6 - 1, 1.0, 0.0], t_eval=days, rtol=1e-10, atol=1e-6)
        expected += st.binom.logpmf(counts, 1000, np.clip(solution.y[1] / 1e6, 0, 1)).sum()

    def fn(params):
        return log_likelihood(lowered, params, {"y": y})

    value, grad = jax.jit(jax.value_and_grad(fn))({"gamma": jnp.float32(gamma), "beta": jnp.asarray(beta, jnp.float32)})
    np.testing.assert_allclose(value, expected, rtol=1e-3)
    assert all(np.all(np.isfinite(g)) and np.all(g != 0) for g in jax.tree.leaves(grad))


# ----------------------------------------------------------------------------- intractable likelihoods


def test_two_moons_observation_computed_with_equals_has_no_likelihood():
    model = example("two_moons", n_sites=3)
    lowered = model.lowered()
    params = {"mu": np.zeros(2), "sigma": np.ones(2), "theta": np.zeros((3, 2))}
    message = r"observation `x` is computed with `=`, its likelihood is not available; .*`observe x ~ Dist\(…\)`"
    with pytest.raises(IntractableLikelihoodError, match=message):
        log_likelihood(lowered, params, {"x": np.zeros((3, 2))})
    with pytest.raises(IntractableLikelihoodError, match=message):
        reference_posterior(model, {"x": np.zeros((3, 2))}, num_samples=100, key=jax.random.key(0))


def test_observation_reading_simulator_randomness_has_no_likelihood():
    model = hierdsl.compile("""
function jitter(m)
    e ~ Normal(0.0, 1.0)
    return m + e
end

model Jittered(n_sites::Int = 3)
    s ~ HalfNormal(1.0)
    sites i in 1:n_sites
        mu ~ Normal(0.0, 1.0)
        observe y ~ Normal(jitter(mu), s)
    end
end
""")
    message = r"observation `y`'s distribution draws simulator randomness \(through `jitter`\)"
    with pytest.raises(IntractableLikelihoodError, match=message):
        log_likelihood(model.lowered(), {"s": 1.0, "mu": np.zeros(3)}, {"y": np.zeros(3)})


def test_data_without_a_site_axis_or_missing_an_input_are_refused():
    lowered = example("eight_schools").lowered()
    params = {"mu": 0.0, "tau": 1.0, "theta": np.zeros(8)}
    with pytest.raises(RuntimeModelError, match=r"the data lack `sigma`"):
        log_likelihood(lowered, params, {"y": EIGHT_SCHOOLS_Y})
    with pytest.raises(RuntimeModelError, match=r"leading site axis"):
        log_likelihood(lowered, params, {"y": np.float32(1.0), "sigma": np.float32(1.0)})


# ----------------------------------------------------------------------------- non-centred coordinates


def test_noncentred_coordinates_invert_and_add_the_log_scale():
    model = example("eight_schools")
    lowered = model.lowered()
    assert noncentred_locals(model.ir) == ("theta",)
    assert noncentred_locals(example("gaussian_mixture", n_sites=5).ir) == ()  # TruncatedNormal stays centred
    data = {"y": EIGHT_SCHOOLS_Y, "sigma": EIGHT_SCHOOLS_SIGMA}
    u = {"mu": jnp.float32(1.5), "tau": jnp.float32(0.7), "theta": jnp.linspace(-1.0, 1.0, 8)}

    @jax.jit
    def check(u):
        z, log_det = from_noncentred(lowered, u, data)
        back = to_noncentred(lowered, z, data)
        return z, log_det, back, log_joint_noncentred(lowered, u, data), log_joint_unconstrained(lowered, z, data)

    z, log_det, back, noncentred, centred = check(u)
    tau = np.exp(0.7)
    np.testing.assert_allclose(z["theta"], 1.5 + tau * np.linspace(-1.0, 1.0, 8), rtol=1e-5)
    np.testing.assert_allclose(log_det, 8 * 0.7, rtol=1e-5)
    np.testing.assert_allclose(back["theta"], u["theta"], atol=1e-5)
    np.testing.assert_allclose(noncentred, centred + 8 * 0.7, rtol=1e-5)


# ----------------------------------------------------------------------------- diagnostics and packaging


def test_diagnostics_flag_disagreeing_chains():
    rng = np.random.default_rng(4)
    mixed = rng.normal(size=(4, 500))
    stuck = mixed + np.arange(4)[:, None]  # each chain around its own value
    assert np.all(split_r_hat(mixed) < 1.01) and split_r_hat(stuck) > 1.5
    assert 1000 < bulk_ess(mixed) < 3000 and bulk_ess(stuck) < 100


def test_missing_numpyro_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "numpyro", None)
    with pytest.raises(ImportError, match=r"pip install 'hierdsl\[bench\]'"):
        split_r_hat(np.zeros((2, 8)))


# ----------------------------------------------------------------------------- NUTS


@pytest.mark.slow
def test_nuts_agrees_with_the_exact_gaussian_linear_posterior():
    model = example("gaussian_linear", n_sites=10)
    x = np.asarray(model.simulate(jax.random.key(3))["x"])
    reference = reference_posterior(model, {"x": x}, key=jax.random.key(0), **GAUSSIAN_LINEAR_NUTS)
    assert isinstance(reference, ReferencePosterior)
    assert reference.samples["sigma"].shape == (2000,) and reference.samples["mu"].shape == (2000, 10)
    assert reference.r_hat["mu"].shape == reference.ess["mu"].shape == (10,)
    assert reference.max_r_hat < 1.01 and reference.min_ess > 400 and reference.trusted
    exact = sample_gaussian_linear(x, 1000, seed=1)
    nuts = {name: value[::2] for name, value in reference.samples.items()}
    score = c2st(flatten_draws(exact, ["sigma", "mu"]), flatten_draws(nuts, ["sigma", "mu"]), jax.random.key(5))
    print(f"C2ST {score:.3f}, max R-hat {reference.max_r_hat:.4f}, min ESS {reference.min_ess:.0f}, "
          f"{reference.num_divergent} divergent, {reference.seconds:.1f} s")
    assert score < 0.55


@pytest.mark.slow
def test_nuts_samples_the_eight_schools_funnel():
    reference = reference_posterior(example("eight_schools"), {"y": EIGHT_SCHOOLS_Y, "sigma": EIGHT_SCHOOLS_SIGMA},
                                    num_samples=2000, key=jax.random.key(1), num_warmup=500)
    assert reference.trusted and reference.num_divergent < 20
    # The well-known posterior (e.g. Stan's non-centred fit): E μ ≈ 4.4, E τ ≈ 3.6, sd ≈ 3.3 and 3.2.
    assert abs(reference.samples["mu"].mean() - 4.4) < 0.4
    assert abs(reference.samples["tau"].mean() - 3.6) < 0.4


@pytest.mark.slow
def test_validate_reference_returns_ranks_of_the_truths():
    validation = validate_reference(example("gaussian_linear", n_sites=10), num_observations=2, key=jax.random.key(2),
                                    **GAUSSIAN_LINEAR_NUTS)
    assert validation.num_samples == 2000
    assert validation.ranks["sigma"].shape == (2,) and validation.ranks["mu"].shape == (2, 10)
    for ranks in validation.ranks.values():
        assert np.all((ranks >= 0) & (ranks <= 2000))
    assert validation.trusted.shape == validation.num_divergent.shape == (2,)
    p_values = validation.p_values(num_bins=2)
    assert p_values["mu"].shape == (10,) and np.all((p_values["mu"] >= 0) & (p_values["mu"] <= 1))
