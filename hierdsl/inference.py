"""Public API, inference: `fit` a model into an `Estimator`, `condition` it on data, sample.

    model = hierdsl.compile("examples/eight_schools.hsbi")
    est = hierdsl.fit(model, budget=2000, key=jax.random.key(0))
    post = est.condition(hierdsl.read_data("examples/eight_schools.csv", model))
    draws = post.sample(1000, key=jax.random.key(1))     # {"mu": (1000,), "theta": (1000, 8), …}
    post.log_prob(draws)                                  # (1000,)
    est.save("eight_schools.hsbe"); hierdsl.load("eight_schools.hsbe")
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Mapping, Optional, Union

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from hierdsl.compiler.errors import HsbiError, error
from hierdsl.data import Dataset
from hierdsl.model import Model
from hierdsl.runtime import lf
from hierdsl.runtime.flow import log_prob as flow_log_prob
from hierdsl.runtime.flow import base_samples
from hierdsl.runtime.flow import integrate as flow_integrate
from hierdsl.runtime.lower import LoweredModel
from hierdsl.runtime.nn import TokenVectorField
from hierdsl.runtime.tokens import TokenLayout, target_mask

Strategy = Union[lf.LF, lf.Direct]
# Steps crowded toward t = 1 resolve narrow posteriors as well as an adaptive solve (docs/benchmark.md).
POSTERIOR_SAMPLER = lf.SamplerConfig(num_steps=32, time_power=2.0)
REGION_WARNING = 0.05  # warn when more posterior draws than this leave a rounds-refined estimator's region


def lower(model: Model) -> LoweredModel:
    """The model's lowered form, built once per model (with its cache of compiled functions)."""
    return model.lowered()


def fit(model: Model, *, budget: int, key, strategy: Optional[Strategy] = None, max_sites: Optional[int] = None,
        progress=None, store: Optional[lf.StageStore] = None, rounds: int = 1,
        data: Optional[Union[Dataset, Mapping[str, Any]]] = None) -> "Estimator":
    """Train an amortised estimator for `model` with `budget` single-site simulator calls.

    Arguments:
        model: a compiled model.
        budget: the number of single-site simulator calls (validation simulations included).
        key: a JAX PRNG key.
        strategy: `lf.LF()` (default) or `lf.Direct()`, with their settings.
        max_sites: the largest number of sites the estimator serves (default: the model's
            `num_sites`); any data set with up to this many sites can be conditioned on.
        progress: an object with `bar(label, total)` and `epochs(label, total)` (the CLI's bars).
        store: keeps finished stages so an interrupted run resumes (`hierdsl.checkpoint.PartialRun`).
        rounds: sequential rounds toward `data` (LF only): the budget is split over the rounds, and
            each round after the first simulates single sites drawn from the prior truncated to the
            current posterior's region for `data`, then trains both networks further (TSNPE-style;
            see `lf.refine_lf`). The result is meant for `data` (and data like it), not amortised.
        data: the observed data the rounds focus on.
    """
    strategy = strategy or lf.LF()
    max_sites = int(max_sites or model.ir.num_sites)
    if budget < 10:
        raise ValueError(f"a budget of {budget} simulations is too small to train on; use at least 10")
    lowered = lower(model)
    reshaped = [v for v in (*model.ir.globals, *model.ir.locals)
                if tuple(lowered.unconstrained_shapes[v.name]) != tuple(v.shape)]
    if reshaped:
        v = reshaped[0]
        raise HsbiError([error(
            f"parameter `{v.name}` has a {v.support.kind} prior, which the estimator does not support yet",
            v.span, "its unconstrained form has fewer numbers than the parameter; use an unconstrained "
            "parameterisation (e.g. softmax of Normal draws) for now")], dict(model.sources))
    if isinstance(strategy, lf.Direct):
        trained = lf.train_direct(lowered, budget, key, strategy, max_sites, progress=progress, store=store)
        return Estimator(model, strategy, budget, trained)
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    if rounds > 1 and data is None:
        raise ValueError("sequential rounds focus on one observed data set: pass data=...")
    per_round = [budget // rounds + (1 if r < budget % rounds else 0) for r in range(rounds)]
    keys = jr.split(key, rounds)
    trained = lf.train_lf(lowered, per_round[0], keys[0], strategy, max_sites, progress=progress, store=store)
    estimator = Estimator(model, strategy, per_round[0], trained)
    for r in range(1, rounds):
        if progress is not None:
            progress.message(f"round {r + 1}/{rounds}: {per_round[r]} single-site simulations from the prior "
                             "truncated to the current posterior's region")
        k_prop, k_round = jr.split(keys[r])
        posterior = estimator.condition(data)
        site_inputs = {v.name: np.asarray(posterior.data.values[v.name]) for v in model.ir.inputs if v.stochastic}
        trained = lf.refine_lf(lowered, estimator.trained, posterior.truncation(key=k_prop), per_round[r], k_round,
                               strategy, progress, site_inputs=site_inputs)
        estimator = Estimator(model, strategy, sum(per_round[: r + 1]), trained)
    return estimator


class Estimator:
    """A trained estimator: the posterior network (and the LF surrogate) for one model."""

    def __init__(self, model: Model, strategy: Strategy, budget: int, trained: lf.Trained):
        self.model = model
        self.strategy = strategy
        self.budget = budget
        self.trained = trained
        self.lowered = lower(model)
        self.layout = TokenLayout.from_ir(model.ir, max_sites=trained.max_sites)
        self.split = lf.posterior_split(self.layout, self.lowered)
        self.noncentred = lf.noncentred_locals(self.lowered, strategy)
        # The posterior network's view of the tokens (its non-centred locals pass through).
        self.normaliser = lf.posterior_normaliser(trained.normaliser, self.layout, self.noncentred,
                                                  trained.posterior_preconditioner, trained.globals_preconditioner)

    @property
    def max_sites(self) -> int:
        return self.trained.max_sites

    @property
    def simulator_calls(self) -> int:
        return self.trained.simulator_calls

    def condition(self, data: Union[Dataset, Mapping[str, Any]], sites: Optional[tuple[str, ...]] = None) -> "Posterior":
        """The posterior given observed data: a `Dataset`, or `{name: array with a site axis}`."""
        if not isinstance(data, Dataset):
            values = {k: np.asarray(v) for k, v in data.items()}
            n = {v.shape[0] for v in values.values()}
            if len(n) != 1:
                raise ValueError(f"every data variable needs the same leading site axis, got {n}")
            from hierdsl.data import default_site_labels

            data = Dataset(tuple(sites or default_site_labels(n.pop())), values)
        return Posterior(self, data)

    def sample_each(self, data: Mapping[str, Any], *, key,
                    sampler: lf.SamplerConfig = POSTERIOR_SAMPLER) -> dict[str, np.ndarray]:
        """One posterior draw for each of many data sets of the same site count, in one compiled
        call: `data` maps names to arrays `(num_sets, sites, ...)`; returns globals
        `(num_sets, *shape)` and locals `(num_sets, sites, *shape)`. For calibration checks (l-C2ST
        pairs, SBC with one draw), where one `condition(...).sample(1)` per set would pay a
        dispatch per set."""
        values = {k: np.asarray(v) for k, v in data.items()}
        num_sets = {v.shape[0] for v in values.values()}
        if len(num_sets) != 1:
            raise ValueError(f"every data variable needs the same leading axis of data sets, got {num_sets}")
        num_sets = num_sets.pop()
        posts = [self.condition({k: v[i] for k, v in values.items()}) for i in range(num_sets)]
        stack = lambda *a: jnp.stack(a)
        contexts = jax.tree.map(stack, *[p.context for p in posts])
        masks = jnp.stack([p.mask for p in posts])
        site_values = jax.tree.map(stack, *[p.site_values for p in posts])
        fn = _sampler(self, sampler)
        network, normaliser = self.trained.posterior, self.normaliser
        draws = jax.vmap(lambda c, m, sv, k: fn(network, normaliser, c, m, sv, base_samples(k, 1, m)))(
            contexts, masks, site_values, jr.split(key, num_sets))
        n = posts[0].num_sites
        return {name: np.asarray(value[:, 0, :n] if self.model.ir.variable(name).per_site else value[:, 0])
                for name, value in draws.items()}

    # -- persistence -----------------------------------------------------------
    def save(self, path: str) -> None:
        """Write the estimator atomically (see `hierdsl.checkpoint`)."""
        from hierdsl.checkpoint import save_estimator

        save_estimator(path, self)


class Posterior:
    """The posterior for one data set."""

    def __init__(self, estimator: Estimator, data: Dataset):
        self.estimator = estimator
        self.data = data
        ir = estimator.model.ir
        lowered = estimator.lowered
        n = data.num_sites
        if n > estimator.max_sites:
            raise HsbiError([error(
                f"the data have {n} sites but the estimator serves at most {estimator.max_sites}",
                label=f"train one for more sites (`--max-sites {n}`, Python `max_sites={n}`)")])
        missing = [v.name for v in ir.observations if v.name not in data.values]
        missing += [v.name for v in ir.inputs if v.stochastic and v.name not in data.values]
        if missing:
            raise HsbiError([error("the data lack " + ", ".join(f"`{m}`" for m in missing))])
        self.num_sites = n
        self.site_values = _site_values(lowered, data, estimator.max_sites)
        values = dict(self.site_values)
        raw = estimator.layout.encode(values, estimator.max_sites, absent=lowered.parameter_names)
        site_mask = (jnp.arange(estimator.max_sites) < n).astype(jnp.float32)
        raw = dataclasses.replace(raw, site_mask=site_mask)
        self.context = estimator.normaliser.forward(raw)
        self.mask = target_mask(estimator.layout, estimator.split, site_mask)

    def sample(self, num: int, *, key, sampler: lf.SamplerConfig = POSTERIOR_SAMPLER,
               progress: Optional[Callable[[int, int], None]] = None) -> dict[str, np.ndarray]:
        """`num` posterior draws: globals `(num, *shape)`, locals `(num, sites, *shape)`.

        The flow is integrated with `sampler` (32 fixed Heun steps crowded toward the data end by
        default; `SamplerConfig(solver="tsit5")` for an adaptive solve), in equal pieces of at most
        `sample_chunk(...)` draws (which bounds the memory; each draw is integrated on its own, so
        the pieces do not change the numbers), calling `progress(done, num)` after each. Compiled
        once per estimator, sampler and `num`.
        """
        est = self.estimator
        fn = _sampler(est, sampler)
        x0 = np.asarray(base_samples(key, num, self.mask))
        # Equal pieces (the last one padded to the same shape): one compilation per `num`.
        pieces = max(1, -(-num // sample_chunk(est.layout)))
        chunk = max(1, -(-num // pieces))
        parts = []
        for start in range(0, max(num, 1), chunk):  # num = 0: one empty piece, for the shapes
            part = x0[start:start + chunk]
            if num > chunk and len(part) < chunk:  # one compiled shape for every piece
                part = np.concatenate([part, np.zeros((chunk - len(part), part.shape[1]), part.dtype)])
            out = fn(est.trained.posterior, est.normaliser, self.context, self.mask, self.site_values, part)
            parts.append({name: np.asarray(value)[:min(chunk, num - start)] for name, value in out.items()})
            if progress is not None:
                progress(min(start + chunk, num), num)
        n = self.num_sites
        draws = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        draws = {name: value[:, :n] if est.model.ir.variable(name).per_site else value for name, value in draws.items()}
        if est.trained.truncation is not None:
            self._check_region(draws)
        return draws

    def _check_region(self, draws: Mapping[str, np.ndarray]) -> None:
        """An estimator refined by sequential rounds is trained for one data set's region of the
        globals; warn when a posterior reaches outside it (other data than the rounds focused on)."""
        box = self.estimator.trained.truncation
        z = self.unconstrained(draws)
        outside = np.zeros(len(next(iter(draws.values()))), bool)
        for v in self.estimator.model.ir.globals:
            value = z[v.name].reshape(len(outside), -1)
            lower, upper = np.ravel(box.lower[v.name]), np.ravel(box.upper[v.name])
            outside |= np.any((value < lower) | (value > upper), axis=1)
        if outside.mean() > REGION_WARNING:
            warnings.warn(
                f"{100 * outside.mean():.0f}% of the posterior draws of the globals lie outside the region this "
                "estimator's sequential rounds trained for: it was refined for other data, so this posterior is "
                "not reliable; train without --rounds (amortised) or with rounds toward these data", stacklevel=3)

    def truncation(self, *, key, num: int = 1000) -> lf.Truncation:
        """The region a sequential round draws from: a box, in unconstrained coordinates, around
        `num` draws of this posterior (per global, and per local pooled over the sites; see
        `lf.Truncation`)."""
        with warnings.catch_warnings():  # a later round's region may move past the last one's: expected
            warnings.simplefilter("ignore", UserWarning)
            draws = self.sample(num, key=key)
        return lf.Truncation.from_draws(self.estimator.lowered, self.unconstrained(draws), self.num_sites)

    def unconstrained(self, samples: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Draws (as `sample` returns them) mapped to the unconstrained coordinates the networks use."""
        params = self._padded(samples)
        fn = _unconstrained_fn(self.estimator)
        z = fn(params, self.site_values)
        n = self.num_sites
        return {name: np.asarray(value[:, :n] if self.estimator.model.ir.variable(name).per_site else value)
                for name, value in z.items()}

    def _padded(self, samples: Mapping[str, Any]) -> dict[str, jnp.ndarray]:
        est = self.estimator
        n, N = self.num_sites, est.max_sites
        params = {}
        for v in (*est.model.ir.globals, *est.model.ir.locals):
            value = jnp.asarray(samples[v.name], jnp.float32)
            if v.per_site:
                pad = jnp.zeros((value.shape[0], N - n, *v.shape), value.dtype)
                value = jnp.concatenate([value, pad], axis=1)
            params[v.name] = value
        return params

    def log_prob(self, samples: Mapping[str, Any], *, key=None,
                 sampler: lf.SamplerConfig = POSTERIOR_SAMPLER) -> np.ndarray:
        """The posterior log density of draws (as `sample` returns them), in constrained space."""
        est = self.estimator
        params = self._padded(samples)
        fn = _log_prob_fn(est, sampler)
        key = jr.key(0) if key is None else key
        return np.asarray(fn(est.trained.posterior, est.normaliser, self.context, self.mask,
                             self.site_values, params, key))


def _site_values(lowered: LoweredModel, data: Dataset, max_sites: int) -> dict[str, jnp.ndarray]:
    """Observations and inputs of the data, padded to `max_sites`, fixed-design inputs computed."""
    ir = lowered.ir
    n = data.num_sites
    out = {}
    for v in ir.variables:
        if v.role not in ("input", "observation"):
            continue
        if v.name in data.values:
            value = jnp.asarray(data.values[v.name], jnp.float32)
        else:
            # A fixed design (`input t = …`): evaluate it (it may not depend on parameters).
            globals = lowered.sample_globals(jr.key(0))
            site = lowered.sample_site_params(jr.key(0), globals)
            value = jnp.broadcast_to(jnp.asarray(site[v.name], jnp.float32), (n, *v.shape))
        pad = jnp.zeros((max_sites - n, *v.shape), jnp.float32)
        out[v.name] = jnp.concatenate([value, pad])
    return out


# Token values a piece of `Posterior.sample` carries through the network at once (draws × tokens
# per draw): its widest activation, the MLP's, is then 34 MB at the default width, whatever the
# number of draws, and a piece still keeps a CPU's cores busy.
SAMPLE_CHUNK_TOKENS = 2**15


def sample_chunk(layout) -> int:
    """The most draws `Posterior.sample` integrates at once for an estimator with this token layout:
    `SAMPLE_CHUNK_TOKENS` token values, between 32 and 512 draws."""
    return int(min(512, max(32, SAMPLE_CHUNK_TOKENS // max(layout.num_tokens, 1))))


def _sampler(est: Estimator, sampler: lf.SamplerConfig):
    lowered, split, layout, noncentred = est.lowered, est.split, est.layout, est.noncentred

    def build():
        # The network is an argument: every estimator of this model with the same layout shares it.
        options = sampler.options()

        @eqx.filter_jit
        def sample(network, normaliser, context, mask, site_values, x0):
            vf = TokenVectorField(network, split)
            x = flow_integrate(vf, context, mask, x0, **options)

            def decode(xi):
                tokens = normaliser.inverse(split.scatter(context, xi))
                z = layout.decode(tokens, layout.max_sites)
                z, _ = lf.recentre(lowered, z, site_values, noncentred, context.site_mask)
                params, _ = lf.from_flow_values(lowered, z, site_values, context.site_mask)
                return params

            return jax.vmap(decode)(x)

        return sample

    return lowered.compiled_once(("sample", split, sampler, noncentred), build)


def _unconstrained_fn(est: Estimator):
    lowered = est.lowered

    def build():
        @jax.jit
        def unconstrained(params, site_values):
            prior_inputs = {n: site_values[n] for n in lowered.prior_inputs}
            z = jax.vmap(lambda p: lowered.to_unconstrained({**p, **prior_inputs}))(params)
            return {name: z[name] for name in params}

        return unconstrained

    return lowered.compiled_once("unconstrained", build)


def _log_prob_fn(est: Estimator, sampler: lf.SamplerConfig):
    lowered, split, layout, noncentred = est.lowered, est.split, est.layout, est.noncentred

    def build():
        divergence = lf.log_prob_divergence(int(split.num_targets))
        options = sampler.options()

        @eqx.filter_jit
        def log_prob(network, normaliser, context, mask, site_values, params, key):
            vf = TokenVectorField(network, split)

            def one(p, k):
                z = lowered.to_unconstrained({**p, **{n: site_values[n] for n in lowered.prior_inputs}})
                _, log_det = lf.from_flow_values(lowered, z, site_values, context.site_mask)
                values = {**{name: site_values[name] for name in site_values}, **z}
                values = lf.noncentre(lowered, values, noncentred, context.site_mask)
                _, centring_log_det = lf.recentre(lowered, values, site_values, noncentred, context.site_mask)
                tokens = normaliser.forward(dataclasses.replace(
                    layout.encode({k2: values[k2] for k2 in values if k2 in set(layout.labels)}, layout.max_sites),
                    site_mask=context.site_mask))
                x = split.gather(tokens.global_values, tokens.site_values)
                lp = flow_log_prob(vf, x, context, mask, key=k, divergence=divergence, num_probes=4, **options)
                return lp - normaliser.target_log_jacobian(split, tokens) - centring_log_det - log_det

            keys = jr.split(key, jax.tree.leaves(params)[0].shape[0])
            return jax.vmap(one)(params, keys)

        return log_prob

    return lowered.compiled_once(("log_prob", split, sampler, noncentred), build)

