"""Runtime stage: the observation model's log likelihood, for reference posteriors by MCMC.

Input: a `LoweredModel`, parameters (globals at their shape, locals with a leading site axis) and
data (observations and inputs with a leading site axis). Output: pure JAX functions —
`log_likelihood`, log p(data | params), and `log_joint_unconstrained`, the log density of the
posterior in the unconstrained space that NUTS samples. All are jittable and differentiable
(through `odesolve` too); nothing is jitted here.

The likelihood is read off the model itself: each site's `observe y ~ D(…)` contributes
`D(…).log_prob(y)`, with the site's deterministic values computed from its globals, locals and
inputs first. An observation defined with `=` (a deterministic function of simulator randomness,
like Two Moons), or whose distribution reads simulator randomness, has no tractable likelihood:
`check_tractable` says so before anything is traced.

Hierarchical posteriors are often funnels (Eight Schools: θⱼ ~ Normal(μ, τ) with τ near 0), where
NUTS in the bijectors' coordinates diverges. `from_noncentred` offers the usual cure, non-centred
coordinates for the locals with a `Normal` or `LogNormal` prior: the unconstrained value of such
a local (the value itself for Normal, its log for LogNormal) is `loc + scale · u`, with `u`
standard normal under the prior. `log_joint_noncentred` is the posterior density in those
coordinates; the posterior itself is unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from hierdsl.compiler.ir import E, ModelIR, Variable
from jaxtyping import Array, Float

from .distributions import IID, LogNormal, Normal
from .errors import RuntimeModelError
from .lower import LoweredModel

Params = dict[str, Any]


class IntractableLikelihoodError(RuntimeModelError):
    """The model's observations have no likelihood that can be evaluated."""


# ----------------------------------------------------------------------------- structure


def likelihood_variables(ir: ModelIR) -> tuple[Variable, ...]:
    """The per-site variables the likelihood evaluates, in order: the observations and what they read.

    Per-site values that no observation reads (e.g. a derived quantity computed after the
    observations) are left out, so they need not be tractable.
    """
    needed = {v.name for v in ir.observations}
    for v in reversed(ir.variables):
        if v.name in needed:
            needed.update(v.deps)
    return tuple(v for v in ir.variables if v.per_site and v.name in needed)


def check_tractable(ir: ModelIR) -> None:
    """Raise `IntractableLikelihoodError` unless every observation's likelihood can be evaluated.

    That needs every observation to be `observe y ~ Dist(…)`, and no value the likelihood reads
    (the distribution's arguments, the site's deterministic values before it, a fixed design) to
    draw simulator randomness.
    """
    random_functions = {f.id: f.name for f in ir.functions if f.random}
    for v in likelihood_variables(ir):
        if v.role == "observation" and not v.stochastic:
            raise IntractableLikelihoodError(
                f"observation `{v.name}` is computed with `=`, its likelihood is not available; a reference "
                f"posterior needs `observe {v.name} ~ Dist(…)`"
            )
        if v.role in ("local", "input") and v.stochastic:
            continue  # given (a parameter or data): its own distribution is the prior's business
        through = _random_call(v.expr, random_functions)
        if through is not None:
            what = f"observation `{v.name}`'s distribution" if v.role == "observation" else f"`{v.name}`"
            raise IntractableLikelihoodError(
                f"{what} draws simulator randomness (through `{through}`), so the likelihood of the "
                "observations is not available; a reference posterior needs every observation as "
                "`observe y ~ Dist(…)` whose arguments are deterministic functions of the parameters and inputs"
            )


def _random_call(e: E, random_functions: Mapping[str, str]) -> str | None:
    """The name of a randomness-drawing function `e` calls (or draws itself), if any."""
    if e.tag in ("ucall", "fnref") and e.data[0] in random_functions:
        return random_functions[e.data[0]]
    if e.tag == "draw":
        return e.data[0]
    for a in e.args:
        found = _random_call(a, random_functions)
        if found is not None:
            return found
    return None


# ----------------------------------------------------------------------------- data


def site_values(lowered: LoweredModel, data: Mapping[str, Any]) -> dict[str, Float[Array, "sites ..."]]:
    """The data's observations and inputs as float32 arrays with a site axis, checked.

    Every observation and every drawn input (`input s ~ …`) must be given with shape
    `(num_sites, *shape)`; a fixed design (`input t = …`) left out is computed (it may not depend
    on parameters) and broadcast over the sites. Other entries of `data` are ignored.
    """
    ir = lowered.ir
    missing = [v.name for v in ir.observations if v.name not in data]
    missing += [v.name for v in ir.inputs if v.stochastic and v.name not in data]
    if missing:
        raise RuntimeModelError("the data lack " + ", ".join(f"`{name}`" for name in missing))
    first = ir.observations[0]
    if jnp.ndim(data[first.name]) != len(first.shape) + 1:
        raise RuntimeModelError(
            f"observation `{first.name}` has shape {jnp.shape(data[first.name])}; the data need a leading "
            f"site axis: shape (num_sites, *{first.shape})"
        )
    num_sites = jnp.shape(data[first.name])[0]
    out = {}
    fixed = []
    for v in ir.variables:
        if v.role not in ("input", "observation"):
            continue
        if v.name not in data:
            fixed.append(v)
            continue
        value = jnp.asarray(data[v.name], jnp.float32)
        if value.shape != (num_sites, *v.shape):
            raise RuntimeModelError(
                f"`{v.name}` has shape {value.shape} in the data, expected {(num_sites, *v.shape)} "
                f"({num_sites} sites, as observation `{first.name}`, of shape {v.shape})"
            )
        out[v.name] = value
    if fixed:
        key = jax.random.key(0)
        design = lowered.sample_site_params(key, lowered.sample_globals(key))
        for v in fixed:
            out[v.name] = jnp.broadcast_to(jnp.asarray(design[v.name], jnp.float32), (num_sites, *v.shape))
    return out


# ----------------------------------------------------------------------------- densities


def site_log_likelihood(
    lowered: LoweredModel, globals: Mapping[str, Any], site_params: Mapping[str, Any], site_data: Mapping[str, Any]
) -> Float[Array, ""]:
    """log p(one site's observations | globals, its locals, its inputs) — no site axis anywhere.

    Arguments:
        lowered: the lowered model (`check_tractable(lowered.ir)` must pass).
        globals: the globals (global deterministic values are computed when absent).
        site_params: the site's locals.
        site_data: the site's observations and inputs (as `site_values` gives them, for one site).
    """
    # Private hooks of LoweredModel: the global environment (model arguments, globals and global
    # deterministic values, evaluated without randomness), an observation's distribution shaped
    # like the variable (`_prior` works for any `~` statement), and a deterministic value.
    env = lowered._global_env(globals)
    total = jnp.zeros((), jnp.float32)
    for v in likelihood_variables(lowered.ir):
        if v.role == "local":
            value = site_params[v.name]
        elif v.role == "input":
            value = site_data[v.name]
        elif v.role == "observation":
            value = site_data[v.name]
            log_prob = jnp.sum(lowered._prior(v, env).log_prob(value))
            total = _add_log_density(total, log_prob)
        else:
            value = lowered._evaluate(v, None, env)
        env[v.name] = value
    return total


def log_likelihood(lowered: LoweredModel, params: Mapping[str, Any], data: Mapping[str, Any]) -> Float[Array, ""]:
    """log p(data | params): the sum over sites of each site's observation log density (or mass).

    Arguments:
        lowered: the lowered model.
        params: globals at their shape, locals with a leading site axis.
        data: observations and inputs with a leading site axis (see `site_values`).

    Raises:
        IntractableLikelihoodError: if an observation is computed with `=` or its distribution reads
            simulator randomness.
    """
    check_tractable(lowered.ir)
    return _log_likelihood(lowered, params, site_values(lowered, data))


def _log_likelihood(lowered: LoweredModel, params: Mapping[str, Any], values: Mapping[str, Array]) -> Array:
    globals = {v.name: params[v.name] for v in lowered.ir.globals}
    locals_ = {v.name: params[v.name] for v in lowered.ir.locals}
    num_sites = next(iter(values.values())).shape[0]
    for name, value in locals_.items():
        if jnp.shape(value)[:1] != (num_sites,):
            raise RuntimeModelError(
                f"local parameter `{name}` has shape {jnp.shape(value)}; it needs a leading site axis of "
                f"length {num_sites} (the number of sites in the data)"
            )
    per_site = jax.vmap(lambda p, d: site_log_likelihood(lowered, globals, p, d))(locals_, values)
    return jnp.where(jnp.any(per_site == -jnp.inf), -jnp.inf, jnp.sum(per_site))


def log_joint_unconstrained(lowered: LoweredModel, z: Mapping[str, Any], data: Mapping[str, Any]) -> Float[Array, ""]:
    """The unnormalised log posterior density in unconstrained space (what NUTS samples).

    log p(z | data) + const = log_prior(params) + log |det ∂params/∂z| + log_likelihood(params, data),
    with `params, log_det = to_constrained(z)`.

    Arguments:
        lowered: the lowered model.
        z: unconstrained parameters (`to_unconstrained`'s layout: globals at their unconstrained
            shape, locals with a leading site axis).
        data: observations and inputs with a leading site axis.
    """
    check_tractable(lowered.ir)
    values = site_values(lowered, data)
    inputs = {name: values[name] for name in lowered.prior_inputs}
    z_params = {name: z[name] for name in lowered.parameter_names}
    params, log_det = lowered.to_constrained({**z_params, **inputs})
    params = {name: params[name] for name in lowered.parameter_names}
    log_prior = lowered.log_prior({**params, **inputs})
    return _add_log_density(log_prior, log_det + _log_likelihood(lowered, params, values))


# ----------------------------------------------------------------------------- non-centred coordinates

# Priors whose unconstrained value is an affine function of a standard normal: Normal (identity
# bijector) and LogNormal (log bijector). Their IR call names, and their runtime classes.
_LOCATION_SCALE_NAMES = ("Normal", "LogNormal")
_LOCATION_SCALE = (Normal, LogNormal)


def noncentred_locals(ir: ModelIR) -> tuple[str, ...]:
    """The locals that `from_noncentred` reparameterises.

    Those with a `Normal(loc, scale)` or `LogNormal(loc, scale)` prior whose arguments read no
    local (directly or through a site's deterministic values): their location and scale are then
    known from the globals and inputs alone.
    """
    reads_locals: set[str] = set()
    names = []
    for v in ir.variables:
        if not v.per_site:
            continue
        dependent = any(d in reads_locals for d in v.deps)
        if v.role == "local":
            if v.stochastic and not dependent and v.expr.tag == "call" and v.expr.data[0] in _LOCATION_SCALE_NAMES:
                names.append(v.name)
            reads_locals.add(v.name)
        elif dependent:
            reads_locals.add(v.name)
    return tuple(names)


def hierarchical_locals(ir: ModelIR) -> tuple[str, ...]:
    """The `noncentred_locals` whose location or scale reads a global parameter (directly or
    through deterministic values): the ones that form funnels, such as Eight Schools' θⱼ ~
    Normal(μ, τ). A local with a fixed prior (μᵢ ~ Normal(0, 1)) is not among them."""
    reads_globals = {v.name for v in ir.globals}
    for v in ir.variables:
        if v.role in ("global_det", "site_det") and any(d in reads_globals for d in v.deps):
            reads_globals.add(v.name)
    return tuple(name for name in noncentred_locals(ir) if any(d in reads_globals for d in ir.variable(name).deps))


def noncentre(lowered: LoweredModel, z: Mapping[str, Any], inputs: Mapping[str, Any], names: tuple[str, ...],
              num_sites: int) -> Params:
    """Unconstrained parameters of one data set → the same with each local in `names` standardised
    by its prior, `u = (z - loc) / scale` per site (`inputs`: the sites' inputs, site axis first).
    The inverse of `recentre`; `names` must be among `noncentred_locals`."""
    if not names:
        return dict(z)
    loc, scale = _locations_scales(lowered, z, inputs, names, num_sites)
    return {**z, **{name: (jnp.asarray(z[name], jnp.float32) - loc[name]) / scale[name] for name in names}}


def recentre(lowered: LoweredModel, u: Mapping[str, Any], inputs: Mapping[str, Any], names: tuple[str, ...],
             num_sites: int) -> tuple[Params, Float[Array, " sites"]]:
    """The inverse of `noncentre`, with log |det ∂z/∂u| per site (Σ log scale over its elements)."""
    if not names:
        return dict(u), jnp.zeros((num_sites,), jnp.float32)
    loc, scale = _locations_scales(lowered, u, inputs, names, num_sites)
    z = {**u, **{name: loc[name] + scale[name] * jnp.asarray(u[name], jnp.float32) for name in names}}
    log_det = sum(jnp.sum(jnp.log(scale[name]).reshape(num_sites, -1), axis=1) for name in names)
    return z, log_det


def from_noncentred(
    lowered: LoweredModel, u: Mapping[str, Any], data: Mapping[str, Any]
) -> tuple[Params, Float[Array, ""]]:
    """Non-centred coordinates → the unconstrained parameters of `to_constrained`, with log |det|.

    Arguments:
        lowered: the lowered model.
        u: like `to_unconstrained`'s output, except that each of `noncentred_locals` holds its
            standardised value `u` (with the site axis), `z = loc + scale · u`.
        data: observations and inputs with a leading site axis (the inputs may set loc and scale).

    Returns:
        `z` and the log |det ∂z/∂u| = Σ log scale, summed over the reparameterised elements and sites.
    """
    names = noncentred_locals(lowered.ir)
    if not names:
        return dict(u), jnp.zeros((), jnp.float32)
    values = site_values(lowered, data)
    loc, scale = _locations_scales(lowered, u, values, names, _num_sites(values))
    z = dict(u)
    for name in names:
        z[name] = loc[name] + scale[name] * jnp.asarray(u[name], jnp.float32)
    return z, sum(jnp.sum(jnp.log(scale[name])) for name in names)


def to_noncentred(lowered: LoweredModel, z: Mapping[str, Any], data: Mapping[str, Any]) -> Params:
    """The inverse of `from_noncentred`: unconstrained parameters → non-centred coordinates."""
    names = noncentred_locals(lowered.ir)
    if not names:
        return dict(z)
    values = site_values(lowered, data)
    loc, scale = _locations_scales(lowered, z, values, names, _num_sites(values))
    u = dict(z)
    for name in names:
        u[name] = (jnp.asarray(z[name], jnp.float32) - loc[name]) / scale[name]
    return u


def log_joint_noncentred(lowered: LoweredModel, u: Mapping[str, Any], data: Mapping[str, Any]) -> Float[Array, ""]:
    """`log_joint_unconstrained` in non-centred coordinates: log p(z(u) | data) + log |det ∂z/∂u|."""
    z, log_det = from_noncentred(lowered, u, data)
    return log_joint_unconstrained(lowered, z, data) + log_det


def _num_sites(values: Mapping[str, Array]) -> int:
    return int(jnp.shape(next(iter(values.values())))[0])


def _locations_scales(
    lowered: LoweredModel, unconstrained: Mapping[str, Any], values: Mapping[str, Array], names: tuple[str, ...],
    num_sites: int,
) -> tuple[dict[str, Array], dict[str, Array]]:
    """Per site, the location and scale (in unconstrained space) of each local in `names`
    (`values`: the sites' inputs, and possibly observations, site axis first)."""
    ir = lowered.ir
    globals, _ = lowered.globals_to_constrained({v.name: unconstrained[v.name] for v in ir.globals})
    needed = set(names)
    for v in reversed(ir.variables):
        if v.name in needed:
            needed.update(v.deps)
    site_variables = [v for v in ir.variables if v.per_site and v.name in needed]

    def one_site(site_data):
        env = lowered._global_env(globals)
        loc, scale = {}, {}
        for v in site_variables:
            if v.name in names:
                dist = lowered._prior(v, env)
                base = dist.base if isinstance(dist, IID) else dist
                if not isinstance(base, _LOCATION_SCALE):
                    raise RuntimeModelError(f"`{v.name}`'s prior is not Normal or LogNormal; it cannot be non-centred")
                loc[v.name] = jnp.broadcast_to(base.loc, v.shape)
                scale[v.name] = jnp.broadcast_to(base.scale, v.shape)
            elif v.role == "input":
                env[v.name] = site_data[v.name]
            else:  # a site's deterministic value (by construction, none reads a local)
                env[v.name] = lowered._evaluate(v, None, env)
        return loc, scale

    return jax.vmap(one_site, axis_size=num_sites)(dict(values))


def _add_log_density(total: Array, term: Array) -> Array:
    """total + term, staying −inf once one term is −inf (a later term may then be NaN)."""
    return jnp.where(total == -jnp.inf, -jnp.inf, total + term)
