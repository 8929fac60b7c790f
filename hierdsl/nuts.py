"""Reference posteriors by NUTS on the compiled model's own likelihood, and their validation.

    model = hierdsl.compile("examples/eight_schools.hsbi")
    ref = reference_posterior(model, data, num_samples=4000, key=jax.random.key(0))
    ref.samples     # {"mu": (4000,), "tau": (4000,), "theta": (4000, 8)}, constrained
    ref.r_hat, ref.ess, ref.trusted

The potential is `-log_joint_noncentred` (`hierdsl.runtime.likelihood`): the model's log prior,
the log-Jacobian of its bijectors and the likelihood of its `observe y ~ D(…)` statements, in the
unconstrained space NUTS moves in, with the Normal and LogNormal locals non-centred (the cure for
hierarchical funnels such as Eight Schools'; `parameterisation="centred"` keeps the bijectors'
coordinates, `-log_joint_unconstrained`). NumPyro's NUTS kernel (`numpyro.infer.hmc.hmc(potential_fn_gen=…,
algo="NUTS")`, the kernel behind `MCMC(NUTS(…))`) runs with the data as a traced argument, so the
sampler compiles once per model, data shape and settings and is reused for every data set — the
benchmark's observations and `validate_reference`'s simulated data sets. The chains run inside one
`jit`, one after another (`lax.map`) by default or in lockstep (`vmap`).

NumPyro is an optional dependency: `pip install 'hierdsl[bench]'`.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np

from hierdsl.compiler.ir import ModelIR
from hierdsl.data import Dataset
from hierdsl.model import Model
from hierdsl.runtime.errors import RuntimeModelError
from hierdsl.runtime.likelihood import (
    check_tractable,
    from_noncentred,
    log_joint_noncentred,
    log_joint_unconstrained,
    site_values,
    to_noncentred,
)
from hierdsl.runtime.lower import LoweredModel
from hierdsl.runtime.metrics import sbc_uniformity

ModelLike = Union[Model, LoweredModel]


@dataclass(frozen=True)
class ReferencePosterior:
    """NUTS draws of one posterior, with convergence diagnostics.

    Attributes:
        samples: constrained draws by parameter name: globals `(num_samples, *shape)`, locals
            `(num_samples, num_sites, *shape)`.
        r_hat: split R-hat per parameter element (globals `shape`, locals `(num_sites, *shape)`).
        ess: bulk effective sample size (rank-normalised, split chains) per parameter element.
        num_divergent: divergent transitions after warmup, over all chains.
        trusted: every R-hat below `r_hat_threshold` and every ESS above `ess_threshold`.
        num_chains: the number of chains the draws come from.
        seconds: wall time of the run, compilation included.
    """

    samples: dict[str, np.ndarray]
    r_hat: dict[str, np.ndarray]
    ess: dict[str, np.ndarray]
    num_divergent: int
    trusted: bool
    num_chains: int
    seconds: float

    @property
    def max_r_hat(self) -> float:
        """The largest R-hat over all parameter elements."""
        return float(max(np.max(r) for r in self.r_hat.values()))

    @property
    def min_ess(self) -> float:
        """The smallest bulk ESS over all parameter elements."""
        return float(min(np.min(e) for e in self.ess.values()))


def reference_posterior(
    model: ModelLike,
    data: Union[Mapping[str, Any], Dataset],
    *,
    num_samples: int,
    key: jax.Array,
    num_chains: int = 4,
    num_warmup: int = 1000,
    target_accept_prob: float = 0.9,
    max_tree_depth: int = 10,
    thinning: int = 1,
    num_init_draws: int = 16,
    parameterisation: str = "noncentred",
    chain_method: str = "sequential",
    r_hat_threshold: float = 1.01,
    ess_threshold: float = 400.0,
) -> ReferencePosterior:
    """Sample the posterior of `model` given `data` with NUTS.

    Each chain starts at the best (highest log density) of `num_init_draws` prior draws of its own,
    mapped to unconstrained space, then adapts its step size and a diagonal mass matrix over
    `num_warmup` iterations.

    Arguments:
        model: a compiled model (`hierdsl.compile`) or a `LoweredModel`.
        data: observations and inputs with a leading site axis (a mapping, or a `Dataset`).
        num_samples: the number of draws returned, split evenly over the chains (each keeps
            `ceil(num_samples / num_chains)` draws after warmup).
        key: a JAX PRNG key.
        num_chains: independent chains (at least 2 for a meaningful R-hat).
        num_warmup: adaptation iterations per chain, discarded.
        target_accept_prob: NUTS's step-size target (0.9, above NumPyro's 0.8: hierarchical posteriors
            are prone to funnels); raise it to 0.95 or 0.99 if there are divergences.
        max_tree_depth: NUTS's maximum tree depth (at most 2^depth leapfrog steps per iteration).
        thinning: keep every `thinning`-th draw after warmup (the chains run `thinning` times as
            long). Nearly independent draws matter for a C2ST against the reference: a classifier
            can tell autocorrelated draws apart from independent ones by memorising neighbours.
        num_init_draws: prior draws per chain to choose its starting point from.
        parameterisation: "noncentred" (locals with a Normal or LogNormal prior move as standard
            normals, `likelihood.noncentred_locals`) or "centred" (every parameter in its
            bijector's coordinates). The posterior is the same; non-centred avoids the funnel
            of weakly informed sites, centred can mix better when every site is well informed.
        chain_method: "sequential" (chains one after another, `lax.map`) or "vectorized" (in
            lockstep, `vmap`: quicker on an accelerator, but it compiles several times slower).
        r_hat_threshold: `trusted` needs every split R-hat below this.
        ess_threshold: `trusted` needs every bulk ESS above this.

    Raises:
        IntractableLikelihoodError: if an observation has no tractable likelihood (e.g. `observe x = …`).
        RuntimeModelError: if the model calls a host function (no gradients), the data do not fit
            the model, or no prior draw gives a finite log density to start from.
        ImportError: if NumPyro is not installed.
    """
    start = time.perf_counter()
    lowered = _lowered(model)
    values = site_values(lowered, data.values if isinstance(data, Dataset) else data)
    per_chain = math.ceil(num_samples / num_chains)
    if per_chain < 4:
        raise ValueError(
            f"num_samples = {num_samples} over {num_chains} chains leaves {per_chain} draws per chain; "
            "split R-hat needs at least 4 per chain"
        )
    if thinning < 1:
        raise ValueError(f"thinning keeps every k-th draw, k ≥ 1; got {thinning}")
    if parameterisation not in ("noncentred", "centred"):
        raise ValueError(f'parameterisation is "noncentred" or "centred", got {parameterisation!r}')
    if chain_method not in ("sequential", "vectorized"):
        raise ValueError(f'chain_method is "sequential" or "vectorized", got {chain_method!r}')
    run = _runner(lowered, num_warmup, per_chain, thinning, num_init_draws, target_accept_prob, max_tree_depth,
                  parameterisation, chain_method)
    keys = jax.random.split(_raw_key(key), num_chains)
    draws, diverging, started = jax.device_get(run(keys, values))
    if not np.all(started):
        raise RuntimeModelError(
            f"none of {num_init_draws} prior draws gives a finite log posterior density for "
            f"{int(np.sum(~started))} of {num_chains} chains, so NUTS has nowhere to start; check that the "
            "data can arise from the model (e.g. counts within a Binomial's n), or raise num_init_draws"
        )
    r_hat = {name: split_r_hat(value) for name, value in draws.items()}
    ess = {name: bulk_ess(value) for name, value in draws.items()}
    trusted = all(np.all(r < r_hat_threshold) for r in r_hat.values()) and all(
        np.all(e > ess_threshold) for e in ess.values()
    )
    # Interleave the chains before truncating, so a remainder drops the last draws of some chains.
    samples = {
        name: np.swapaxes(value, 0, 1).reshape(-1, *value.shape[2:])[:num_samples] for name, value in draws.items()
    }
    return ReferencePosterior(
        samples=samples,
        r_hat=r_hat,
        ess=ess,
        num_divergent=int(np.sum(diverging)),
        trusted=bool(trusted),
        num_chains=num_chains,
        seconds=time.perf_counter() - start,
    )


@dataclass(frozen=True)
class ReferenceValidation:
    """Simulation-based calibration of the NUTS reference on data simulated from the prior.

    Attributes:
        ranks: per parameter, the rank of the true value among the posterior draws (the number
            of draws below it, 0 … num_samples): globals `(num_observations, *shape)`, locals
            `(num_observations, num_sites, *shape)`. Uniform on 0 … num_samples when the
            reference is calibrated.
        num_samples: the number of posterior draws each rank is taken among.
        trusted: `ReferencePosterior.trusted` of each run, `(num_observations,)`.
        num_divergent: divergent transitions of each run, `(num_observations,)`.
    """

    ranks: dict[str, np.ndarray]
    num_samples: int
    trusted: np.ndarray
    num_divergent: np.ndarray

    def p_values(self, *, num_bins: int | None = None) -> dict[str, np.ndarray]:
        """Per parameter element, the chi-square p-value that its ranks are uniform.

        See `hierdsl.runtime.metrics.sbc_uniformity` (and `bonferroni` to combine them); with a
        handful of observations the test has little power — read the ranks too.
        """
        return {
            name: sbc_uniformity(r.reshape(r.shape[0], -1), self.num_samples, num_bins=num_bins).reshape(r.shape[1:])
            for name, r in self.ranks.items()
        }


def validate_reference(
    model: Model,
    *,
    num_observations: int,
    key: jax.Array,
    num_sites: int | None = None,
    num_samples: int = 400,
    **options: Any,
) -> ReferenceValidation:
    """Run a small SBC of the NUTS reference: truth from the prior, data simulated, ranks of the truth.

    Every run shares one compiled sampler (same model, site count and settings). Ranks of
    autocorrelated draws are only uniform when the draws are nearly independent: check that
    `trusted` holds (the ESS is then well above `num_samples / 10`), or thin.

    Arguments:
        model: a compiled model.
        num_observations: the number of simulated data sets (a handful to a few dozen).
        key: a JAX PRNG key.
        num_sites: sites per simulated data set (default: the model's `num_sites`).
        num_samples: posterior draws per data set.
        **options: passed on to `reference_posterior` (num_chains, num_warmup, …).
    """
    lowered = _lowered(model)
    num_sites = int(num_sites or model.ir.num_sites)
    ranks: dict[str, list[np.ndarray]] = {name: [] for name in lowered.parameter_names}
    trusted, divergent = [], []
    for data_key in jax.random.split(key, num_observations):
        simulate_key, nuts_key = jax.random.split(data_key)
        simulated = jax.device_get(model.simulate(simulate_key, num_sites))
        reference = reference_posterior(model, simulated, num_samples=num_samples, key=nuts_key, **options)
        for name in lowered.parameter_names:
            ranks[name].append(np.sum(reference.samples[name] < simulated[name][None], axis=0))
        trusted.append(reference.trusted)
        divergent.append(reference.num_divergent)
    return ReferenceValidation(
        ranks={name: np.stack(r) for name, r in ranks.items()},
        num_samples=num_samples,
        trusted=np.array(trusted),
        num_divergent=np.array(divergent),
    )


# ----------------------------------------------------------------------------- diagnostics


def split_r_hat(draws: np.ndarray) -> np.ndarray:
    """Split R-hat per element of draws shaped `(chains, draws, *shape)` (NumPyro's estimator)."""
    numpyro = _numpyro()
    return np.asarray(numpyro.diagnostics.split_gelman_rubin(np.asarray(draws, np.float64)))


def bulk_ess(draws: np.ndarray) -> np.ndarray:
    """Bulk effective sample size per element of draws shaped `(chains, draws, *shape)`.

    Vehtari et al. (2021): the draws are rank-normalised over all chains (z = Φ⁻¹((r − 3/8) / (S + 1/4)))
    and each chain split in half, then NumPyro's ESS estimator is applied.
    """
    numpyro = _numpyro()
    draws = np.asarray(draws, np.float64)
    num_chains, num_draws = draws.shape[:2]
    flat = draws.reshape(num_chains * num_draws, -1)
    ranks = flat.argsort(axis=0, kind="stable").argsort(axis=0, kind="stable") + 1.0
    z = np.asarray(jax.scipy.special.ndtri((ranks - 0.375) / (flat.shape[0] + 0.25)), np.float64).reshape(draws.shape)
    half = num_draws // 2
    split = np.concatenate([z[:, :half], z[:, num_draws - half :]], axis=0)
    return np.asarray(numpyro.diagnostics.effective_sample_size(split))


# ----------------------------------------------------------------------------- internals


# Compiled samplers by lowered model and settings; jax.jit adds one compilation per data shape.
_RUNNERS: "weakref.WeakKeyDictionary[LoweredModel, dict]" = weakref.WeakKeyDictionary()


def _lowered(model: ModelLike) -> LoweredModel:
    lowered = model if isinstance(model, LoweredModel) else model.lowered()
    check_tractable(lowered.ir)
    host = _host_externs(lowered.ir)
    if host:
        raise RuntimeModelError(
            f"NUTS needs gradients of the log density, but `extern host function {host[0]}` runs on the host "
            "without them; write it with jax.numpy and declare it `extern function`"
        )
    return lowered


def _host_externs(ir: ModelIR) -> list[str]:
    # The compiler keeps only the externs the model reaches, so every one listed is called.
    return [x.name for x in ir.externs if x.host]


def _raw_key(key: jax.Array) -> jax.Array:
    """NumPyro's kernels take raw uint32 keys; accept typed keys (`jax.random.key`) too."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key


def _runner(lowered: LoweredModel, num_warmup: int, num_draws: int, thinning: int, num_init: int,
            target_accept_prob: float, max_tree_depth: int, parameterisation: str, chain_method: str):
    """The jitted sampler `(chain keys, data) → (constrained draws, diverging, started)`, cached."""
    settings = (num_warmup, num_draws, thinning, num_init, float(target_accept_prob), int(max_tree_depth),
                parameterisation, chain_method)
    cache = _RUNNERS.setdefault(lowered, {})
    if settings not in cache:
        chain = _chain(lowered, *settings[:-1])
        if chain_method == "vectorized":
            cache[settings] = jax.jit(jax.vmap(chain, in_axes=(0, None)))
        else:
            cache[settings] = jax.jit(lambda keys, values: jax.lax.map(lambda key: chain(key, values), keys))
    return cache[settings]


def _chain(lowered: LoweredModel, num_warmup: int, num_draws: int, thinning: int, num_init: int,
           target_accept_prob: float, max_tree_depth: int, parameterisation: str):
    """One chain, `(key, data) → (constrained draws, diverging, started)`."""
    hmc = _numpyro().infer.hmc.hmc
    names = lowered.parameter_names

    noncentred = parameterisation == "noncentred"

    def log_joint(u, values):
        if noncentred:
            return log_joint_noncentred(lowered, u, values)
        return log_joint_unconstrained(lowered, u, values)

    init_kernel, sample_kernel = hmc(potential_fn_gen=lambda values: lambda z: -log_joint(z, values), algo="NUTS")

    def prior_draw(key, values):
        """One prior draw in the sampler's coordinates, the data's inputs given."""
        globals_key, sites_key = jax.random.split(key)
        globals = lowered.sample_globals(globals_key)
        inputs = {v.name: values[v.name] for v in lowered.ir.inputs}
        num_sites = next(iter(values.values())).shape[0]
        site_keys = jax.random.split(sites_key, num_sites)
        sites = jax.vmap(lowered.sample_site_params, in_axes=(0, None, 0))(site_keys, globals, inputs)
        z = lowered.to_unconstrained({**globals, **sites})
        z = {name: z[name] for name in names}
        return to_noncentred(lowered, z, values) if noncentred else z

    def chain(key, values):
        init_key, nuts_key = jax.random.split(key)
        candidates = jax.lax.map(lambda k: prior_draw(k, values), jax.random.split(init_key, num_init))
        densities = jax.vmap(log_joint, in_axes=(0, None))(candidates, values)
        densities = jnp.where(jnp.isnan(densities), -jnp.inf, densities)
        best = jnp.argmax(densities)
        z = jax.tree.map(lambda c: c[best], candidates)
        state = init_kernel(z, num_warmup, target_accept_prob=target_accept_prob, max_tree_depth=max_tree_depth,
                            model_args=(values,), rng_key=nuts_key)

        def step(state, _):
            state = sample_kernel(state, model_args=(values,))
            return state, (state.z, state.diverging)

        # One scan over warmup and sampling: a second scan would compile the NUTS kernel twice.
        _, (draws, diverging) = jax.lax.scan(step, state, None, length=num_warmup + num_draws * thinning)
        draws = jax.tree.map(lambda x: x[num_warmup::thinning], draws)
        diverging = diverging[num_warmup:]
        inputs = {name: values[name] for name in lowered.prior_inputs}
        if noncentred:
            draws = jax.vmap(lambda u: from_noncentred(lowered, u, values)[0])(draws)
        params = jax.vmap(lambda z: lowered.to_constrained({**z, **inputs})[0])(draws)
        return {name: params[name] for name in names}, diverging, densities[best] > -jnp.inf

    return chain


def _numpyro():
    """NumPyro, imported on first use: it is an optional dependency."""
    try:
        import numpyro
        import numpyro.diagnostics
        import numpyro.infer.hmc
    except ImportError:
        raise ImportError(
            "reference posteriors by NUTS need NumPyro, an optional dependency: pip install 'hierdsl[bench]'"
        ) from None
    return numpyro
