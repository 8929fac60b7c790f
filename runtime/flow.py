"""Runtime stage: flow matching — the training loss, Diffrax sampling and the log density.

Input: a vector field `vf(t, x, context) -> dx/dt` (the transformer from `nn`, or the baseline
`MLPVectorField` below), flat target vectors `x` with a per-dimension target mask, and a per-example
conditioning `context` (any pytree, passed to the vector field untouched). Output: the conditional
flow-matching loss (minimised by `train`), samples, and log densities.

Conventions:

- Probability path (rectified flow / optimal-transport path of Lipman et al. 2023): the base
  x0 ~ N(0, I) sits at t = 0 and the target x1 at t = 1, with
  x_t = (1 - (1 - σ_min) t) x0 + t x1 and target velocity u = x1 - (1 - σ_min) x0. The small σ_min
  keeps the conditional path non-degenerate at t = 1.
- Masks: 1 marks a real target dimension, 0 padding. Padding is zeroed in x0 and x1, so the network
  sees x_t = 0 there during training exactly as during sampling; it is excluded from the loss, held
  at exactly 0 while sampling (the velocity is multiplied by the mask), and excluded from the
  divergence and the base density.
- Log density (instantaneous change of variables): along a trajectory, d log p_t(x_t)/dt = -div v.
  `log_prob` integrates the pair (x, Δ) from t = 1 back to t = 0 with dΔ/dt = div v and Δ(1) = 0, so
  that log q(x) = log N(x(0); 0, I) + Δ(0).

Compile once: `sample`, `integrate`, `log_prob` and `batch_log_prob` are `eqx.filter_jit`-ed. The
arrays in the vector field, context, mask, points and key are traced; everything else (solver,
step-size controller, sizes, options) is static. Calling them again with a new context, new
points or new weights of the same shapes therefore reuses the compiled code without retracing.
"""

import math
from collections.abc import Callable
from typing import Any, Literal

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

VectorField = Callable[[Float[Array, ""], Float[Array, " dim"], PyTree], Float[Array, " dim"]]
"""The protocol every vector field follows: `vf(t, x, context) -> dx/dt` for one example."""

_DEFAULT_SIGMA_MIN = 1e-4


class FlowData(eqx.Module):
    """Flow-matching examples with a leading example axis on every leaf.

    **Fields:**

    - `x1`: the target vectors, shape `(num_examples, dim)`. Padded entries may hold anything.
    - `context`: a pytree whose leaves all have leading axis `num_examples`.
    - `mask`: 1 for real target dimensions and 0 for padding, shape `(num_examples, dim)`.
    """

    x1: Float[Array, "num_examples dim"]
    context: PyTree
    mask: Float[Array, "num_examples dim"]

    def __check_init__(self):
        if jnp.ndim(self.x1) != 2:
            raise ValueError(
                f"FlowData.x1 must have shape (num_examples, dim), got {jnp.shape(self.x1)}; "
                "flatten each example's targets into one vector first."
            )
        if jnp.shape(self.mask) != jnp.shape(self.x1):
            raise ValueError(
                f"FlowData.mask has shape {jnp.shape(self.mask)} but x1 has shape "
                f"{jnp.shape(self.x1)}; pass one mask entry per target entry "
                "(use jnp.ones_like(x1) when nothing is padded)."
            )
        for path, leaf in jax.tree_util.tree_leaves_with_path(self.context):
            if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != self.num_examples:
                raise ValueError(
                    f"FlowData.context{jax.tree_util.keystr(path)} has shape {jnp.shape(leaf)}, "
                    f"but every context leaf needs the leading example axis of length "
                    f"{self.num_examples} that x1 has."
                )

    @property
    def num_examples(self) -> int:
        return jnp.shape(self.x1)[0]


class MLPVectorField(eqx.Module):
    """A baseline vector field: an MLP on `[x, flattened context, time features]`.

    The time features are `t` and `sin`/`cos` of `2π k t` for `k = 1, …, num_frequencies`.
    """

    mlp: eqx.nn.MLP
    context_size: int = eqx.field(static=True)
    num_frequencies: int = eqx.field(static=True)

    def __init__(
        self,
        target_size: int,
        context_size: int,
        *,
        width_size: int = 128,
        depth: int = 3,
        num_frequencies: int = 4,
        activation: Callable[[Array], Array] = jax.nn.silu,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `target_size`: the length `dim` of the target vector `x`.
        - `context_size`: the total number of entries in one example's context pytree.
        - `width_size`, `depth`: hidden width and number of hidden layers of the MLP.
        - `num_frequencies`: how many sine/cosine pairs of `t` to feed the network.
        - `activation`: the hidden-layer activation.
        - `key`: initialisation key.
        """
        in_size = target_size + context_size + 1 + 2 * num_frequencies
        self.mlp = eqx.nn.MLP(
            in_size, target_size, width_size, depth, activation=activation, key=key
        )
        self.context_size = context_size
        self.num_frequencies = num_frequencies

    def __call__(
        self, t: Float[Array, ""], x: Float[Array, " dim"], context: PyTree
    ) -> Float[Array, " dim"]:
        flat_context, _ = ravel_pytree(context)
        if flat_context.shape != (self.context_size,):
            raise ValueError(
                f"MLPVectorField was built with context_size={self.context_size} but received a "
                f"context with {flat_context.size} entries; build it with "
                f"context_size={flat_context.size}."
            )
        t = jnp.asarray(t, dtype=x.dtype)
        angles = 2 * math.pi * jnp.arange(1, self.num_frequencies + 1, dtype=x.dtype) * t
        features = jnp.concatenate(
            [x, flat_context.astype(x.dtype), t[None], jnp.sin(angles), jnp.cos(angles)]
        )
        return self.mlp(features)


def draw_noise(
    key: PRNGKeyArray, data: FlowData
) -> tuple[Float[Array, "num_examples dim"], Float[Array, " num_examples"]]:
    """Draws the base samples x0 ~ N(0, I) (zero in padded dimensions) and times t ~ U(0, 1)."""
    noise_key, time_key = jr.split(key)
    x0 = jr.normal(noise_key, data.x1.shape, data.x1.dtype) * data.mask
    t = jr.uniform(time_key, (data.num_examples,), data.x1.dtype)
    return x0, t


def _example_squared_error(
    vf: VectorField,
    x1: Float[Array, " dim"],
    context: PyTree,
    mask: Float[Array, " dim"],
    x0: Float[Array, " dim"],
    t: Float[Array, ""],
    sigma_min: float,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """The masked sum of squared velocity errors for one example, and its number of real dims."""
    x0 = x0 * mask
    x1 = x1 * mask
    xt = (1 - (1 - sigma_min) * t) * x0 + t * x1
    target = x1 - (1 - sigma_min) * x0
    error = (vf(t, xt, context) - target) * mask
    return jnp.sum(error**2), jnp.sum(mask)


def squared_error_sums(
    vf: VectorField,
    data: FlowData,
    x0: Float[Array, "num_examples dim"],
    t: Float[Array, " num_examples"],
    *,
    sigma_min: float = _DEFAULT_SIGMA_MIN,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """The summed masked squared error over a batch and the number of real target entries.

    The noise is an argument (see `draw_noise`) so that a data set can be evaluated in chunks
    with the same noise as in one piece, and validated with the same noise every epoch.

    **Arguments:**

    - `vf`: the vector field.
    - `data`: the batch.
    - `x0`: base samples (padded dimensions are zeroed here).
    - `t`: one time per example.
    - `sigma_min`: the width of the conditional path at t = 1.

    **Returns:** `(sum of squared errors, number of real target entries)`.
    """
    errors, counts = jax.vmap(
        _example_squared_error, in_axes=(None, 0, 0, 0, 0, 0, None)
    )(vf, data.x1, data.context, data.mask, x0, t, sigma_min)
    return jnp.sum(errors), jnp.sum(counts)


def flow_matching_loss(
    vf: VectorField,
    data: FlowData,
    key: PRNGKeyArray,
    *,
    sigma_min: float = _DEFAULT_SIGMA_MIN,
) -> Float[Array, ""]:
    """The conditional flow-matching loss of a batch: the masked mean squared velocity error.

    The mean is over all real target entries of the batch, so padding never counts and every real
    dimension weighs the same whatever its example's size.

    **Arguments:**

    - `vf`: the vector field.
    - `data`: the batch (`x1`, `context`, `mask`, each with a leading example axis).
    - `key`: the key for the base noise x0 ~ N(0, I) and times t ~ U(0, 1).
    - `sigma_min`: the width of the conditional path at t = 1.

    **Returns:** a scalar loss.
    """
    x0, t = draw_noise(key, data)
    total, count = squared_error_sums(vf, data, x0, t, sigma_min=sigma_min)
    return total / count


def _time_grid(t0: float, t1: float, num_steps: int, power: float) -> Float[Array, " n"]:
    """Step ends at t = 1 - (1 - k/N)^power, k = 0..N, ordered from `t0` to `t1` (0 → 1 or 1 → 0).

    Power > 1 crowds the steps toward t = 1, where the flow contracts the base onto the data: a
    conditional of width s in standardised units is resolved by even steps only when 1/N ≲ s.
    """
    u = jnp.linspace(0.0, 1.0, num_steps + 1)
    grid = 1.0 - (1.0 - u) ** power  # exactly 0 and 1 at the ends: linspace's ends are exact
    return grid if t1 > t0 else grid[::-1]


def _solve(
    vector_field: Callable[[Float[Array, ""], PyTree, Any], PyTree],
    y0: PyTree,
    t0: float,
    t1: float,
    *,
    solver: diffrax.AbstractSolver,
    stepsize_controller: diffrax.AbstractStepSizeController,
    num_steps: int | None,
    max_steps: int,
    time_power: float = 1.0,
) -> PyTree:
    """Integrates `vector_field` from `t0` to `t1` and returns the state at `t1`."""
    fixed = isinstance(stepsize_controller, diffrax.ConstantStepSize)
    if fixed and num_steps is None:
        raise ValueError(
            "A fixed step size needs a step count: pass num_steps (e.g. num_steps=100) together "
            "with stepsize_controller=diffrax.ConstantStepSize()."
        )
    if time_power <= 0:
        raise ValueError(f"time_power must be positive, got {time_power}; 1 spaces the steps evenly.")
    # With an adaptive controller `num_steps` only sets the first step; None lets Diffrax choose.
    dt0 = None if num_steps is None else (t1 - t0) / num_steps
    if fixed and time_power != 1.0:
        stepsize_controller, dt0 = diffrax.StepTo(ts=_time_grid(t0, t1, num_steps, time_power)), None
    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field),
        solver,
        t0,
        t1,
        dt0,
        y0,
        stepsize_controller=stepsize_controller,
        max_steps=max_steps,
        saveat=diffrax.SaveAt(t1=True),
    )
    return jax.tree.map(lambda y: y[-1], solution.ys)


def base_samples(key: PRNGKeyArray, num_samples: int, mask: Float[Array, " dim"]) -> Float[Array, "num_samples dim"]:
    """The base draws x0 ~ N(0, I) that `sample` starts from, padded dimensions set to 0: with
    `integrate`, `sample` in pieces (the same numbers)."""
    mask = jnp.asarray(mask)
    return jr.normal(key, (num_samples, mask.shape[0]), mask.dtype) * mask


@eqx.filter_jit
def sample(
    vf: VectorField,
    context: PyTree,
    mask: Float[Array, " dim"],
    key: PRNGKeyArray,
    num_samples: int,
    *,
    solver: diffrax.AbstractSolver = diffrax.Tsit5(),
    stepsize_controller: diffrax.AbstractStepSizeController = diffrax.PIDController(
        rtol=1e-5, atol=1e-5
    ),
    num_steps: int | None = None,
    max_steps: int = 4096,
    time_power: float = 1.0,
) -> Float[Array, "num_samples dim"]:
    """Draws samples by integrating dx/dt = vf(t, x, context) from t = 0 to t = 1.

    Each sample starts from x0 ~ N(0, I) with padded dimensions set to 0 and is integrated on its
    own (vmapped), so an adaptive controller picks steps per sample. Padded dimensions stay exactly
    0.

    **Arguments:**

    - `vf`: the vector field.
    - `context`: one example's context (no leading sample axis).
    - `mask`: 1 for real target dimensions, 0 for padding.
    - `key`: the key for the base samples.
    - `num_samples`: how many samples to draw.
    - `solver`: a Diffrax ODE solver. For fixed steps use e.g. `diffrax.Heun()` or
      `diffrax.Euler()` with `stepsize_controller=diffrax.ConstantStepSize()` and `num_steps`.
    - `stepsize_controller`: a Diffrax step-size controller.
    - `num_steps`: the number of steps for a constant step size; with an adaptive controller,
      optional, and sets the first step to `1 / num_steps`.
    - `max_steps`: the most steps any one sample may take.
    - `time_power`: with a fixed step size, step k ends at t = 1 − (1 − k/N)^time_power, so
      values above 1 put more of the N steps near the data end (t = 1), where narrow
      distributions need them; 1 spaces them evenly. Ignored by adaptive controllers.

    **Returns:** the samples, shape `(num_samples, dim)`.
    """
    return integrate(vf, context, mask, base_samples(key, num_samples, mask), solver=solver,
                     stepsize_controller=stepsize_controller, num_steps=num_steps, max_steps=max_steps,
                     time_power=time_power)


@eqx.filter_jit
def integrate(
    vf: VectorField,
    context: PyTree,
    mask: Float[Array, " dim"],
    x0: Float[Array, "num_samples dim"],
    *,
    solver: diffrax.AbstractSolver = diffrax.Tsit5(),
    stepsize_controller: diffrax.AbstractStepSizeController = diffrax.PIDController(
        rtol=1e-5, atol=1e-5
    ),
    num_steps: int | None = None,
    max_steps: int = 4096,
    time_power: float = 1.0,
) -> Float[Array, "num_samples dim"]:
    """`sample` from given base draws `x0` (`base_samples`): each row integrated from t = 0 to
    t = 1 on its own, so a row's result does not depend on the rows beside it. The options are
    `sample`'s."""
    mask = jnp.asarray(mask)

    def velocity(t, x, args):
        return vf(t, x, context) * mask

    def solve_one(x0):
        return _solve(
            velocity,
            x0,
            0.0,
            1.0,
            solver=solver,
            stepsize_controller=stepsize_controller,
            num_steps=num_steps,
            max_steps=max_steps,
            time_power=time_power,
        )

    return jax.vmap(solve_one)(x0 * mask)


def _probes(
    mask: Float[Array, " dim"],
    key: PRNGKeyArray | None,
    divergence: Literal["exact", "hutchinson"],
    num_probes: int,
    probe: Literal["rademacher", "gaussian"],
) -> tuple[Float[Array, "num_probes dim"], float]:
    """Probe vectors ε_k and weight w with div v ≈ w Σ_k ε_kᵀ J ε_k over the real dimensions."""
    dim = mask.shape[0]
    if divergence == "exact":
        # The masked basis vectors: Σ_k e_kᵀ J e_k is the trace of J over the real dimensions.
        return jnp.eye(dim, dtype=mask.dtype) * mask, 1.0
    if divergence != "hutchinson":
        raise ValueError(
            f"Unknown divergence {divergence!r}; use divergence='exact' (small dim) or "
            "divergence='hutchinson' (large dim, needs a key)."
        )
    if key is None:
        raise ValueError(
            "divergence='hutchinson' draws random probe vectors and needs a key: pass key=..."
        )
    if probe == "rademacher":
        draws = jr.rademacher(key, (num_probes, dim), mask.dtype)
    elif probe == "gaussian":
        draws = jr.normal(key, (num_probes, dim), mask.dtype)
    else:
        raise ValueError(f"Unknown probe {probe!r}; use probe='rademacher' or probe='gaussian'.")
    return draws * mask, 1.0 / num_probes


@eqx.filter_jit
def log_prob(
    vf: VectorField,
    x: Float[Array, " dim"],
    context: PyTree,
    mask: Float[Array, " dim"],
    *,
    key: PRNGKeyArray | None = None,
    divergence: Literal["exact", "hutchinson"] = "exact",
    num_probes: int = 1,
    probe: Literal["rademacher", "gaussian"] = "rademacher",
    solver: diffrax.AbstractSolver = diffrax.Tsit5(),
    stepsize_controller: diffrax.AbstractStepSizeController = diffrax.PIDController(
        rtol=1e-5, atol=1e-5
    ),
    num_steps: int | None = None,
    max_steps: int = 4096,
    time_power: float = 1.0,
) -> Float[Array, ""]:
    """The log density of the flow at `x`, over the real (unmasked) dimensions only.

    Integrates x back from t = 1 to t = 0 together with the divergence of the vector field, see the
    module docstring for the sign convention. Vmappable over `x`, `context` and `key`.

    **Arguments:**

    - `vf`: the vector field.
    - `x`: the point, shape `(dim,)`; padded entries are ignored.
    - `context`: one example's context.
    - `mask`: 1 for real target dimensions, 0 for padding.
    - `key`: the key for the Hutchinson probes; unused (and optional) for the exact divergence.
    - `divergence`: `"exact"` takes the trace of the Jacobian (`dim` Jacobian-vector products per
      evaluation, for small `dim`); `"hutchinson"` is the unbiased stochastic estimate
      `mean_k ε_kᵀ J ε_k` with the probes held fixed along the trajectory (for large `dim`).
    - `num_probes`: the number of Hutchinson probes.
    - `probe`: the Hutchinson probe distribution, `"rademacher"` (lower variance) or `"gaussian"`.
    - `solver`, `stepsize_controller`, `num_steps`, `max_steps`, `time_power`: as for `sample`.

    **Returns:** a scalar log density.
    """
    mask = jnp.asarray(mask)
    probes, weight = _probes(mask, key, divergence, num_probes, probe)

    def augmented(t, state, args):
        y, _ = state

        def velocity(y):
            return vf(t, y, context) * mask

        # The primal is unbatched over the probes, so the vector field runs once per evaluation.
        v, jacobian_probes = jax.vmap(
            lambda p: jax.jvp(velocity, (y,), (p,)), out_axes=(None, 0)
        )(probes)
        return v, weight * jnp.sum(probes * jacobian_probes)

    x = jnp.asarray(x) * mask
    x0, delta = _solve(
        augmented,
        (x, jnp.zeros((), x.dtype)),
        1.0,
        0.0,
        solver=solver,
        stepsize_controller=stepsize_controller,
        num_steps=num_steps,
        max_steps=max_steps,
        time_power=time_power,
    )
    base = -0.5 * jnp.sum(mask * x0**2) - 0.5 * jnp.sum(mask) * math.log(2 * math.pi)
    return base + delta


@eqx.filter_jit
def batch_log_prob(
    vf: VectorField,
    xs: Float[Array, "num_points dim"],
    context: PyTree,
    mask: Float[Array, " dim"],
    *,
    key: PRNGKeyArray | None = None,
    divergence: Literal["exact", "hutchinson"] = "exact",
    num_probes: int = 1,
    probe: Literal["rademacher", "gaussian"] = "rademacher",
    solver: diffrax.AbstractSolver = diffrax.Tsit5(),
    stepsize_controller: diffrax.AbstractStepSizeController = diffrax.PIDController(
        rtol=1e-5, atol=1e-5
    ),
    num_steps: int | None = None,
    max_steps: int = 4096,
    time_power: float = 1.0,
) -> Float[Array, " num_points"]:
    """`log_prob` at many points sharing one context, each with its own Hutchinson key.

    **Arguments:** as for `log_prob`, with `xs` of shape `(num_points, dim)`.

    **Returns:** the log densities, shape `(num_points,)`.
    """
    keys = None if key is None else jr.split(key, jnp.shape(xs)[0])

    def one(x, point_key):
        return log_prob(
            vf,
            x,
            context,
            mask,
            key=point_key,
            divergence=divergence,
            num_probes=num_probes,
            probe=probe,
            solver=solver,
            stepsize_controller=stepsize_controller,
            num_steps=num_steps,
            max_steps=max_steps,
            time_power=time_power,
        )

    return jax.vmap(one)(xs, keys)
