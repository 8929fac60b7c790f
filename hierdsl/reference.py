"""Reference posteriors for the benchmark tasks (`benchmark.md`): draws from the exact posterior, or
from a deterministic approximation of it whose error is far below Monte Carlo error.

- Gaussian Linear and Gaussian Linear Uniform (NumPy/SciPy): `sample_gaussian_linear`, below.
- Two Moons: `sample_two_moons` (quadrature likelihood of the globals, NUTS, exact site conditionals).
- SIR: `sample_sir` (two-level grid over γ and the β of each site, from time-scaled ODE solves).

The two Gaussian Linear tasks have σ ~ HalfNormal(1) and x_i ~ Normal(μ_i, σ). Given σ the sites
decouple, so the posterior is sampled exactly up to a fine 1-D grid over σ:

- Gaussian Linear, μ_i ~ Normal(0, 1): x_i | σ ~ Normal(0, √(1 + σ²)) and
  μ_i | x_i, σ ~ Normal(x_i / (1 + σ²), σ / √(1 + σ²)).
- Gaussian Linear Uniform, μ_i ~ Uniform(−10, 10): p(x_i | σ) = [Φ((10 − x_i)/σ) − Φ((−10 − x_i)/σ)] / 20
  and μ_i | x_i, σ ~ TruncatedNormal(x_i, σ, −10, 10).

Two Moons and SIR use JAX (float64 inside `jax.enable_x64`), Diffrax and NumPyro, imported on first use.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import special, stats


def _sigma_grid(num: int = 4000, upper: float = 6.0) -> np.ndarray:
    # Cell midpoints on (0, upper]: the HalfNormal(1) prior puts < 2e-9 mass beyond 6.
    edges = np.linspace(0.0, upper, num + 1)
    return 0.5 * (edges[1:] + edges[:-1]), edges[1] - edges[0]


def sigma_log_posterior(x: np.ndarray, uniform: bool = False):
    """Grid and normalised log posterior density of σ given all sites' observations."""
    grid, width = _sigma_grid()
    log_prior = stats.halfnorm.logpdf(grid)
    x = np.asarray(x, dtype=np.float64)[:, None]
    if uniform:
        upper = special.log_ndtr((10.0 - x) / grid)
        lower = special.log_ndtr((-10.0 - x) / grid)
        log_lik = upper + np.log1p(-np.exp(np.minimum(lower - upper, 0.0))) - np.log(20.0)
    else:
        log_lik = stats.norm.logpdf(x, 0.0, np.sqrt(1.0 + grid**2))
    log_post = log_prior + log_lik.sum(axis=0)
    log_post -= special.logsumexp(log_post) + np.log(width)
    return grid, width, log_post


def sample_gaussian_linear(x: np.ndarray, num: int, seed: int = 0, uniform: bool = False) -> dict[str, np.ndarray]:
    """Exact posterior draws: `sigma` (num,), `mu` (num, sites)."""
    rng = np.random.default_rng(seed)
    grid, width, log_post = sigma_log_posterior(x, uniform)
    probs = np.exp(log_post) * width
    cells = rng.choice(grid.size, size=num, p=probs / probs.sum())
    sigma = grid[cells] + (rng.random(num) - 0.5) * width
    x = np.asarray(x, dtype=np.float64)[None, :]
    s = sigma[:, None]
    if uniform:
        a, b = (-10.0 - x) / s, (10.0 - x) / s
        mu = stats.truncnorm.rvs(a, b, loc=x, scale=s, random_state=rng)
    else:
        mean = x / (1.0 + s**2)
        sd = s / np.sqrt(1.0 + s**2)
        mu = mean + sd * rng.standard_normal(mean.shape)
    return {"sigma": sigma, "mu": np.asarray(mu)}


def posterior_mean_sigma(x: np.ndarray, uniform: bool = False) -> float:
    grid, width, log_post = sigma_log_posterior(x, uniform)
    return float(np.sum(grid * np.exp(log_post) * width))


# ============================================================================= Two Moons
#
# Model (examples/two_moons.hsbi): μ ~ U(−1, 1)², σ ~ U(0.1, 3)², θᵢ ~ TN(μ, σ, −1, 1) elementwise,
# xᵢ = p + (−|z₁|, z₂), z = ((θ₁ + θ₂)/√2, (−θ₁ + θ₂)/√2), p = (r cos a + ¼, r sin a),
# a ~ U(−π/2, π/2), r ~ N(0.1, 0.01).
#
# Likelihood of the globals. θ ↦ z is a rotation and z ↦ (−|z₁|, z₂) is affine with |det| = 1 on
# each half-plane sign(z₁) = s, so for fixed noise (r, a) the equation xᵢ = p(r, a) + shift(θ) has
# one solution θ_s(r, a) per sign s ∈ {±1}:
#     z₁ = s (p₁ − x₁)  (a solution only if p₁ ≥ x₁),   z₂ = x₂ − p₂,   θ₁ = (z₁ − z₂)/√2,   θ₂ = (z₁ + z₂)/√2,
# and, the Jacobian being 1,
#     p(xᵢ | μ, σ) = E_{r,a}[ Σ_s TN(θ_s(r, a); μ, σ) · 1{p₁(r, a) ≥ x₁} ].
# For fixed (a, s), θ_s is affine in r, θ_k = c_k + d_k r, with
#     c₁ = (s (¼ − x₁) − x₂)/√2,  d₁ = (s cos a + sin a)/√2,
#     c₂ = (s (¼ − x₁) + x₂)/√2,  d₂ = (s cos a − sin a)/√2,
# and the constraints (validity r cos a ≥ x₁ − ¼, box −1 ≤ θ_k ≤ 1) are linear in r: they cut r to an
# interval [lo, hi]. N(r; r₀, 0.01) · N(θ₁; μ₁, σ₁) · N(θ₂; μ₂, σ₂) is Gaussian in r, so the r-integral
# is closed form. With precisions τ₀ = 10⁴, τ_k = σ_k⁻² and e_k = μ_k − c_k,
#     P = τ₀ + d₁²τ₁ + d₂²τ₂,   m = (τ₀ r₀ + d₁e₁τ₁ + d₂e₂τ₂)/P,
#     Q = [τ₀τ₁(d₁r₀ − e₁)² + τ₀τ₂(d₂r₀ − e₂)² + τ₁τ₂(d₂e₁ − d₁e₂)²]/P   (the residual; no cancellation),
#     ∫_lo^hi … dr = e^{−Q/2} √(2π/P) [Φ(√P(hi − m)) − Φ(√P(lo − m))] / ((2π)^{3/2} 0.01 σ₁σ₂ Z₁Z₂),
# Z_k the truncation constants of the TN; r is also cut to `_R_CLIP` (m lies within ±0.06 of r₀, so
# the clip is ≥ 14 conditional sds away and drops mass below e⁻⁹⁸).
#
# What is left, (1/π)∫ da, is a 1-D integral of a continuous function of a that is smooth except at
# the angles where the binding constraint changes or the interval closes, and varies fast where an
# end of [lo, hi] sweeps through the bulk of r (near a = ±π/2 the validity bound (x₁ − ¼)/cos a does).
# `_two_moons_parts` cuts (−π/2, π/2), per site and sign, wherever the binding constraints change or
# an end crosses a multiple of 0.03 (3 sds of r) within r ∈ [−0.02, 0.22] (a scan on 4096 cells plus
# geometric points near ±π/2, then bisection to ~1e-15), and into parts of at most π/4; these cuts
# depend on x only. A Gauss–Legendre rule of order `TWO_MOONS_GL_ORDER` on each part (~85 nodes per
# site) makes log p(x | μ, σ) = Σᵢ log p(xᵢ | μ, σ) a smooth, deterministic function of the four
# globals, within 5e-5 per site of a 2¹⁸-node midpoint rule even at the most concentrated corners of
# the prior (checked in the tests against a 2¹⁶-node rule and against plain Monte Carlo).
#
# Globals: NUTS (NumPyro's kernel, dense mass matrix, 4 chains) on that likelihood in unconstrained
# coordinates μ = −1 + 2 sigmoid(u), σ = 0.1 + 2.9 sigmoid(v); the log-Jacobian is
# Σ log w + log sigmoid(u) + log sigmoid(−u) (w the box widths), and the uniform prior adds a constant.
# The posterior is exactly invariant under the reflection R: (μ₁, μ₂, σ₁, σ₂) ↦ (−μ₂, −μ₁, σ₂, σ₁)
# (θ ↦ (−θ₂, −θ₁) flips z₁, keeps z₂, and prior and box are symmetric), so it is typically bimodal and
# a chain may stay in one mode. Each draw is reflected with probability ½: this keeps an R-invariant
# target invariant and turns draws from one mode into draws from both. Split R-hat is checked on the
# folded draws (the representative with μ₁ + μ₂ ≥ 0).
#
# Locals: given the globals the sites are independent and θᵢ is a function of (r, a, s), whose
# conditional density is ∝ N(r) U(a) TN(θ_s(r, a)) · constraints. It is sampled the way the likelihood
# is computed: each part is cut into `TWO_MOONS_CELLS` cells; a cell is drawn ∝ its mass under the
# log-linear interpolation of the r-integrated mass between the cell's ends, a from that log-linear
# density within the cell (exact inverse CDF), then r exactly from its Gaussian conditional truncated
# to [lo(a), hi(a)] (inverse CDF in log space). The one approximation is the log-linear a-marginal
# within cells of at most π/64 rad (θ moves by at most 0.005 across one), checked in the tests against
# a fine grid over the noise.

TWO_MOONS_CELLS = 16
TWO_MOONS_GL_ORDER = 6
_R_MEAN, _R_SD = 0.1, 0.01
_R_CLIP = (-0.1, 0.3)
_BAND, _BAND_STEP = (-0.02, 0.22), 0.03  # where the r-interval's ends matter, and their resolution
_MU_LOW, _MU_HIGH = -1.0, 1.0
_SIGMA_LOW, _SIGMA_HIGH = 0.1, 3.0
_SIGNS = np.array([1.0, -1.0])


def _two_moons_bounds(x, a, s, xp=np):
    """θ_s(r, a) = c + d r and the candidate bounds on r, for x (..., 2), a (...) and signs s (...).

    Returns c, d (..., 2) and the candidates for the lower bound (validity, box θ₁, box θ₂, clip)
    and for the upper bound (box θ₁, box θ₂, clip), (..., 4) and (..., 3); lo = max, hi = min.
    """
    x1, x2 = x[..., 0], x[..., 1]
    cos_a, sin_a = xp.cos(a), xp.sin(a)
    k = s * (0.25 - x1)
    root2 = np.sqrt(2.0)
    c = xp.stack([(k - x2) / root2, (k + x2) / root2], axis=-1)
    d = xp.stack([(s * cos_a + sin_a) / root2, (s * cos_a - sin_a) / root2], axis=-1)
    d = xp.where(xp.abs(d) < 1e-12, 1e-12, d)  # an exactly level line: bounds ±1e12, i.e. clipped
    lo_box = xp.where(d > 0, (-1.0 - c) / d, (1.0 - c) / d)
    hi_box = xp.where(d > 0, (1.0 - c) / d, (-1.0 - c) / d)
    v = (x1 - 0.25) / cos_a + 0.0 * s  # r cos a ≥ x₁ − ¼, and cos a > 0 on (−π/2, π/2)
    lo = xp.stack([v, lo_box[..., 0], lo_box[..., 1], xp.full_like(v, _R_CLIP[0])], axis=-1)
    hi = xp.stack([hi_box[..., 0], hi_box[..., 1], xp.full_like(v, _R_CLIP[1])], axis=-1)
    return c, d, lo, hi


def _log_diff_ndtr(lo, hi):
    """log(Φ(hi) − Φ(lo)) for lo ≤ hi (JAX); −inf where lo ≥ hi, with finite gradients there.

    The interval is mirrored onto the left tail (lo + hi ≤ 0), where Φ = erfc(−·/√2)/2 keeps its
    relative accuracy, so the difference does not cancel.
    """
    import jax.numpy as jnp
    from jax.scipy.special import erfc

    empty = hi <= lo
    hi = jnp.where(empty, lo + 1.0, hi)
    flip = lo + hi > 0
    a, b = jnp.where(flip, -hi, lo), jnp.where(flip, -lo, hi)
    diff = 0.5 * (erfc(-b / np.sqrt(2.0)) - erfc(-a / np.sqrt(2.0)))
    return jnp.where(empty, -jnp.inf, jnp.log(jnp.maximum(diff, 1e-300)))


def _two_moons_r_conditional(x, a, s, mu, sigma):
    """The r-integral of each branch (JAX): log mass, and r's conditional N(m, 1/P) on [lo, hi].

    x (..., 2), a and s (...), mu and sigma (..., 2), all broadcast. exp(log mass) is the integrand
    of E_a: p(xᵢ | μ, σ) = (1/π) ∫ Σ_s exp(log mass(a, s)) da.
    """
    import jax.numpy as jnp

    c, d, lo_cands, hi_cands = _two_moons_bounds(x, a, s, jnp)
    lo, hi = lo_cands.max(-1), hi_cands.min(-1)
    t0, t = 1.0 / _R_SD**2, 1.0 / sigma**2
    e = mu - c
    d1, d2, e1, e2, t1, t2 = d[..., 0], d[..., 1], e[..., 0], e[..., 1], t[..., 0], t[..., 1]
    precision = t0 + d1**2 * t1 + d2**2 * t2
    mean = (t0 * _R_MEAN + d1 * e1 * t1 + d2 * e2 * t2) / precision
    residual = (t0 * t1 * (d1 * _R_MEAN - e1) ** 2 + t0 * t2 * (d2 * _R_MEAN - e2) ** 2
                + t1 * t2 * (d2 * e1 - d1 * e2) ** 2) / precision
    root = jnp.sqrt(precision)
    log_z = _log_diff_ndtr((_MU_LOW - mu) / sigma, (_MU_HIGH - mu) / sigma).sum(-1)  # TN truncation
    log_mass = (-0.5 * residual - 0.5 * jnp.log(precision) - jnp.log(2 * np.pi) - np.log(_R_SD)
                - jnp.log(sigma).sum(-1) - log_z + _log_diff_ndtr(root * (lo - mean), root * (hi - mean)))
    return log_mass, mean, precision, lo, hi


def _two_moons_key(x, a, s):
    """A label of the r-interval's shape (NumPy): which constraints bind below and above, and in which
    `_BAND_STEP`-wide band of r each bound lies (bounds outside `_BAND` share one label); −1 where the
    interval is empty. Between changes of the label the a-integrand is smooth and the bounds move by
    at most one band, so a low-order Gauss–Legendre rule integrates it accurately."""
    _, _, lo, hi = _two_moons_bounds(x, a, s)
    low, high = lo.max(-1), hi.min(-1)
    levels = int(round((_BAND[1] - _BAND[0]) / _BAND_STEP))
    band = lambda r: np.clip(np.floor((r - _BAND[0]) / _BAND_STEP), -1, levels)
    key = ((lo.argmax(-1) * 3 + hi.argmin(-1)) * (levels + 2) + band(low) + 1) * (levels + 2) + band(high) + 1
    return np.where(low >= high, -1, key)


def _scan_angles(cells: int) -> np.ndarray:
    """Scan points on (−π/2, π/2): uniform cells, plus geometric points within 1e-3 of the ends, where
    the validity bound (x₁ − ¼)/cos a changes fastest."""
    uniform = -np.pi / 2 + (np.arange(cells) + 0.5) * np.pi / cells
    gaps = np.pi / 2 - 10.0 ** -np.arange(3.0, 12.0, 0.125)
    return np.unique(np.concatenate([-gaps, uniform, gaps]))


def _two_moons_parts(x: np.ndarray, scan_cells: int = 4096, max_part: float = np.pi / 4) -> list[np.ndarray]:
    """The smooth pieces of every site's a-integrand: per site, rows (a₀, a₁, s), a₁ − a₀ ≤ `max_part`.

    The pieces lie between the angles where `_two_moons_key` changes (found on a scan, then by
    bisection to ~1e-15); pieces where the r-interval is empty are left out.
    """
    x = np.asarray(x, np.float64)
    scan = _scan_angles(scan_cells)
    per_site = []
    for i in range(x.shape[0]):
        rows = []
        for s in _SIGNS:
            keys = _two_moons_key(x[i], scan, s)
            change = np.flatnonzero(keys[1:] != keys[:-1])
            left, right = scan[change], scan[change + 1]
            left_key = keys[change]
            for _ in range(52):
                middle = 0.5 * (left + right)
                same = _two_moons_key(x[i], middle, s) == left_key
                left, right = np.where(same, middle, left), np.where(same, right, middle)
            cuts = np.concatenate([[-np.pi / 2], 0.5 * (left + right), [np.pi / 2]])
            for a0, a1 in zip(cuts[:-1], cuts[1:]):
                if a1 - a0 <= 0 or _two_moons_key(x[i], 0.5 * (a0 + a1), s) < 0:
                    continue
                bounds = np.linspace(a0, a1, int(np.ceil((a1 - a0) / max_part)) + 1)
                rows.extend((b0, b1, s) for b0, b1 in zip(bounds[:-1], bounds[1:]))
        per_site.append(np.array(rows, np.float64).reshape(-1, 3))
    return per_site


def _two_moons_quadrature(parts: list[np.ndarray], order: int = TWO_MOONS_GL_ORDER, pad_to: int = 512):
    """Nodes for (1/π)∫ Σ_s f(a, s) da on every site: angles, signs, log weights and site indices.

    A Gauss–Legendre rule of `order` on every piece of `_two_moons_parts`. The sites' nodes are
    concatenated and padded to a multiple of `pad_to` (a few shapes serve all data sets) with
    weight zero (log weight −inf).
    """
    gl_t, gl_w = np.polynomial.legendre.leggauss(order)
    rows = np.concatenate(parts)
    half = 0.5 * (rows[:, 1:2] - rows[:, 0:1])
    angles = (0.5 * (rows[:, 0:1] + rows[:, 1:2]) + half * gl_t).ravel()
    log_w = np.log(half * gl_w / np.pi).ravel()
    signs = np.repeat(rows[:, 2], order)
    site = np.repeat(np.repeat(np.arange(len(parts)), [len(p) for p in parts]), order).astype(np.int32)
    size = -(-angles.size // pad_to) * pad_to
    pad = size - angles.size
    return (np.concatenate([angles, np.zeros(pad)]), np.concatenate([signs, np.ones(pad)]),
            np.concatenate([log_w, np.full(pad, -np.inf)]), np.concatenate([site, np.zeros(pad, np.int32)]))


def _two_moons_cells(parts: list[np.ndarray], cells_per_part: int = TWO_MOONS_CELLS, pad_to: int = 16):
    """Sampling cells of a: `cells_per_part` equal cells on every piece, per site.

    Returns the cell edges (n_sites, P, cells_per_part + 1), the pieces' signs (n_sites, P) and
    whether a piece is real (False for padding); P is padded to a multiple of `pad_to`.
    """
    size = -(-max(len(p) for p in parts) // pad_to) * pad_to
    edges = np.zeros((len(parts), size, cells_per_part + 1))
    edges[...] = np.linspace(-0.5, 0.5, cells_per_part + 1)  # padding: any valid angles
    sign, real = np.ones((len(parts), size)), np.zeros((len(parts), size), bool)
    fractions = np.linspace(0.0, 1.0, cells_per_part + 1)
    for i, rows in enumerate(parts):
        n = len(rows)
        edges[i, :n] = rows[:, 0:1] + fractions * (rows[:, 1:2] - rows[:, 0:1])
        sign[i, :n], real[i, :n] = rows[:, 2], True
    return edges, sign, real


def _two_moons_log_lik(x, nodes, mu, sigma):
    """log p(xᵢ | μ, σ) per site (JAX) from `_two_moons_quadrature` nodes; mu and sigma (2,)."""
    import jax
    import jax.numpy as jnp

    a, s, log_w, site = nodes
    terms = log_w + _two_moons_r_conditional(x[site], a, s, mu, sigma)[0]
    top = jax.lax.stop_gradient(jax.ops.segment_max(terms, site, num_segments=x.shape[0]))
    total = jax.ops.segment_sum(jnp.exp(terms - top[site]), site, num_segments=x.shape[0])
    return top + jnp.log(total)


def two_moons_site_log_likelihood(x: np.ndarray, mu, sigma) -> np.ndarray:
    """log p(xᵢ | μ, σ) per site, x (n_sites, 2), mu and sigma (2,): the likelihood NUTS uses."""
    import jax

    x = np.asarray(x, np.float64)
    nodes = _two_moons_quadrature(_two_moons_parts(x))
    with jax.enable_x64(True):
        value = _two_moons_log_lik(jax.numpy.asarray(x), tuple(map(jax.numpy.asarray, nodes)),
                                   jax.numpy.asarray(mu, np.float64), jax.numpy.asarray(sigma, np.float64))
        return np.asarray(value)


def _two_moons_unpack(u):
    import jax
    import jax.numpy as jnp

    mu = _MU_LOW + (_MU_HIGH - _MU_LOW) * jax.nn.sigmoid(u[:2])
    sigma = _SIGMA_LOW + (_SIGMA_HIGH - _SIGMA_LOW) * jax.nn.sigmoid(u[2:])
    widths = jnp.array([_MU_HIGH - _MU_LOW] * 2 + [_SIGMA_HIGH - _SIGMA_LOW] * 2)
    log_jacobian = jnp.sum(jnp.log(widths) + jax.nn.log_sigmoid(u) + jax.nn.log_sigmoid(-u))
    return mu, sigma, log_jacobian


def _two_moons_potential(u, x, nodes):
    mu, sigma, log_jacobian = _two_moons_unpack(u)
    return -(_two_moons_log_lik(x, nodes, mu, sigma).sum() + log_jacobian)


_TWO_MOONS_RUNNERS: dict = {}


def _two_moons_runner(num_chains: int, num_warmup: int, num_draws: int, thinning: int, num_init: int = 32):
    """Jitted `(key, x, nodes) → (unconstrained draws (chains, draws, 4), diverging)`.

    The data are traced arguments, so it compiles once per shape and serves every data set. The
    chains run one after another (`lax.map`): in lockstep (`vmap`) every chain would wait for the
    longest trajectory of any.
    """
    settings = (num_chains, num_warmup, num_draws, thinning, num_init)
    if settings not in _TWO_MOONS_RUNNERS:
        import jax
        import jax.numpy as jnp
        from numpyro.infer.hmc import hmc

        init_kernel, sample_kernel = hmc(
            potential_fn_gen=lambda x, nodes: lambda u: _two_moons_potential(u, x, nodes), algo="NUTS")

        def chain(key, x, nodes):
            init_key, nuts_key = jax.random.split(key)
            candidates = jax.random.logistic(init_key, (num_init, 4))  # prior draws, unconstrained
            potentials = jax.vmap(_two_moons_potential, in_axes=(0, None, None))(candidates, x, nodes)
            start = candidates[jnp.argmin(jnp.where(jnp.isnan(potentials), jnp.inf, potentials))]
            state = init_kernel(start, num_warmup, dense_mass=True, target_accept_prob=0.9,
                                model_args=(x, nodes), rng_key=nuts_key)

            def step(state, _):
                state = sample_kernel(state, model_args=(x, nodes))
                return state, (state.z, state.diverging)

            # One scan over warmup and sampling: a second scan would compile the kernel twice.
            _, (draws, diverging) = jax.lax.scan(step, state, None, length=num_warmup + num_draws * thinning)
            return draws[num_warmup::thinning], diverging[num_warmup:]

        _TWO_MOONS_RUNNERS[settings] = jax.jit(lambda keys, x, nodes: jax.lax.map(
            lambda key: chain(key, x, nodes), keys))
    return _TWO_MOONS_RUNNERS[settings]


def _reflect(mu: np.ndarray, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The symmetry R of the Two Moons posterior: (μ₁, μ₂, σ₁, σ₂) ↦ (−μ₂, −μ₁, σ₂, σ₁)."""
    return -mu[..., ::-1], sigma[..., ::-1]


def two_moons_globals(x: np.ndarray, num: int, seed: int = 0, *, num_chains: int = 4, num_warmup: int = 400,
                      thinning: int = 2, parts: list[np.ndarray] | None = None) -> dict:
    """NUTS draws of (μ, σ) given all sites, symmetrised under R, with diagnostics.

    Returns {"mu": (num, 2), "sigma": (num, 2), "r_hat" and "ess": split R-hat and bulk effective
    sample size of the folded draws of (μ₁, μ₂, σ₁, σ₂), "num_divergent": divergent transitions after
    warmup}.
    """
    import jax

    from hierdsl.nuts import bulk_ess, split_r_hat

    x = np.asarray(x, np.float64)
    nodes = _two_moons_quadrature(_two_moons_parts(x) if parts is None else parts)
    per_chain = -(-num // num_chains)
    with jax.enable_x64(True):
        run = _two_moons_runner(num_chains, num_warmup, per_chain, thinning)
        keys = jax.random.split(jax.random.PRNGKey(seed), num_chains)
        u, diverging = jax.device_get(run(keys, jax.numpy.asarray(x), tuple(map(jax.numpy.asarray, nodes))))
    u = np.asarray(u, np.float64)
    mu = _MU_LOW + (_MU_HIGH - _MU_LOW) * special.expit(u[..., :2])
    sigma = _SIGMA_LOW + (_SIGMA_HIGH - _SIGMA_LOW) * special.expit(u[..., 2:])
    # Fold onto μ₁ + μ₂ ≥ 0 for the convergence check, then reflect each draw with probability ½.
    fold = (mu[..., 0] + mu[..., 1] < 0)[..., None]
    mu_r, sigma_r = _reflect(mu, sigma)
    mu, sigma = np.where(fold, mu_r, mu), np.where(fold, sigma_r, sigma)
    folded = np.concatenate([mu, sigma], axis=-1)
    r_hat, ess = split_r_hat(folded), bulk_ess(folded)
    flip = (np.random.default_rng([seed, 1]).random(mu.shape[:2]) < 0.5)[..., None]
    mu_r, sigma_r = _reflect(mu, sigma)
    mu, sigma = np.where(flip, mu_r, mu), np.where(flip, sigma_r, sigma)
    # Interleave the chains, so that truncating to `num` drops the last draws of some chains.
    mu = np.swapaxes(mu, 0, 1).reshape(-1, 2)[:num]
    sigma = np.swapaxes(sigma, 0, 1).reshape(-1, 2)[:num]
    return {"mu": mu, "sigma": sigma, "r_hat": r_hat, "ess": ess, "num_divergent": int(np.sum(diverging))}


def _truncated_normal_inverse_cdf(lo, hi, uniform):
    """z ~ N(0, 1) restricted to [lo, hi] from uniforms in (0, 1], by inverse CDF in log space (JAX).

    The interval is mirrored onto the left tail (lo + hi ≤ 0), where log Φ is accurate, and
    z = Φ⁻¹(Φ(lo) + u (Φ(hi) − Φ(lo))) is evaluated as Φ⁻¹(exp(log Φ(hi) + log(u + (1 − u) Φ(lo)/Φ(hi)))).
    """
    import jax.numpy as jnp
    from jax.scipy.special import log_ndtr, ndtri

    flip = lo + hi > 0
    a, b = jnp.where(flip, -hi, lo), jnp.where(flip, -lo, hi)
    log_a, log_b = log_ndtr(a), log_ndtr(b)
    log_p = log_b + jnp.log(uniform + (1.0 - uniform) * jnp.exp(log_a - log_b))
    z = jnp.clip(ndtri(jnp.exp(log_p)), a, b)
    return jnp.where(flip, -z, z)


def _log_linear_cells(log_left, log_right, width):
    """log ∫ over cells of the density that is log-linear between its log values at the cell's ends."""
    import jax.numpy as jnp

    top = jnp.maximum(log_left, log_right)
    delta = jnp.abs(log_right - log_left)
    safe = jnp.where(delta < 1e-8, 1.0, delta)
    return jnp.log(width) + top + jnp.where(delta < 1e-8, -0.5 * delta, jnp.log(-jnp.expm1(-safe) / safe))


def _log_linear_fraction(slope, uniform):
    """Inverse CDF on [0, 1] of the density ∝ exp(slope · t), at uniforms in (0, 1)."""
    import jax.numpy as jnp

    safe = jnp.where(jnp.abs(slope) < 1e-8, 1.0, slope)
    up = 1.0 + jnp.log(uniform + (1.0 - uniform) * jnp.exp(-jnp.abs(safe))) / jnp.abs(safe)
    down = jnp.log1p(uniform * jnp.expm1(-jnp.abs(safe))) / -jnp.abs(safe)
    return jnp.where(jnp.abs(slope) < 1e-8, uniform, jnp.where(slope > 0, up, down))


def _two_moons_sites_chunk(key, x, cells, mu, sigma):
    """θ draws (chunk, n_sites, 2) given globals mu, sigma (chunk, 2) (JAX); see the notes above."""
    import jax
    import jax.numpy as jnp

    edges, sign, real = cells  # (sites, P, C + 1), (sites, P), (sites, P)
    cell_key, jitter_key, r_key = jax.random.split(key, 3)
    log_edge = _two_moons_r_conditional(x[None, :, None, None, :], edges, sign[..., None], mu[:, None, None, None, :],
                                        sigma[:, None, None, None, :])[0]  # (chunk, sites, P, C + 1)
    # Floor the log mass 60 below each site's largest (ends where the r-interval closes are −inf).
    floor = jnp.max(log_edge, axis=(-2, -1), keepdims=True) - 60.0
    log_edge = jnp.maximum(log_edge, floor)
    left, right = log_edge[..., :-1], log_edge[..., 1:]
    width = edges[..., 1:] - edges[..., :-1]
    log_cell = jnp.where(real[..., None], _log_linear_cells(left, right, width), -jnp.inf)
    num_cells = edges.shape[-1] - 1
    cell = jax.random.categorical(cell_key, log_cell.reshape(*log_cell.shape[:2], -1))  # (chunk, sites)
    part = cell // num_cells
    pick = lambda v: jnp.take_along_axis(v.reshape(*v.shape[:2], -1), cell[..., None], axis=-1)[..., 0]
    s = jnp.take_along_axis(jnp.broadcast_to(sign, cell.shape[:1] + sign.shape), part[..., None], axis=-1)[..., 0]
    low = pick(jnp.broadcast_to(edges[..., :-1], log_cell.shape))
    cell_width = pick(jnp.broadcast_to(width, log_cell.shape))
    slope = pick(right - left)
    fraction = _log_linear_fraction(slope, jax.random.uniform(jitter_key, cell.shape, minval=1e-12, maxval=1.0))
    a = low + jnp.clip(fraction, 0.0, 1.0) * cell_width
    mu_b, sigma_b = mu[:, None, :], sigma[:, None, :]
    # The r-interval is non-empty inside every piece; should rounding put a draw on a piece's end,
    # where it closes, the cell's midpoint is taken instead.
    outside = ~jnp.isfinite(_two_moons_r_conditional(x[None], a, s, mu_b, sigma_b)[0])
    a = jnp.where(outside, low + 0.5 * cell_width, a)
    _, mean, precision, lo, hi = _two_moons_r_conditional(x[None], a, s, mu_b, sigma_b)
    root = jnp.sqrt(precision)
    u = jax.random.uniform(r_key, mean.shape, minval=1e-300, maxval=1.0)
    r = mean + _truncated_normal_inverse_cdf(root * (lo - mean), root * (hi - mean), u) / root
    c, d, _, _ = _two_moons_bounds(x[None], a, s, jnp)
    return jnp.clip(c + d * r[..., None], _MU_LOW, _MU_HIGH)


_TWO_MOONS_SITES: list = []


def two_moons_sites(x: np.ndarray, mu: np.ndarray, sigma: np.ndarray, seed: int = 0, *,
                    parts: list[np.ndarray] | None = None, chunk: int = 64) -> np.ndarray:
    """θ draws (num, n_sites, 2), one from p(θᵢ | xᵢ, μ, σ) per global draw (mu, sigma (num, 2))."""
    import jax

    x = np.asarray(x, np.float64)
    cells = _two_moons_cells(_two_moons_parts(x) if parts is None else parts)
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    num = mu.shape[0]
    padded = -(-num // chunk) * chunk
    pad = lambda v: np.concatenate([v, np.repeat(v[-1:], padded - num, axis=0)]).reshape(-1, chunk, 2)
    mu_p, sigma_p = pad(mu), pad(sigma)
    with jax.enable_x64(True):
        if not _TWO_MOONS_SITES:
            _TWO_MOONS_SITES.append(jax.jit(_two_moons_sites_chunk))
        run = _TWO_MOONS_SITES[0]
        keys = jax.random.split(jax.random.PRNGKey(seed), mu_p.shape[0])
        x_j, cells_j = jax.numpy.asarray(x), tuple(map(jax.numpy.asarray, cells))
        theta = [np.asarray(run(keys[b], x_j, cells_j, mu_p[b], sigma_p[b])) for b in range(mu_p.shape[0])]
    return np.concatenate(theta)[:num]


def sample_two_moons(x: np.ndarray, num: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Reference posterior draws for hierarchical Two Moons given x (n_sites, 2).

    Returns {"mu": (num, 2), "sigma": (num, 2), "theta": (num, n_sites, 2)}: the globals by NUTS on
    the quadrature likelihood (symmetrised under R), then each site's θᵢ from its conditional given
    the globals (see the notes above `TWO_MOONS_CELLS`). Warns if split R-hat exceeds 1.02.
    """
    import warnings

    parts = _two_moons_parts(x)
    draws = two_moons_globals(x, num, seed, parts=parts)
    if np.max(draws["r_hat"]) > 1.02:
        warnings.warn(f"Two Moons reference: split R-hat {np.max(draws['r_hat']):.3f} > 1.02 on the folded "
                      "global draws; the chains may not have mixed", RuntimeWarning, stacklevel=2)
    theta = two_moons_sites(x, draws["mu"], draws["sigma"], seed=seed + 1, parts=parts)
    return {"mu": draws["mu"], "sigma": draws["sigma"], "theta": theta}


# ============================================================================= SIR
#
# Model (examples/sir.hsbi): γ ~ LogNormal(log 0.125, 0.2), βᵢ ~ LogNormal(log 0.4, 0.5),
# dS = −βSI/N, dI = βSI/N − γI, dR = γI from (N − 1, 1, 0), and yᵢ,d ~ Binomial(1000, clamp(I(t_d)/N, 0, 1))
# on days t_d = 0, 17, …, 153.
#
# Time scaling. With s = S/N, i = I/N and τ = γt the system becomes ds/dτ = −R₀ s i, di/dτ = (R₀ s − 1) i
# with R₀ = β/γ: I(t; β, γ)/N = ĩ(γt; β/γ). One ODE solve per R₀ therefore serves every γ, saved at
# τ = γ_k t_d for all the γ nodes of a pass. The solves run as one vector ODE over all R₀ (Diffrax,
# Tsit5, shared adaptive steps, max-norm error control at rtol 1e-10, float64) in the state
# (s, log i), in which the tiny early prevalences keep full relative accuracy.
#
# Grid. In log coordinates a lattice L_j = log R₀ (spacing h) gives, at each γ node g_k = log γ_k,
# the β nodes log β = L_j + g_k: a uniform grid of spacing h in log β. The site likelihoods
# ℓᵢ(j, k) = Σ_d yᵢ,d log p + (n − yᵢ,d) log(1 − p) (p clamped to [1e-12, 1 − 1e-12]) are one matrix
# product of the counts with the log prevalences, and
#     log p(γ_k | y) = log N(g_k; log 0.125, 0.2) + Σᵢ log Σ_j h N(L_j + g_k; log 0.4, 0.5) e^{ℓᵢ(j, k)} + const
# (densities of log γ and log β; the binomial coefficients are constant). Both rules are midpoint rules
# on smooth integrands whose widths are several grid spacings, which makes them accurate far beyond
# sampling error. The prior ranges are cut at ±6 prior sds (mass < 2e-9).
#
# Passes. The γ posterior of 50 sites is ~40 times narrower than the prior (sd ≈ 0.006 in log γ), so
# the γ grid (64 nodes) zooms: each pass keeps the nodes within 25 log units of the best and puts the
# next grid on them plus 1.5 spacings either side (the best node's neighbours bracket the mode of a
# unimodal density). A grid is final when its spacing is at most 0.3 posterior sds and both end nodes
# are more than 20 log units below the best (otherwise the window is widened on that side). The
# lattice spacing h starts at 0.0015 and must stay below a third of every site's conditional sd of
# log βᵢ at the best γ node (typically ≥ 0.005); if not, the pass is redone with h a fifth of the
# smallest (but at least 1e-4).
#
# Sampling. γ: a final-grid cell ∝ its posterior mass, then uniform within the cell in log γ.
# βᵢ given the γ node: a lattice cell ∝ N(log β) e^{ℓᵢ}, then uniform within it in log β.

SIR_DAYS = np.arange(0.0, 154.0, 17.0)
_GAMMA_PRIOR = (np.log(0.125), 0.2)
_BETA_PRIOR = (np.log(0.4), 0.5)
_PRIOR_SDS = 6.0
_LOG_DROP = 25.0
_MIN_BETA_SPACING = 1e-4  # ~60000 lattice nodes; no site seen needs less than 1e-3


def _sir_solver():
    import diffrax
    import jax
    import jax.numpy as jnp

    def solve(log_r0, taus, i0, rtol):
        r0 = jnp.exp(log_r0)

        def rhs(t, u, args):
            s, log_i = u
            return (-r0 * s * jnp.exp(log_i), r0 * s - 1.0)

        state = (jnp.full_like(r0, 1.0 - i0), jnp.full_like(r0, jnp.log(i0)))
        solution = diffrax.diffeqsolve(
            diffrax.ODETerm(rhs), diffrax.Tsit5(), 0.0, taus[-1], None, state,
            saveat=diffrax.SaveAt(ts=taus),
            stepsize_controller=diffrax.PIDController(
                rtol=rtol, atol=1e-12, norm=lambda u: jnp.maximum(jnp.max(jnp.abs(u[0])), jnp.max(jnp.abs(u[1])))),
            max_steps=200_000)
        return solution.ys[1].T  # log i, (n_r0, n_taus)

    return jax.jit(solve)


_SIR_SOLVE: list = []


def sir_log_prevalence(log_r0: np.ndarray, taus: np.ndarray, n_pop: float = 1e6, rtol: float = 1e-10) -> np.ndarray:
    """log(I/N) of the time-scaled SIR ODE for every log R₀ (n,) at every scaled time τ (m,): (n, m).

    I(t; β, γ)/N = exp(result) at log R₀ = log β − log γ and τ = γt. τ need not be sorted; the R₀
    axis is padded to a multiple of 2048 so that few shapes are compiled.
    """
    import jax

    log_r0, taus = np.asarray(log_r0, np.float64), np.asarray(taus, np.float64)
    order = np.argsort(taus)
    size = -(-log_r0.size // 2048) * 2048
    padded = np.concatenate([log_r0, np.full(size - log_r0.size, log_r0[-1])])
    with jax.enable_x64(True):
        if not _SIR_SOLVE:
            _SIR_SOLVE.append(_sir_solver())
        sorted_values = np.asarray(_SIR_SOLVE[0](padded, taus[order], 1.0 / n_pop, rtol))[: log_r0.size]
    values = np.empty_like(sorted_values)
    values[:, order] = sorted_values
    return values


@dataclass
class SIRGrid:
    """The final grid of the SIR reference posterior and its resolution.

    - `log_gamma`: the γ nodes (log γ, uniform spacing `gamma_spacing`), `log_post` their normalised
      log posterior masses.
    - `log_r0`: the lattice (spacing `beta_spacing` in log β), `log_p`, `log_q`: log p and log(1 − p)
      of the prevalence, (n_r0, n_gamma, n_days).
    - `gamma_sd`: the posterior sd of log γ; `beta_sd`: per site, the conditional sd of log βᵢ at the
      best γ node. `passes`: grid passes run.
    """

    log_gamma: np.ndarray
    log_post: np.ndarray
    gamma_spacing: float
    log_r0: np.ndarray
    beta_spacing: float
    log_p: np.ndarray
    log_q: np.ndarray
    gamma_sd: float
    beta_sd: np.ndarray
    passes: int


def _sir_site_terms(y, trials, log_p, log_q, log_r0, log_gamma, beta_spacing, chunk: int = 8):
    """log Σ_j h N(L_j + g_k) e^{ℓᵢ(j, k)} per site and γ node (n_sites, n_gamma), by chunks of γ nodes."""
    n_r0, n_gamma, n_days = log_p.shape
    out = np.empty((y.shape[0], n_gamma))
    for k0 in range(0, n_gamma, chunk):
        k1 = min(k0 + chunk, n_gamma)
        lik = (y @ log_p[:, k0:k1].reshape(-1, n_days).T + (trials - y) @ log_q[:, k0:k1].reshape(-1, n_days).T)
        log_beta = log_r0[:, None] + log_gamma[None, k0:k1]
        prior = stats.norm.logpdf(log_beta, *_BETA_PRIOR) + np.log(beta_spacing)
        out[:, k0:k1] = special.logsumexp(lik.reshape(-1, n_r0, k1 - k0) + prior, axis=1)
    return out


def _sir_conditional(y, trials, log_p, log_q, log_r0, log_gamma, k: int) -> np.ndarray:
    """Normalised log p(lattice cell j | γ node k, yᵢ) for every site, (n_sites, n_r0)."""
    lik = y @ log_p[:, k].T + (trials - y) @ log_q[:, k].T
    log = lik + stats.norm.logpdf(log_r0 + log_gamma[k], *_BETA_PRIOR)
    return log - special.logsumexp(log, axis=1, keepdims=True)


def _grid_sd(values: np.ndarray, log_weights: np.ndarray) -> np.ndarray:
    w = np.exp(log_weights - special.logsumexp(log_weights, axis=-1, keepdims=True))
    mean = np.sum(w * values, axis=-1, keepdims=True)
    return np.sqrt(np.sum(w * (values - mean) ** 2, axis=-1))


def sir_grid_posterior(y: np.ndarray, days: np.ndarray = SIR_DAYS, n_pop: float = 1e6, trials: int = 1000, *,
                       num_gamma: int = 64, beta_spacing: float = 0.0015, max_passes: int = 12) -> SIRGrid:
    """The grid posterior of the SIR task given counts y (n_sites, n_days); see the notes above."""
    y = np.asarray(y, np.float64)
    days = np.asarray(days, np.float64)
    prior_lo = _GAMMA_PRIOR[0] - _PRIOR_SDS * _GAMMA_PRIOR[1]
    prior_hi = _GAMMA_PRIOR[0] + _PRIOR_SDS * _GAMMA_PRIOR[1]
    beta_lo = _BETA_PRIOR[0] - _PRIOR_SDS * _BETA_PRIOR[1]
    beta_hi = _BETA_PRIOR[0] + _PRIOR_SDS * _BETA_PRIOR[1]
    lo, hi, h = prior_lo, prior_hi, beta_spacing
    clip_lo, clip_hi = np.log(1e-12), np.log1p(-1e-12)
    for passes in range(1, max_passes + 1):
        spacing = (hi - lo) / num_gamma
        log_gamma = lo + (np.arange(num_gamma) + 0.5) * spacing
        # The lattice covers [beta_lo, beta_hi] in log β at every γ node of this window.
        log_r0 = np.arange(beta_lo - hi, beta_hi - lo + h, h)
        taus = (np.exp(log_gamma)[:, None] * days[None, :]).ravel()
        log_p = np.clip(sir_log_prevalence(log_r0, taus, n_pop), clip_lo, clip_hi)
        log_p = log_p.reshape(log_r0.size, num_gamma, days.size)
        log_q = np.log1p(-np.exp(log_p))
        sites = _sir_site_terms(y, trials, log_p, log_q, log_r0, log_gamma, h)
        log_post = stats.norm.logpdf(log_gamma, *_GAMMA_PRIOR) + sites.sum(0)
        log_post -= special.logsumexp(log_post)
        keep = np.flatnonzero(log_post >= log_post.max() - _LOG_DROP)
        k_lo, k_hi = keep[0], keep[-1]
        best = int(np.argmax(log_post))
        beta_sd = _grid_sd(log_r0, _sir_conditional(y, trials, log_p, log_q, log_r0, log_gamma, best))
        grid = SIRGrid(log_gamma, log_post, spacing, log_r0, h, log_p, log_q,
                       float(_grid_sd(log_gamma, log_post)), beta_sd, passes)
        # Unimodal in γ: beyond a node 25 below the best the density keeps falling, so the next
        # window, 1.5 spacings past the outermost kept nodes, has its end nodes ≥ 25 below the best
        # (≥ 20 is asked, as new nodes sit half a new spacing inside the window).
        low_clear = log_post[0] < log_post.max() - _LOG_DROP + 5 or lo <= prior_lo
        high_clear = log_post[-1] < log_post.max() - _LOG_DROP + 5 or hi >= prior_hi
        fine_enough = h <= grid.beta_sd.min() / 3 or h <= _MIN_BETA_SPACING
        if not fine_enough:
            h = max(grid.beta_sd.min() / 5, _MIN_BETA_SPACING)
        if low_clear and high_clear and fine_enough and spacing <= 0.3 * grid.gamma_sd:
            return grid
        if not (low_clear and high_clear):  # mass at an end of the window: widen it on that side
            width = hi - lo
            lo = lo if low_clear else max(prior_lo, lo - width)
            hi = hi if high_clear else min(prior_hi, hi + width)
        else:  # zoom onto the kept nodes
            lo = max(prior_lo, log_gamma[k_lo] - 1.5 * spacing)
            hi = min(prior_hi, log_gamma[k_hi] + 1.5 * spacing)
    raise RuntimeError(f"the SIR grid did not settle in {max_passes} passes")


def sample_sir(y: np.ndarray, num: int, seed: int = 0, days: np.ndarray = SIR_DAYS, n_pop: float = 1e6,
               trials: int = 1000) -> dict[str, np.ndarray]:
    """Reference posterior draws for the SIR task given counts y (n_sites, n_days).

    Returns {"gamma": (num,), "beta": (num, n_sites)}, sampled from the grid posterior of
    `sir_grid_posterior` (see the notes above `SIR_DAYS`).
    """
    y = np.asarray(y, np.float64)
    grid = sir_grid_posterior(y, days, n_pop, trials)
    rng = np.random.default_rng(seed)
    k = rng.choice(grid.log_gamma.size, size=num, p=np.exp(grid.log_post - special.logsumexp(grid.log_post)))
    log_gamma = grid.log_gamma[k] + (rng.random(num) - 0.5) * grid.gamma_spacing
    log_beta = np.empty((num, y.shape[0]))
    for node in np.unique(k):
        rows = np.flatnonzero(k == node)
        log_cond = _sir_conditional(y, trials, grid.log_p, grid.log_q, grid.log_r0, grid.log_gamma, node)
        cdf = np.cumsum(np.exp(log_cond), axis=1)
        u = rng.random((rows.size, y.shape[0])) * cdf[:, -1]
        cells = np.stack([np.searchsorted(cdf[i], u[:, i]) for i in range(y.shape[0])], axis=1)
        cells = np.minimum(cells, grid.log_r0.size - 1)
        jitter = (rng.random(cells.shape) - 0.5) * grid.beta_spacing
        log_beta[rows] = grid.log_r0[cells] + grid.log_gamma[node] + jitter
    return {"gamma": np.exp(log_gamma), "beta": np.exp(log_beta)}
