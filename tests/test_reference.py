"""Tests for the Two Moons and SIR reference posteriors (`hierdsl/reference.py`).

Data are simulated here, independently of the reference code: NumPy/SciPy for Two Moons, SciPy's
`solve_ivp` (SIR in counts and days) for SIR. The checks:

- Two Moons: the quadrature likelihood against plain Monte Carlo over the simulator noise and
  against a fine midpoint rule; the site sampler against a fine grid over the noise; every θ draw on the
  crescent of its observation; SBC of the whole reference (slow).
- SIR: the grid posterior against an independent brute-force grid (direct ODE solves of the
  original system on a 2-D (γ, β) grid per site); SBC of the whole reference (slow).

All statistical checks use fixed seeds; tolerances are a few Monte Carlo standard errors.
"""

import warnings

import numpy as np
import pytest
from scipy import integrate, special, stats

from hierdsl import reference
from hierdsl.runtime.metrics import sbc

# ----------------------------------------------------------------------------- Two Moons


def simulate_two_moons(rng: np.random.Generator, n_sites: int):
    """(μ, σ, θ, x) from the prior and simulator of examples/two_moons.hsbi."""
    mu = rng.uniform(-1.0, 1.0, 2)
    sigma = rng.uniform(0.1, 3.0, 2)
    theta = stats.truncnorm.rvs((-1 - mu) / sigma, (1 - mu) / sigma, loc=mu, scale=sigma,
                                size=(n_sites, 2), random_state=rng)
    a = rng.uniform(-np.pi / 2, np.pi / 2, n_sites)
    r = rng.normal(0.1, 0.01, n_sites)
    p = np.stack([r * np.cos(a) + 0.25, r * np.sin(a)], axis=-1)
    z1 = (theta[:, 0] + theta[:, 1]) / np.sqrt(2)
    z2 = (-theta[:, 0] + theta[:, 1]) / np.sqrt(2)
    return mu, sigma, theta, p + np.stack([-np.abs(z1), z2], axis=-1)


def truncnorm_density(theta: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Product over the last axis of TruncatedNormal(μ, σ, −1, 1) densities."""
    z = stats.norm.cdf((1 - mu) / sigma) - stats.norm.cdf((-1 - mu) / sigma)
    inside = np.all(np.abs(theta) <= 1, axis=-1)
    return inside * np.prod(stats.norm.pdf(theta, mu, sigma) / z, axis=-1)


def noise_preimages(x_i: np.ndarray, r: np.ndarray, a: np.ndarray):
    """θ for each noise value (r, a) and sign s = ±1, and whether p₁ ≥ x₁ (a solution exists)."""
    p1, p2 = r * np.cos(a) + 0.25, r * np.sin(a)
    valid = p1 >= x_i[0]
    out = []
    for s in (1.0, -1.0):
        z1, z2 = s * (p1 - x_i[0]), x_i[1] - p2
        out.append(np.stack([(z1 - z2) / np.sqrt(2), (z1 + z2) / np.sqrt(2)], axis=-1))
    return out, valid


PARAMETER_SETTINGS = [  # (μ, σ): a typical value and the most concentrated corners of the prior
    (np.array([0.3, -0.5]), np.array([0.2, 1.5])),
    (np.array([-0.9, 0.8]), np.array([0.1, 0.1])),
    (np.array([0.9, 0.9]), np.array([0.1, 0.1])),
]


def test_two_moons_likelihood_matches_monte_carlo():
    # p(xᵢ | μ, σ) = E_{r,a}[Σ_s TN(θ_s(r, a)) · valid], estimated by brute force.
    rng = np.random.default_rng(0)
    _, _, _, x = simulate_two_moons(rng, 4)
    num = 1_000_000
    for mu, sigma in PARAMETER_SETTINGS[:2]:
        quadrature = np.exp(reference.two_moons_site_log_likelihood(x, mu, sigma))
        for i in range(x.shape[0]):
            r, a = rng.normal(0.1, 0.01, num), rng.uniform(-np.pi / 2, np.pi / 2, num)
            (plus, minus), valid = noise_preimages(x[i], r, a)
            values = valid * (truncnorm_density(plus, mu, sigma) + truncnorm_density(minus, mu, sigma))
            estimate, error = values.mean(), values.std() / np.sqrt(num)
            assert abs(quadrature[i] - estimate) < 4 * error + 1e-6 * estimate, (i, quadrature[i], estimate, error)


def test_two_moons_quadrature_matches_fine_midpoint_rule():
    # The piecewise Gauss–Legendre rule against a 2¹⁶-node midpoint rule of the same integrand.
    import jax
    import jax.numpy as jnp
    from jax.scipy.special import logsumexp

    rng = np.random.default_rng(1)
    _, _, _, x = simulate_two_moons(rng, 6)
    num = 2**16
    a = -np.pi / 2 + (np.arange(num) + 0.5) * np.pi / num
    for mu, sigma in PARAMETER_SETTINGS:
        quadrature = reference.two_moons_site_log_likelihood(x, mu, sigma)
        with jax.enable_x64(True):
            for i in range(x.shape[0]):
                log_mass = reference._two_moons_r_conditional(
                    jnp.asarray(x[i]), jnp.asarray(a)[:, None], jnp.asarray([1.0, -1.0]), jnp.asarray(mu),
                    jnp.asarray(sigma))[0]
                midpoint = float(logsumexp(log_mass) - np.log(num))
                assert abs(quadrature[i] - midpoint) < 2e-4, (i, quadrature[i], midpoint)


def test_two_moons_site_sampler_matches_noise_grid():
    # θᵢ | xᵢ, μ, σ from the reference against a fine deterministic grid over the simulator noise:
    # (r, a) on 801 × 4000 nodes, each sign s, weighted by N(r; 0.1, 0.01) TN(θ_s(r, a); μ, σ) · valid.
    # Compared per branch s = sign(θ₁ + θ₂) (the conditional is bimodal): branch probability, and
    # mean and sd within the branch.
    rng = np.random.default_rng(2)
    _, _, _, x = simulate_two_moons(rng, 3)
    num = 4000
    r = np.linspace(0.1 - 0.08, 0.1 + 0.08, 801)
    a = -np.pi / 2 + (np.arange(4000) + 0.5) * np.pi / 4000
    rr, aa = np.meshgrid(r, a, indexing="ij")
    prior = stats.norm.pdf(rr, 0.1, 0.01)
    for mu, sigma in PARAMETER_SETTINGS[:2]:
        theta = reference.two_moons_sites(x, np.tile(mu, (num, 1)), np.tile(sigma, (num, 1)), seed=3)
        assert theta.shape == (num, 3, 2)
        for i in range(x.shape[0]):
            branches, valid = noise_preimages(x[i], rr, aa)
            weights = [prior * valid * truncnorm_density(t, mu, sigma) for t in branches]
            total = sum(w.sum() for w in weights)
            for sign, candidates, w in zip((1, -1), branches, weights):
                probability = w.sum() / total
                drawn = theta[:, i][np.sign(theta[:, i].sum(-1)) == sign]
                assert abs(len(drawn) / num - probability) < 4 * np.sqrt(probability * (1 - probability) / num) + 1e-3
                if len(drawn) < 100:
                    continue
                w = w / w.sum()
                mean = np.einsum("ra,rac->c", w, candidates)
                sd = np.sqrt(np.einsum("ra,rac->c", w, (candidates - mean) ** 2))
                # Reference Monte Carlo error: sd/√n for the mean, ≈ 1/√(2n) relative for the sd.
                np.testing.assert_array_less(np.abs(drawn.mean(0) - mean), (4 / np.sqrt(len(drawn)) + 0.01) * sd)
                np.testing.assert_array_less(np.abs(drawn.std(0) / sd - 1), 4 / np.sqrt(2 * len(drawn)) + 0.01)


SBC_SITES, SBC_DRAWS = 3, 100


def crescent_radius(x: np.ndarray, theta: np.ndarray):
    """For θ draws (..., n_sites, 2) of data x: the noise (r, a) that maps each θ onto its xᵢ."""
    z1 = (theta[..., 0] + theta[..., 1]) / np.sqrt(2)
    z2 = (-theta[..., 0] + theta[..., 1]) / np.sqrt(2)
    p = x - np.stack([-np.abs(z1), z2], axis=-1)  # x = p + shift(θ)
    q = p - np.array([0.25, 0.0])
    return np.hypot(q[..., 0], q[..., 1]), q[..., 0]


def test_two_moons_draws_lie_on_the_crescent():
    # Every draw reproduces its xᵢ for some noise: p = xᵢ − shift(θ) lies on the right half (cos a ≥ 0)
    # of a circle of radius r ≈ N(0.1, 0.01) about (¼, 0).
    rng = np.random.default_rng(4)
    _, _, _, x = simulate_two_moons(rng, SBC_SITES)
    with warnings.catch_warnings():  # R-hat of a short run (25 draws a chain) is noisy
        warnings.simplefilter("ignore", RuntimeWarning)
        draws = reference.sample_two_moons(x, SBC_DRAWS, seed=5)
    assert draws["mu"].shape == (SBC_DRAWS, 2) and draws["sigma"].shape == (SBC_DRAWS, 2)
    assert draws["theta"].shape == (SBC_DRAWS, SBC_SITES, 2)
    assert np.all((np.abs(draws["mu"]) <= 1) & (draws["sigma"] >= 0.1) & (draws["sigma"] <= 3))
    assert np.all(np.abs(draws["theta"]) <= 1)
    radius, horizontal = crescent_radius(x, draws["theta"])
    assert np.all(horizontal >= -1e-9)
    assert np.all(np.abs(radius - 0.1) < 0.06)  # 6 sds of r
    # Given the data, r stays close to its prior: the TN factor changes on scales ≥ 0.1 ≫ 0.01.
    assert abs(radius.mean() - 0.1) < 0.004
    assert 0.007 < radius.std() < 0.013


@pytest.mark.validation
def test_two_moons_sbc():
    rng = np.random.default_rng(6)
    truths, samples = [], []
    radii = []
    for n in range(100):
        mu, sigma, theta, x = simulate_two_moons(rng, SBC_SITES)
        with warnings.catch_warnings():  # R-hat of these short runs (25 draws a chain) is noisy
            warnings.simplefilter("ignore", RuntimeWarning)
            draws = reference.sample_two_moons(x, SBC_DRAWS, seed=n)
        truths.append(np.concatenate([mu, sigma, theta.ravel()]))
        samples.append(np.concatenate([draws["mu"], draws["sigma"], draws["theta"].reshape(SBC_DRAWS, -1)], axis=1))
        radii.append(crescent_radius(x, draws["theta"])[0])
    result = sbc(np.array(truths), np.array(samples), num_bins=5, level=0.01)
    print("Two Moons SBC p-values (μ, σ, θ):", np.round(result.p_values, 3))
    assert result.passed, result.p_values
    assert np.all(np.abs(np.concatenate(radii) - 0.1) < 0.06)


@pytest.mark.slow
def test_two_moons_chains_converge_on_many_sites():
    rng = np.random.default_rng(7)
    mu, sigma, _, x = simulate_two_moons(rng, 20)
    draws = reference.two_moons_globals(x, 1000, seed=0)
    assert np.max(draws["r_hat"]) < 1.02, draws["r_hat"]
    assert draws["num_divergent"] == 0
    # The posterior is symmetric under R: half the draws on either side of μ₁ + μ₂ = 0.
    assert abs(np.mean(draws["mu"].sum(1) > 0) - 0.5) < 0.06


# ----------------------------------------------------------------------------- SIR

N_POP, TRIALS, DAYS = 1e6, 1000, np.arange(0.0, 154.0, 17.0)


def sir_prevalence_scipy(beta: float, gamma: float, days=DAYS) -> np.ndarray:
    """clamp(I(t)/N, 0, 1) on `days`, solving the SIR ODE in counts as written in examples/sir.hsbi."""

    def rhs(t, u):
        s, i, _ = u
        f = beta * s * i / N_POP
        return [-f, f - gamma * i, gamma * i]

    solution = integrate.solve_ivp(rhs, (0.0, days[-1]), [N_POP - 1.0, 1.0, 0.0], method="DOP853", t_eval=days,
                                   rtol=1e-11, atol=1e-9)
    return np.clip(solution.y[1] / N_POP, 0.0, 1.0)


def simulate_sir(rng: np.random.Generator, n_sites: int):
    gamma = np.exp(np.log(0.125) + 0.2 * rng.standard_normal())
    beta = np.exp(np.log(0.4) + 0.5 * rng.standard_normal(n_sites))
    y = np.stack([rng.binomial(TRIALS, sir_prevalence_scipy(b, gamma)) for b in beta])
    return gamma, beta, y


def brute_force_prevalence(log_gamma: np.ndarray, log_beta: np.ndarray) -> np.ndarray:
    """Prevalence for every pair (γ_k, β_kj), (n_gamma, n_beta, n_days), by direct ODE solves in counts
    and days (Dopri8, vmapped over all pairs), independently of the reference's time scaling."""
    import diffrax
    import jax
    import jax.numpy as jnp

    with jax.enable_x64(True):
        def solve(beta, gamma):
            def rhs(t, u, args):
                f = beta * u[0] * u[1] / N_POP
                return jnp.stack([-f, f - gamma * u[1], gamma * u[1]])

            solution = diffrax.diffeqsolve(
                diffrax.ODETerm(rhs), diffrax.Dopri8(), 0.0, DAYS[-1], None, jnp.array([N_POP - 1.0, 1.0, 0.0]),
                saveat=diffrax.SaveAt(ts=jnp.asarray(DAYS)),
                stepsize_controller=diffrax.PIDController(rtol=1e-10, atol=1e-8), max_steps=100_000)
            return jnp.clip(solution.ys[:, 1] / N_POP, 0.0, 1.0)

        gammas = np.broadcast_to(np.exp(log_gamma)[:, None], log_beta.shape).ravel()
        out = jax.jit(jax.vmap(solve))(jnp.asarray(np.exp(log_beta).ravel()), jnp.asarray(gammas))
        return np.asarray(out).reshape(*log_beta.shape, DAYS.size)


def test_sir_matches_brute_force_grid():
    rng = np.random.default_rng(8)
    _, _, y = simulate_sir(rng, 3)
    draws = reference.sample_sir(y, 4000, seed=9)
    assert draws["gamma"].shape == (4000,) and draws["beta"].shape == (4000, 3)
    log_gamma_ref, log_beta_ref = np.log(draws["gamma"]), np.log(draws["beta"])

    # Brute force: a 2-D grid in (log γ, log βᵢ) per site, windows of ±7 sds about the reference's
    # marginal means (checked below to hold all the mass), rectangle rule.
    g = log_gamma_ref.mean() + 7 * log_gamma_ref.std() * np.linspace(-1, 1, 81)
    log_post = stats.norm.logpdf(g, np.log(0.125), 0.2)
    conditionals = []
    for i in range(y.shape[0]):
        b = log_beta_ref[:, i].mean() + 7 * log_beta_ref[:, i].std() * np.linspace(-1, 1, 161)
        p = np.clip(brute_force_prevalence(g, np.broadcast_to(b, (g.size, b.size))), 1e-12, 1 - 1e-12)
        log_lik = (y[i] * np.log(p) + (TRIALS - y[i]) * np.log1p(-p)).sum(-1)  # (γ, β)
        joint = log_lik + stats.norm.logpdf(b, np.log(0.4), 0.5)
        log_post = log_post + special.logsumexp(joint, axis=1)
        conditionals.append((b, joint - special.logsumexp(joint, axis=1, keepdims=True)))
    log_post -= special.logsumexp(log_post)
    w_gamma = np.exp(log_post)
    # The windows hold the mass: the posterior is negligible at their ends.
    assert log_post[[0, -1]].max() < log_post.max() - 20
    for _, log_cond in conditionals:
        assert w_gamma @ np.exp(log_cond[:, [0, -1]]).sum(1) < 1e-8

    def check(ref: np.ndarray, values: np.ndarray, weights: np.ndarray):
        mean = weights @ values
        sd = np.sqrt(weights @ (values - mean) ** 2)
        # Reference Monte Carlo error with 4000 draws: 0.016 sd (mean), 1.1 % (sd).
        assert abs(ref.mean() - mean) < 0.08 * sd, (ref.mean(), mean, sd)
        assert abs(ref.std() / sd - 1) < 0.06, (ref.std(), sd)

    check(log_gamma_ref, g, w_gamma)
    for i, (b, log_cond) in enumerate(conditionals):
        check(log_beta_ref[:, i], b, w_gamma @ np.exp(log_cond))


def test_sir_grid_resolution():
    # The reported grid resolves the posterior: spacings well below the posterior widths.
    rng = np.random.default_rng(10)
    _, _, y = simulate_sir(rng, 5)
    grid = reference.sir_grid_posterior(y)
    assert grid.gamma_spacing <= 0.3 * grid.gamma_sd
    assert grid.beta_spacing <= grid.beta_sd.min() / 3
    assert grid.log_post[[0, -1]].max() < grid.log_post.max() - 20  # no mass at the window ends


@pytest.mark.validation
def test_sir_sbc():
    rng = np.random.default_rng(11)
    truths, samples = [], []
    for n in range(40):
        gamma, beta, y = simulate_sir(rng, 3)
        draws = reference.sample_sir(y, 99, seed=n)
        truths.append(np.concatenate([[gamma], beta]))
        samples.append(np.concatenate([draws["gamma"][:, None], draws["beta"]], axis=1))
    result = sbc(np.array(truths), np.array(samples), num_bins=4, level=0.01)
    print("SIR SBC p-values (γ, β):", np.round(result.p_values, 3))
    assert result.passed, result.p_values
