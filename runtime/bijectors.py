"""Bijectors between a parameter's support and unconstrained space (part of the IR → JAX stage).

The bijector of a parameter is chosen from its prior's support, evaluated given the other
parameters, so bounds may depend on them (`θ ~ Uniform(0, s)` has the upper bound `s`). Elementwise:

| support            | x = forward(z)                         | log |dx/dz|                          |
|--------------------|----------------------------------------|----------------------------------------|
| (−∞, ∞)            | z                                      | 0                                      |
| (a, ∞)             | a + exp(z)                             | z                                      |
| (−∞, b)            | b − exp(z)                             | z                                      |
| (a, b)             | a + (b − a)·sigmoid(z)                 | log(b − a) + log σ(z) + log σ(−z)      |

Positive parameters use exp rather than softplus: the log-Jacobian is just z and the map is the one
Stan and NumPyro use. Which case applies is decided per element, so a vector parameter may mix them
and bounds only known while tracing still work.

Two structured supports change shape or couple elements:
- simplex (`Dirichlet`, K categories): Stan's stick-breaking transform from R^(K−1); the
  unconstrained value has one element fewer on the last axis (`unconstrained_shape`).
- ordered within (a, b) (`SortedUniform(a, b, k)`): x = a + (b − a)·cumsum(p)[:k] with p the
  stick-breaking simplex of k + 1 parts, so R^k maps onto the increasing sequences in (a, b).
"""

from __future__ import annotations

import abc
from typing import Any, final

import jax
import jax.numpy as jnp
import numpy as np

from .distributions import Distribution, Shape
from .errors import RuntimeModelError
from .values import is_static

Array = jax.Array


class Bijector(abc.ABC):
    """A map from unconstrained space onto a parameter's support."""

    shape: Shape
    unconstrained_shape: Shape

    @abc.abstractmethod
    def forward(self, z: Array) -> tuple[Array, Array]:
        """The constrained value and the log |det| of the Jacobian dx/dz (a scalar)."""

    @abc.abstractmethod
    def inverse(self, x: Array) -> Array:
        """The unconstrained value of a constrained one."""


@final
class Bounded(Bijector):
    """Elementwise map onto (lower, upper); either bound may be infinite (see module docstring)."""

    def __init__(self, lower: Any, upper: Any, shape: Shape):
        self.lower, self.upper = lower, upper
        self.shape = self.unconstrained_shape = tuple(shape)
        # Unbounded priors (Normal, …) are the common case: make them exactly the identity.
        self._identity = (
            is_static(lower) and is_static(upper) and not np.isfinite(lower).any() and not np.isfinite(upper).any()
        )

    def _cases(self):
        """Masks and bounds with the infinite ones replaced, so unused branches stay finite."""
        lower_finite, upper_finite = jnp.isfinite(self.lower), jnp.isfinite(self.upper)
        both = lower_finite & upper_finite
        lower = jnp.where(lower_finite, self.lower, 0.0)
        upper = jnp.where(upper_finite, self.upper, 0.0)
        width = jnp.where(both, upper - lower, 1.0)
        return lower_finite & ~upper_finite, ~lower_finite & upper_finite, both, lower, upper, width

    def forward(self, z):
        z = jnp.asarray(z, jnp.float32)
        if self._identity:
            return z, jnp.zeros((), jnp.float32)
        only_lower, only_upper, both, lower, upper, width = self._cases()
        one_sided = only_lower | only_upper
        # exp of a large z in an unused branch would give inf·0 = NaN gradients: feed it 0 instead.
        growth = jnp.exp(jnp.where(one_sided, z, 0.0))
        x = jnp.where(
            both,
            lower + width * jax.nn.sigmoid(z),
            jnp.where(only_lower, lower + growth, jnp.where(only_upper, upper - growth, z)),
        )
        log_det = jnp.where(
            both,
            jnp.log(width) + jax.nn.log_sigmoid(z) + jax.nn.log_sigmoid(-z),
            jnp.where(one_sided, z, 0.0),
        )
        return x, jnp.sum(log_det)

    def inverse(self, x):
        x = jnp.asarray(x, jnp.float32)
        if self._identity:
            return x
        only_lower, only_upper, both, lower, upper, width = self._cases()
        u = jnp.where(both, (x - lower) / width, 0.5)
        gap = jnp.where(only_lower, x - lower, jnp.where(only_upper, upper - x, 1.0))
        return jnp.where(
            both, jnp.log(u) - jnp.log1p(-u), jnp.where(only_lower | only_upper, jnp.log(gap), x)
        )


def _stick_offsets(num_categories: int) -> np.ndarray:
    # Stan's centring: z = 0 maps to the uniform simplex.
    return np.log(np.arange(num_categories - 1, 0, -1, dtype=np.float32))


def stick_breaking_forward(z: Array) -> tuple[Array, Array]:
    """R^(K−1) → the K-simplex along the last axis; returns (x, elementwise-summed log |det|)."""
    u = z - _stick_offsets(z.shape[-1] + 1)
    log_s, log_1ms = jax.nn.log_sigmoid(u), jax.nn.log_sigmoid(-u)
    log_rest = jnp.cumsum(log_1ms, axis=-1)
    log_before = jnp.concatenate([jnp.zeros_like(log_rest[..., :1]), log_rest[..., :-1]], axis=-1)
    x = jnp.concatenate([jnp.exp(log_s + log_before), jnp.exp(log_rest[..., -1:])], axis=-1)
    return x, jnp.sum(log_s + log_1ms + log_before)


def stick_breaking_inverse(x: Array) -> Array:
    """The K-simplex along the last axis → R^(K−1)."""
    # The stick left before part k is the sum of parts k…K: summing from the end keeps it accurate.
    rest = jnp.flip(jnp.cumsum(jnp.flip(x, axis=-1), axis=-1), axis=-1)[..., :-1]
    s = x[..., :-1] / rest
    return jnp.log(s) - jnp.log1p(-s) + _stick_offsets(x.shape[-1])


@final
class StickBreaking(Bijector):
    """Onto the probability simplex along the last axis, from one fewer unconstrained element."""

    def __init__(self, shape: Shape):
        self.shape = tuple(shape)
        self.unconstrained_shape = self.shape[:-1] + (self.shape[-1] - 1,)

    def forward(self, z):
        return stick_breaking_forward(jnp.asarray(z, jnp.float32))

    def inverse(self, x):
        return stick_breaking_inverse(jnp.asarray(x, jnp.float32))


@final
class OrderedInterval(Bijector):
    """Onto increasing sequences within (lower, upper) along the last axis (same shape)."""

    def __init__(self, lower: Any, upper: Any, shape: Shape):
        self.shape = self.unconstrained_shape = tuple(shape)
        self.lower, self.upper = jnp.asarray(lower)[..., :1], jnp.asarray(upper)[..., :1]

    def forward(self, z):
        parts, log_det = stick_breaking_forward(jnp.asarray(z, jnp.float32))
        width = self.upper - self.lower
        x = self.lower + width * jnp.cumsum(parts[..., :-1], axis=-1)
        # cumsum is unit lower-triangular; scaling each of the k coordinates adds log(width).
        return x, log_det + jnp.sum(jnp.broadcast_to(jnp.log(width), x.shape))

    def inverse(self, x):
        fraction = (jnp.asarray(x, jnp.float32) - self.lower) / (self.upper - self.lower)
        head = jnp.diff(fraction, axis=-1, prepend=jnp.zeros_like(fraction[..., :1]))
        return stick_breaking_inverse(jnp.concatenate([head, 1.0 - fraction[..., -1:]], axis=-1))


def bijector_for(dist: Distribution, name: str) -> Bijector:
    """The bijector onto the support of the prior `dist` of parameter `name`."""
    if dist.kind == "discrete":
        raise RuntimeModelError(
            f"parameter `{name}` has a discrete prior; parameters must be continuous in .hsbi v1 "
            "(make it an `observe` or `input`, or give it a continuous prior)"
        )
    if dist.kind == "simplex":
        return StickBreaking(dist.shape)
    lower, upper = dist.support
    if dist.kind == "ordered":
        return OrderedInterval(lower, upper, dist.shape)
    return Bounded(lower, upper, dist.shape)
