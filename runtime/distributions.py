"""The built-in distributions of `.hsbi`, as used by the IR → JAX stage (spec §7).

Each distribution is a batch of independent elements: parameters broadcast NumPy-style to the
`batch_shape`, and the trailing `event_shape` axes of a draw form one multivariate event
(`MvNormal`, `Dirichlet`, `SortedUniform`). Every distribution offers:

- `sample(key, shape=())`: a draw of shape `shape + batch_shape + event_shape`, always float32 —
  discrete draws are integer-valued floats, so a simulation fed NaN parameters returns NaN (which
  `check_simulations` reports) instead of wrapping round to an arbitrary integer;
- `log_prob(x)`: the log density (or mass) of each batch element (shape `batch_shape` broadcast
  with `x`'s leading axes), `-inf` outside the support; a variable's log prior is its sum;
- `support`: the `(lower, upper)` bounds broadcast to `batch_shape + event_shape`, NumPy arrays
  when the parameters are static and JAX arrays when they depend on other parameters;
- `kind`: "continuous", "discrete", "simplex" (points of a probability simplex along the last
  axis) or "ordered" (sorted along the last axis within the bounds); it picks the bijector.

Samplers use `jax.random` and log densities `jax.scipy`, so everything is jittable, vmappable and
differentiable in the parameters (reparameterised where JAX offers it).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from typing import Any, final

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy import special

from .errors import RuntimeModelError
from .values import as_float, broadcast_to, is_static, static_int

Array = jax.Array
Shape = tuple[int, ...]

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
_LOG_2 = math.log(2.0)


class Distribution(abc.ABC):
    """A batch of independent distributions with a common event shape."""

    batch_shape: Shape
    event_shape: Shape = ()
    kind: str = "continuous"

    @property
    def shape(self) -> Shape:
        """The shape of one draw: `batch_shape + event_shape`."""
        return self.batch_shape + self.event_shape

    @abc.abstractmethod
    def sample(self, key: Array, shape: Shape = ()) -> Array:
        """Draws of shape `shape + self.shape`, float32."""

    @abc.abstractmethod
    def log_prob(self, x: Array) -> Array:
        """Log density of each batch element; `-inf` outside the support."""

    @property
    @abc.abstractmethod
    def support(self) -> tuple[Any, Any]:
        """Lower and upper bounds, each broadcast to `self.shape`."""


def _batch(*params: Any) -> Shape:
    return tuple(np.broadcast_shapes(*(np.shape(p) for p in params)))


def _bounds(lower: Any, upper: Any, shape: Shape) -> tuple[Any, Any]:
    return broadcast_to(as_float(lower), shape), broadcast_to(as_float(upper), shape)


def _real(shape: Shape) -> tuple[np.ndarray, np.ndarray]:
    return _bounds(-np.inf, np.inf, shape)


def _inside(x: Array, lower: Any, upper: Any, lp: Array) -> Array:
    return jnp.where((x >= lower) & (x <= upper), lp, -jnp.inf)


def _normal_logpdf(z: Array, scale: Any) -> Array:
    return -0.5 * z * z - jnp.log(scale) - _HALF_LOG_2PI


def _nan_where_nan(draw: Array, *params: Any) -> Array:
    """Propagate NaN parameters into discrete draws, which would otherwise hide them."""
    bad = jnp.zeros((), bool)
    for p in params:
        bad = bad | jnp.isnan(p)
    return jnp.where(bad, jnp.nan, draw)


# ----------------------------------------------------------------------------- continuous, real line


@final
class Normal(Distribution):
    """Normal(μ, σ), σ a standard deviation."""

    def __init__(self, loc: Any, scale: Any):
        self.loc, self.scale = as_float(loc), as_float(scale)
        self.batch_shape = _batch(self.loc, self.scale)

    def sample(self, key, shape=()):
        return self.loc + self.scale * jax.random.normal(key, shape + self.batch_shape)

    def log_prob(self, x):
        return _normal_logpdf((x - self.loc) / self.scale, self.scale)

    @property
    def support(self):
        return _real(self.shape)


@final
class Cauchy(Distribution):
    """Cauchy(μ, s)."""

    def __init__(self, loc: Any, scale: Any):
        self.loc, self.scale = as_float(loc), as_float(scale)
        self.batch_shape = _batch(self.loc, self.scale)

    def sample(self, key, shape=()):
        return self.loc + self.scale * jax.random.cauchy(key, shape + self.batch_shape)

    def log_prob(self, x):
        z = (x - self.loc) / self.scale
        return -jnp.log(jnp.pi * self.scale) - jnp.log1p(z * z)

    @property
    def support(self):
        return _real(self.shape)


@final
class StudentT(Distribution):
    """StudentT(ν, μ, σ): location-scale Student's t with ν degrees of freedom."""

    def __init__(self, df: Any, loc: Any, scale: Any):
        self.df, self.loc, self.scale = as_float(df), as_float(loc), as_float(scale)
        self.batch_shape = _batch(self.df, self.loc, self.scale)

    def sample(self, key, shape=()):
        return self.loc + self.scale * jax.random.t(key, self.df, shape + self.batch_shape)

    def log_prob(self, x):
        return jax.scipy.stats.t.logpdf(x, self.df, self.loc, self.scale)

    @property
    def support(self):
        return _real(self.shape)


@final
class Laplace(Distribution):
    """Laplace(μ, b)."""

    def __init__(self, loc: Any, scale: Any):
        self.loc, self.scale = as_float(loc), as_float(scale)
        self.batch_shape = _batch(self.loc, self.scale)

    def sample(self, key, shape=()):
        return self.loc + self.scale * jax.random.laplace(key, shape + self.batch_shape)

    def log_prob(self, x):
        return -jnp.abs(x - self.loc) / self.scale - jnp.log(2.0 * self.scale)

    @property
    def support(self):
        return _real(self.shape)


@final
class MvNormal(Distribution):
    """MvNormal(μ, Σ) with a covariance matrix Σ; the last axis of μ is the event."""

    def __init__(self, mean: Any, cov: Any):
        self.mean, self.cov = as_float(mean), as_float(cov)
        if np.ndim(self.mean) < 1 or np.ndim(self.cov) < 2 or np.shape(self.cov)[-2:] != np.shape(self.mean)[-1:] * 2:
            raise RuntimeModelError(
                f"MvNormal needs a mean vector of length d and a d×d covariance matrix, got shapes "
                f"{np.shape(self.mean)} and {np.shape(self.cov)}"
            )
        self.event_shape = np.shape(self.mean)[-1:]
        self.batch_shape = tuple(np.broadcast_shapes(np.shape(self.mean)[:-1], np.shape(self.cov)[:-2]))

    def _cholesky(self) -> Array:
        return jnp.linalg.cholesky(self.cov)

    def sample(self, key, shape=()):
        eps = jax.random.normal(key, shape + self.shape)
        return self.mean + jnp.einsum("...ij,...j->...i", self._cholesky(), eps)

    def log_prob(self, x):
        diff = x - self.mean
        chol = jnp.broadcast_to(self._cholesky(), diff.shape + self.event_shape)
        y = jax.scipy.linalg.solve_triangular(chol, diff[..., None], lower=True)[..., 0]
        half_logdet = jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)
        d = self.event_shape[0]
        return -0.5 * jnp.sum(y * y, axis=-1) - half_logdet - d * _HALF_LOG_2PI

    @property
    def support(self):
        return _real(self.shape)


# ----------------------------------------------------------------------------- continuous, bounded


@final
class HalfNormal(Distribution):
    """HalfNormal(σ): |Normal(0, σ)|."""

    def __init__(self, scale: Any):
        self.scale = as_float(scale)
        self.batch_shape = _batch(self.scale)

    def sample(self, key, shape=()):
        return self.scale * jnp.abs(jax.random.normal(key, shape + self.batch_shape))

    def log_prob(self, x):
        return _inside(x, 0.0, jnp.inf, _LOG_2 + _normal_logpdf(x / self.scale, self.scale))

    @property
    def support(self):
        return _bounds(0.0, np.inf, self.shape)


@final
class HalfCauchy(Distribution):
    """HalfCauchy(s): |Cauchy(0, s)|."""

    def __init__(self, scale: Any):
        self.scale = as_float(scale)
        self.batch_shape = _batch(self.scale)

    def sample(self, key, shape=()):
        return self.scale * jnp.abs(jax.random.cauchy(key, shape + self.batch_shape))

    def log_prob(self, x):
        z = x / self.scale
        return _inside(x, 0.0, jnp.inf, _LOG_2 - jnp.log(jnp.pi * self.scale) - jnp.log1p(z * z))

    @property
    def support(self):
        return _bounds(0.0, np.inf, self.shape)


@final
class LogNormal(Distribution):
    """LogNormal(μ, σ): exp(Normal(μ, σ))."""

    def __init__(self, loc: Any, scale: Any):
        self.loc, self.scale = as_float(loc), as_float(scale)
        self.batch_shape = _batch(self.loc, self.scale)

    def sample(self, key, shape=()):
        return jnp.exp(self.loc + self.scale * jax.random.normal(key, shape + self.batch_shape))

    def log_prob(self, x):
        safe = jnp.where(x > 0, x, 1.0)
        log_x = jnp.log(safe)
        return jnp.where(x > 0, _normal_logpdf((log_x - self.loc) / self.scale, self.scale) - log_x, -jnp.inf)

    @property
    def support(self):
        return _bounds(0.0, np.inf, self.shape)


@final
class Exponential(Distribution):
    """Exponential(rate)."""

    def __init__(self, rate: Any):
        self.rate = as_float(rate)
        self.batch_shape = _batch(self.rate)

    def sample(self, key, shape=()):
        return jax.random.exponential(key, shape + self.batch_shape) / self.rate

    def log_prob(self, x):
        return _inside(x, 0.0, jnp.inf, jnp.log(self.rate) - self.rate * x)

    @property
    def support(self):
        return _bounds(0.0, np.inf, self.shape)


@final
class Gamma(Distribution):
    """Gamma(shape, rate)."""

    def __init__(self, concentration: Any, rate: Any):
        self.concentration, self.rate = as_float(concentration), as_float(rate)
        self.batch_shape = _batch(self.concentration, self.rate)

    def sample(self, key, shape=()):
        return jax.random.gamma(key, self.concentration, shape + self.batch_shape) / self.rate

    def log_prob(self, x):
        k, rate = self.concentration, self.rate
        lp = k * jnp.log(rate) + special.xlogy(k - 1.0, x) - rate * x - special.gammaln(k)
        return _inside(x, 0.0, jnp.inf, lp)

    @property
    def support(self):
        return _bounds(0.0, np.inf, self.shape)


@final
class Uniform(Distribution):
    """Uniform(a, b)."""

    def __init__(self, low: Any, high: Any):
        self.low, self.high = as_float(low), as_float(high)
        self.batch_shape = _batch(self.low, self.high)

    def sample(self, key, shape=()):
        u = jax.random.uniform(key, shape + self.batch_shape)
        return self.low + (self.high - self.low) * u

    def log_prob(self, x):
        return _inside(x, self.low, self.high, -jnp.log(self.high - self.low))

    @property
    def support(self):
        return _bounds(self.low, self.high, self.shape)


def _log_diff_ndtr(a: Array, b: Array) -> Array:
    """log(Φ(b) − Φ(a)) for a < b, accurate in both tails (uses Φ(−x) = 1 − Φ(x) when a > 0)."""
    flip = a > 0
    lo, hi = jnp.where(flip, -b, a), jnp.where(flip, -a, b)
    log_hi, log_lo = special.log_ndtr(hi), special.log_ndtr(lo)
    return log_hi + jnp.log1p(-jnp.exp(log_lo - log_hi))


@final
class TruncatedNormal(Distribution):
    """TruncatedNormal(μ, σ, a, b): Normal(μ, σ) restricted to [a, b]."""

    def __init__(self, loc: Any, scale: Any, low: Any, high: Any):
        self.loc, self.scale = as_float(loc), as_float(scale)
        self.low, self.high = as_float(low), as_float(high)
        self.batch_shape = _batch(self.loc, self.scale, self.low, self.high)

    def sample(self, key, shape=()):
        lo = (self.low - self.loc) / self.scale
        hi = (self.high - self.loc) / self.scale
        z = jax.random.truncated_normal(key, lo, hi, shape + self.batch_shape)
        # Far in a tail the inverse-CDF sampler can round onto (or just past) a bound in float32.
        return jnp.clip(self.loc + self.scale * z, self.low, self.high)

    def log_prob(self, x):
        lo = (self.low - self.loc) / self.scale
        hi = (self.high - self.loc) / self.scale
        lp = _normal_logpdf((x - self.loc) / self.scale, self.scale) - _log_diff_ndtr(lo, hi)
        return _inside(x, self.low, self.high, lp)

    @property
    def support(self):
        return _bounds(self.low, self.high, self.shape)


@final
class Beta(Distribution):
    """Beta(α, β)."""

    def __init__(self, a: Any, b: Any):
        self.a, self.b = as_float(a), as_float(b)
        self.batch_shape = _batch(self.a, self.b)

    def sample(self, key, shape=()):
        return jax.random.beta(key, self.a, self.b, shape + self.batch_shape)

    def log_prob(self, x):
        lp = special.xlogy(self.a - 1.0, x) + special.xlog1py(self.b - 1.0, -x) - special.betaln(self.a, self.b)
        return _inside(x, 0.0, 1.0, lp)

    @property
    def support(self):
        return _bounds(0.0, 1.0, self.shape)


@final
class SortedUniform(Distribution):
    """SortedUniform(a, b, k): k uniform draws on [a, b] in increasing order (event of length k)."""

    kind = "ordered"

    def __init__(self, low: Any, high: Any, k: Any):
        self.low, self.high = as_float(low), as_float(high)
        self.k = static_int(k, "the number of draws k of SortedUniform(a, b, k)")
        self.batch_shape = _batch(self.low, self.high)
        self.event_shape = (self.k,)

    def sample(self, key, shape=()):
        u = jnp.sort(jax.random.uniform(key, shape + self.shape), axis=-1)
        return self.low[..., None] + (self.high - self.low)[..., None] * u

    def log_prob(self, x):
        low, high = self.low[..., None], self.high[..., None]
        ok = jnp.all((x >= low) & (x <= high), axis=-1) & jnp.all(jnp.diff(x, axis=-1) >= 0, axis=-1)
        lp = special.gammaln(self.k + 1.0) - self.k * jnp.log(self.high - self.low)
        return jnp.where(ok, lp, -jnp.inf)

    @property
    def support(self):
        return _bounds(self.low[..., None], self.high[..., None], self.shape)


@final
class Dirichlet(Distribution):
    """Dirichlet(α): points of the probability simplex along the last axis."""

    kind = "simplex"

    def __init__(self, concentration: Any):
        self.concentration = as_float(concentration)
        if np.ndim(self.concentration) < 1:
            raise RuntimeModelError("Dirichlet(α) needs a vector α (one concentration per category)")
        self.batch_shape = np.shape(self.concentration)[:-1]
        self.event_shape = np.shape(self.concentration)[-1:]

    def sample(self, key, shape=()):
        return jax.random.dirichlet(key, self.concentration, shape + self.batch_shape)

    def log_prob(self, x):
        alpha = self.concentration
        lp = (
            jnp.sum(special.xlogy(alpha - 1.0, x), axis=-1)
            + special.gammaln(jnp.sum(alpha, axis=-1))
            - jnp.sum(special.gammaln(alpha), axis=-1)
        )
        ok = jnp.all((x >= 0) & (x <= 1), axis=-1) & (jnp.abs(jnp.sum(x, axis=-1) - 1.0) < 1e-4)
        return jnp.where(ok, lp, -jnp.inf)

    @property
    def support(self):
        return _bounds(0.0, 1.0, self.shape)


# ----------------------------------------------------------------------------- discrete


# Binomial sampling without loops. `jax.random.binomial` runs while-loops whose batched (vmapped)
# form takes seconds to compile; here the same two algorithms (TensorFlow's choice) run on a fixed
# number of candidates at once, which compiles quickly and vectorises over sites:
# - n·q < 10 (q = min(p, 1 − p)): inversion over the first _INVERSION_TERMS probabilities
#   (P(X ≥ 48) < 1e-15 when the mean is below 10);
# - otherwise Hörmann's BTRS transformed rejection with _BTRS_CANDIDATES proposals at once, taking
#   the first accepted (each is accepted with probability above 0.8, so all of them are rejected
#   with probability below 1e-11; that case returns the first proposal, clipped to [0, n]).
_INVERSION_TERMS = 48
_BTRS_CANDIDATES = 16


def _stirling_tail(k: Array) -> Array:
    """log k! − [(k + 1/2) log(k + 1) − (k + 1) + log √(2π)], by its series (error < 3e-4 at k = 0,
    < 1e-5 beyond; BTRS only meets k near 0 with negligible probability)."""
    kp1sq = (k + 1.0) * (k + 1.0)
    return (1.0 / 12 - (1.0 / 360 - 1.0 / 1260 / kp1sq) / kp1sq) / (k + 1.0)


# Running sums as products with triangular 0/1 matrices: at these lengths XLA compiles a small
# matmul much faster than a cumulative sum.
_PREFIX = np.triu(np.ones((_INVERSION_TERMS, _INVERSION_TERMS), np.float32))


def _binomial_inversion(u: Array, n: Array, q: Array) -> Array:
    j = np.arange(_INVERSION_TERMS, dtype=np.float32)
    n_, q_ = n[..., None], q[..., None]
    # log P(X = j) − log P(X = j − 1) for j ≥ 1 (−inf once j exceeds n), and log P(X = 0) for j = 0.
    log_ratio = jnp.log(jnp.maximum(n_ - j + 1.0, 0.0)) - jnp.log(jnp.maximum(j, 1.0)) + jnp.log(q_) - jnp.log1p(-q_)
    log_ratio = jnp.where(j == 0, n_ * jnp.log1p(-q_), log_ratio)
    # A finite floor: −inf would meet the matrices' zeros as −inf·0 = NaN; exp of it is still 0.
    log_ratio = jnp.maximum(log_ratio, -1e4)
    cdf = jnp.exp(log_ratio @ _PREFIX) @ _PREFIX
    return jnp.minimum(jnp.sum(cdf < u[..., None], axis=-1).astype(jnp.float32), n)


def _binomial_btrs(u: Array, v: Array, n: Array, q: Array) -> Array:
    stddev = jnp.sqrt(n * q * (1.0 - q))
    b = 1.15 + 2.53 * stddev
    a = -0.0873 + 0.0248 * b + 0.01 * q
    c = n * q + 0.5
    v_r = 0.92 - 4.2 / b
    r = q / (1.0 - q)
    alpha = (2.83 + 5.1 / b) * stddev
    m = jnp.floor((n + 1.0) * q)
    n_, a, b, c, v_r, r, alpha, m = (x[..., None] for x in (n, a, b, c, v_r, r, alpha, m))
    u = u - 0.5
    us = 0.5 - jnp.abs(u)
    k = jnp.floor((2.0 * a / us + b) * u + c)
    quick = (us >= 0.07) & (v <= v_r)
    inside = (k >= 0) & (k <= n_)
    k_safe = jnp.clip(k, 0.0, n_)
    log_bound = (
        (m + 0.5) * jnp.log((m + 1.0) / (r * (n_ - m + 1.0)))
        + (n_ + 1.0) * jnp.log((n_ - m + 1.0) / (n_ - k_safe + 1.0))
        + (k_safe + 0.5) * jnp.log(r * (n_ - k_safe + 1.0) / (k_safe + 1.0))
        + _stirling_tail(m) + _stirling_tail(n_ - m) - _stirling_tail(k_safe) - _stirling_tail(n_ - k_safe)
    )
    accept = quick | (inside & (jnp.log(v * alpha / (a / (us * us) + b)) <= log_bound))
    first = jnp.argmax(accept, axis=-1)
    return jnp.take_along_axis(k_safe, first[..., None], axis=-1)[..., 0]


def binomial_sample(key: Array, n: Any, p: Any, shape: Shape) -> Array:
    """Binomial(n, p) draws of `shape` as float32; NaN for a NaN or invalid n or p."""
    n = jnp.floor(jnp.broadcast_to(jnp.asarray(n, jnp.float32), shape))
    p = jnp.broadcast_to(jnp.asarray(p, jnp.float32), shape)
    invalid = jnp.isnan(n) | jnp.isnan(p) | (n < 0) | (p < 0) | (p > 1)
    # Sample successes at probability q = min(p, 1 − p), reflecting for p > 1/2.
    flip = p > 0.5
    q = jnp.where(invalid, 0.25, jnp.where(flip, 1.0 - p, p))
    n = jnp.where(invalid, 1.0, n)
    use_inversion = n * q < 10.0
    # One uniform draw for everything: each separate draw costs a threefry kernel to compile.
    uniforms = jax.random.uniform(key, tuple(shape) + (1 + 2 * _BTRS_CANDIDATES,))
    small = _binomial_inversion(uniforms[..., 0], jnp.where(use_inversion, n, 1.0), q)
    large = _binomial_btrs(
        uniforms[..., 1 : 1 + _BTRS_CANDIDATES],
        uniforms[..., 1 + _BTRS_CANDIDATES :],
        jnp.where(use_inversion, 1000.0, n),
        jnp.where(use_inversion, 0.25, q),
    )
    k = jnp.where(use_inversion, small, large)
    return jnp.where(invalid, jnp.nan, jnp.where(flip, n - k, k))


@final
class Binomial(Distribution):
    """Binomial(n, p): successes out of n trials."""

    kind = "discrete"

    def __init__(self, n: Any, p: Any):
        self.n, self.p = as_float(n), as_float(p)
        self.batch_shape = _batch(self.n, self.p)

    def sample(self, key, shape=()):
        return binomial_sample(key, self.n, self.p, shape + self.batch_shape)

    def log_prob(self, x):
        n, p = self.n, self.p
        log_choose = special.gammaln(n + 1.0) - special.gammaln(x + 1.0) - special.gammaln(n - x + 1.0)
        return _inside(x, 0.0, n, log_choose + special.xlogy(x, p) + special.xlog1py(n - x, -p))

    @property
    def support(self):
        return _bounds(0.0, self.n, self.shape)


@final
class Poisson(Distribution):
    """Poisson(λ)."""

    kind = "discrete"

    def __init__(self, rate: Any):
        self.rate = as_float(rate)
        self.batch_shape = _batch(self.rate)

    def sample(self, key, shape=()):
        draw = jax.random.poisson(key, self.rate, shape + self.batch_shape).astype(jnp.float32)
        return _nan_where_nan(draw, self.rate)

    def log_prob(self, x):
        return _inside(x, 0.0, jnp.inf, special.xlogy(x, self.rate) - self.rate - special.gammaln(x + 1.0))

    @property
    def support(self):
        return _bounds(0.0, np.inf, self.shape)


@final
class Bernoulli(Distribution):
    """Bernoulli(p): 1.0 with probability p, else 0.0."""

    kind = "discrete"

    def __init__(self, p: Any):
        self.p = as_float(p)
        self.batch_shape = _batch(self.p)

    def sample(self, key, shape=()):
        draw = jax.random.bernoulli(key, self.p, shape + self.batch_shape).astype(jnp.float32)
        return _nan_where_nan(draw, self.p)

    def log_prob(self, x):
        return _inside(x, 0.0, 1.0, special.xlogy(x, self.p) + special.xlog1py(1.0 - x, -self.p))

    @property
    def support(self):
        return _bounds(0.0, 1.0, self.shape)


@final
class Categorical(Distribution):
    """Categorical(p): a category 1..K (1-based, as in Julia) with probabilities p (last axis)."""

    kind = "discrete"

    def __init__(self, p: Any):
        self.p = as_float(p)
        if np.ndim(self.p) < 1:
            raise RuntimeModelError("Categorical(p) needs a vector p of category probabilities")
        self.batch_shape = np.shape(self.p)[:-1]

    def _log_p(self) -> Array:
        return jnp.log(self.p) - jnp.log(jnp.sum(self.p, axis=-1, keepdims=True))

    def sample(self, key, shape=()):
        draw = jax.random.categorical(key, self._log_p(), axis=-1, shape=shape + self.batch_shape)
        return draw.astype(jnp.float32) + 1.0

    def log_prob(self, x):
        num = np.shape(self.p)[-1]
        index = jnp.clip(jnp.asarray(x).astype(jnp.int32) - 1, 0, num - 1)
        log_p = jnp.broadcast_to(self._log_p(), jnp.shape(index) + (num,))
        lp = jnp.take_along_axis(log_p, index[..., None], axis=-1)[..., 0]
        return _inside(x, 1.0, num, lp)

    @property
    def support(self):
        return _bounds(1.0, float(np.shape(self.p)[-1]), self.shape)


# ----------------------------------------------------------------------------- combinators


@final
class IID(Distribution):
    """`iid(D, k)`: independent draws of D stacked on new leading axes `sample_shape`."""

    def __init__(self, base: Distribution, sample_shape: Shape):
        self.base = base
        self.sample_shape = tuple(sample_shape)
        self.batch_shape = self.sample_shape + base.batch_shape
        self.event_shape = base.event_shape
        self.kind = base.kind

    def sample(self, key, shape=()):
        return self.base.sample(key, tuple(shape) + self.sample_shape)

    def log_prob(self, x):
        return self.base.log_prob(x)

    @property
    def support(self):
        lower, upper = self.base.support
        return broadcast_to(lower, self.shape), broadcast_to(upper, self.shape)


@final
class Mixture(Distribution):
    """Mixture(w, [D1, …, DK]): each batch element comes from component k with probability w[k]."""

    def __init__(self, weights: Any, components: Sequence[Distribution]):
        self.weights = as_float(weights)
        self.components = tuple(components)
        if np.shape(self.weights) != (len(self.components),):
            raise RuntimeModelError(
                f"Mixture(weights, components) needs one weight per component: got weights of shape "
                f"{np.shape(self.weights)} for {len(self.components)} components"
            )
        event_shapes = {c.event_shape for c in self.components}
        if len(event_shapes) != 1:
            raise RuntimeModelError(f"Mixture components must have the same event shape, got {sorted(event_shapes)}")
        (self.event_shape,) = event_shapes
        shape = tuple(np.broadcast_shapes(*(c.shape for c in self.components)))
        self.batch_shape = shape[: len(shape) - len(self.event_shape)]
        for c in self.components:
            self._leading(c)
        kinds = {c.kind for c in self.components}
        self.kind = kinds.pop() if len(kinds) == 1 else "continuous"

    def _log_weights(self) -> Array:
        return jnp.log(self.weights) - jnp.log(jnp.sum(self.weights))

    def _leading(self, component: Distribution) -> Shape:
        """The axes a component's draws need in front to fill the mixture's batch shape.

        Independent draws must fill them, so broadcasting a component's size-1 axes (which would
        copy one draw) is refused.
        """
        extra = len(self.batch_shape) - len(component.batch_shape)
        if self.batch_shape[extra:] != component.batch_shape:
            raise RuntimeModelError(
                f"Mixture components of batch shapes {component.batch_shape} and {self.batch_shape} do not "
                "line up; give every component the same shape, or scalar parameters"
            )
        return self.batch_shape[:extra]

    def sample(self, key, shape=()):
        key_choice, *keys = jax.random.split(key, len(self.components) + 1)
        draws = [c.sample(k, tuple(shape) + self._leading(c)) for c, k in zip(self.components, keys)]
        choice = jax.random.categorical(key_choice, self._log_weights(), shape=tuple(shape) + self.batch_shape)
        choice = choice.reshape(choice.shape + (1,) * len(self.event_shape))
        out = draws[0]
        for index, draw in enumerate(draws[1:], start=1):
            out = jnp.where(choice == index, draw, out)
        return out

    def log_prob(self, x):
        log_w = self._log_weights()
        terms = [log_w[k] + c.log_prob(x) for k, c in enumerate(self.components)]
        shape = jnp.broadcast_shapes(*(jnp.shape(t) for t in terms))
        return jax.nn.logsumexp(jnp.stack([jnp.broadcast_to(t, shape) for t in terms]), axis=0)

    @property
    def support(self):
        bounds = [c.support for c in self.components]
        xp = np if all(is_static(lo) and is_static(hi) for lo, hi in bounds) else jnp
        lower = bounds[0][0]
        upper = bounds[0][1]
        for lo, hi in bounds[1:]:
            lower, upper = xp.minimum(lower, lo), xp.maximum(upper, hi)
        return broadcast_to(lower, self.shape), broadcast_to(upper, self.shape)


def iid(base: Distribution, k: Any) -> IID:
    """`iid(D, k)`: k independent draws of D on a new leading axis."""
    if not isinstance(base, Distribution):
        raise RuntimeModelError("the first argument of iid(D, k) must be a distribution")
    return IID(base, (static_int(k, "the number of draws k of iid(D, k)"),))


# Built-in distribution constructors by their `.hsbi` name, with their arity.
DISTRIBUTIONS: dict[str, tuple[Any, int]] = {
    "Normal": (Normal, 2),
    "HalfNormal": (HalfNormal, 1),
    "LogNormal": (LogNormal, 2),
    "Uniform": (Uniform, 2),
    "TruncatedNormal": (TruncatedNormal, 4),
    "Beta": (Beta, 2),
    "Gamma": (Gamma, 2),
    "Exponential": (Exponential, 1),
    "Cauchy": (Cauchy, 2),
    "HalfCauchy": (HalfCauchy, 1),
    "StudentT": (StudentT, 3),
    "Laplace": (Laplace, 2),
    "Binomial": (Binomial, 2),
    "Poisson": (Poisson, 1),
    "Bernoulli": (Bernoulli, 1),
    "Categorical": (Categorical, 1),
    "MvNormal": (MvNormal, 2),
    "Dirichlet": (Dirichlet, 1),
    "SortedUniform": (SortedUniform, 3),
    "Mixture": (Mixture, 2),
    "iid": (iid, 2),
}


def make_distribution(name: str, args: Sequence[Any]) -> Distribution:
    """Build the built-in distribution `name` from evaluated positional arguments."""
    constructor, arity = DISTRIBUTIONS[name]
    if len(args) != arity:
        raise RuntimeModelError(f"{name} takes {arity} argument(s), got {len(args)}")
    if name == "Mixture" and not (
        isinstance(args[1], (list, tuple)) and all(isinstance(c, Distribution) for c in args[1])
    ):
        raise RuntimeModelError("the second argument of Mixture(weights, [D1, D2, …]) must be a vector of distributions")
    if name != "Mixture" and name != "iid" and any(isinstance(a, (Distribution, list, tuple)) for a in args):
        raise RuntimeModelError(f"the arguments of {name} must be numbers or arrays")
    return constructor(*args)
