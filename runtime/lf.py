"""Runtime stage: likelihood-factorised (LF) training, and the direct baseline.

Input: a `LoweredModel`, a simulation budget and a PRNG key. Output: trained TFMPE networks —
a per-site surrogate q(y | globals, locals, inputs) and a posterior q(globals, locals | y, inputs)
over any number of sites up to a maximum — with the normaliser that maps model values to the
standardised tokens the networks see.

LF spends the whole budget `B` on **single-site** simulations (B simulator calls), trains the
surrogate on them, then assembles as many synthetic multi-site data sets as the posterior needs by
drawing globals, sites' inputs and locals from the prior and each site's observation from the
surrogate — no simulator calls. The direct baseline trains the same posterior network on `B // n`
full `n`-site simulations instead.

Flow space: parameters are mapped to unconstrained space by the lowering's bijectors; integer
observations are dequantised with uniform noise on [-0.5, 0.5) (and rounded when the surrogate
samples them); then every token is standardised by a per-token mean and scale (`Normaliser`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jaxtyping import Array, Float, PRNGKeyArray

from .flow import FlowData
from .flow import sample as flow_sample
from . import likelihood
from .errors import RuntimeModelError
from .lower import LoweredModel, check_simulations
from .nn import TokenTransformer, TokenVectorField
from .tokens import TokenLayout, Tokens, TokenSplit, target_mask
from .train import TrainResult, default_optimiser, train

Values = dict[str, Array]


# ----------------------------------------------------------------------------- configuration


# Few tokens: one dense masked product beats many small per-site ones; many tokens: blockwise,
# linear in the number of sites. One training gradient of the default posterior network at batch
# 128 on a 2-core CPU, dense time over blockwise (`python benchmarks/attention.py --batch 128
# --sites 4 8 16 24 32 50`, and `--model examples/sir.hsbi --sites 3 5 10`; 2026-12-06, jax 0.10):
# Gaussian Linear 0.83 at 9 tokens, 0.94 at 17, 0.77 at 33, 1.03 at 49, 1.34 at 65, 1.35 at 101;
# SIR (11 tokens a site) 0.93 at 34, 1.11 at 56, 1.55 at 111. The threshold was 128 until then,
# which put Gaussian Linear at 50 sites and SIR at 10 on the slower, dense path.
DENSE_ATTENTION_MAX_TOKENS = 48


@dataclass(frozen=True)
class NetworkConfig:
    """Size of a TFMPE transformer."""

    width: int = 64
    depth: int = 2
    num_heads: int = 4
    attention: str = "auto"  # "blockwise", "dense", or "auto": dense while there are few tokens

    def build(self, layout: TokenLayout, key: PRNGKeyArray) -> TokenTransformer:
        attention = self.attention
        if attention == "auto":
            attention = "dense" if layout.num_tokens <= DENSE_ATTENTION_MAX_TOKENS else "blockwise"
        return TokenTransformer(layout, width=self.width, depth=self.depth, num_heads=self.num_heads,
                                attention=attention, key=key)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation of one network."""

    learning_rate: float = 1e-3
    batch_size: int = 128
    max_epochs: int = 200
    patience: int = 20
    steps_per_epoch: int = 50  # for networks trained on freshly drawn batches
    validation_fraction: float = 0.1
    schedule: str = "constant"  # "constant" after warm-up, or "cosine" decay to 0 over max_epochs
    ema_decay: Optional[float] = None  # keep a moving average of the weights, and use it (`train.train`)

    def __post_init__(self):
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie strictly between 0 and 1, got {self.ema_decay!r}")

    def with_max_epochs(self, epochs: int) -> "TrainConfig":
        """These settings trained for at most `epochs` epochs. A cosine schedule spans all of them,
        so its patience grows with them: early stopping must not end it before the rate anneals."""
        patience = max(self.patience, epochs) if self.schedule == "cosine" else self.patience
        return dataclasses.replace(self, max_epochs=epochs, patience=patience)

    def optimiser(self, steps_per_epoch: Optional[int] = None):
        # The same object for the same settings: the compiled epoch holds the optimiser as a static
        # argument, so a new one would re-compile every stage and round that trains this way.
        return _optimiser(self, steps_per_epoch)


@functools.cache
def _optimiser(config: TrainConfig, steps_per_epoch: Optional[int]):
    """`TrainConfig.optimiser`, built once per settings."""
    warmup = min(100, 2 * config.steps_per_epoch)
    if config.schedule == "cosine" and steps_per_epoch:
        # A fixed step budget that anneals: early stopping only guards against over-fitting.
        return default_optimiser(config.learning_rate, warmup_steps=warmup,
                                 total_steps=max(warmup + 1, config.max_epochs * steps_per_epoch))
    # Constant rate after a short warm-up: early stopping decides the length.
    return default_optimiser(config.learning_rate, warmup_steps=warmup)


# The posterior network's steps cost the most (many sites per example): a fixed budget of steps on
# fresh site subsets with a cosine-annealed rate reaches a lower loss in fewer steps than a
# constant rate stopped early (measured on Eight Schools and Gaussian Linear; see issue notes).
# 80 epochs, not 40: on Eight Schools 40 left the school effects shrunk by 1.5 on average (mean
# error against NUTS 1.52), 80 cut that to 0.63 for about 2.5 more minutes on a 2-core CPU.
# A peak rate of 3e-3, not 1e-3: lower validation losses at the same steps on Eight Schools (two
# seeds) and SIR, the school effects' errors against NUTS halved, SIR's widest beta 5.8 -> 3.7 times
# the exact sd; Gaussian Linear level (one seed better, one worse) (docs/benchmark.md, "The
# posterior stage's learning rate").
POSTERIOR_TRAINING = TrainConfig(learning_rate=3e-3, max_epochs=80, patience=80, schedule="cosine")


@dataclass(frozen=True)
class SamplerConfig:
    """How flows are integrated when sampling: fixed steps of a second-order solver by default."""

    num_steps: int = 16
    solver: str = "heun"  # "heun", "euler", or "tsit5" (adaptive)
    time_power: float = 2.0  # fixed steps end at t = 1 - (1 - k/N)^time_power (1: evenly spaced)

    def __post_init__(self):
        if self.solver not in ("heun", "euler", "tsit5"):
            raise ValueError(f"SamplerConfig: unknown solver {self.solver!r}; use 'heun', 'euler' or 'tsit5'")
        if self.num_steps < 1 or not self.time_power > 0:
            raise ValueError(f"SamplerConfig: num_steps must be at least 1 and time_power positive, got "
                             f"num_steps={self.num_steps}, time_power={self.time_power}")

    def options(self) -> dict:
        if self.solver == "tsit5":
            return dict(solver=diffrax.Tsit5(), stepsize_controller=diffrax.PIDController(rtol=1e-4, atol=1e-4))
        solver = {"heun": diffrax.Heun(), "euler": diffrax.Euler()}[self.solver]
        return dict(solver=solver, stepsize_controller=diffrax.ConstantStepSize(), num_steps=self.num_steps,
                    time_power=self.time_power)


# The posterior network serves every site count up to `max_sites`, but data sets usually come with
# all of them (the estimator's `max_sites` defaults to the model's site count). Drawing the count
# uniformly gave the full count only 1/max_sites of the training; on Eight Schools (8 sites) the
# school effects' posterior means were then off NUTS's by 0.77 on average and SBC failed. Keeping
# all sites in half of the examples (the other half uniform) cut that to 0.30, and SBC passes.
ALL_SITES_FRACTION = 0.5


# Hierarchical locals (θⱼ ~ Normal(μ, τ)) make the joint posterior a funnel: θⱼ − μ spans orders
# of magnitude as τ does, and with a heavy-tailed τ prior the θⱼ themselves are heavy-tailed. In
# the non-centred coordinates uⱼ = (θⱼ − μ) / τ the prior is a standard normal whatever μ and τ
# are (the cure MCMC uses too, `likelihood.from_noncentred`); the posterior network works in them
# and the exact map back carries its log-Jacobian.
NONCENTRED = True


# Surrogates trained on the same simulations from different initialisations disagree, and the
# posterior inherits the bias of the one it is built on. On Eight Schools (B = 2,000), the mean of
# y - θ in the bulk of the prior in units of the noise sd (0 is exact) came out between -0.25 and
# +0.15 for single members, and -0.07 to +0.05 for the average of four. With four members the
# school effects' posterior means were 0.11-0.50 from NUTS's at three training seeds (one member:
# 0.28-0.34) and `hierdsl check` passed at two of them (one member: one). Each member costs one
# more surrogate training (9-14 s of the Eight Schools main job's 336 s: members share the compiled
# step); synthesis costs about the same.
SURROGATES = 4


@dataclass(frozen=True)
class PreconditionerConfig:
    """Size and optimisation of the `Preconditioner`: Adam with a cosine-decayed step on the
    beta-NLL (the Gaussian negative log-likelihood, each term weighted by scale^(2 beta)) of random
    minibatches, starting from the linear fit (`linear_start`) or the identity, and keeping the
    parameters with the best validation NLL (checked every `check_every` steps on the held-out
    `validation_fraction` of the simulations)."""

    width: int = 128
    depth: int = 3
    steps: int = 3000
    batch_size: int = 256
    learning_rate: float = 3e-3
    validation_fraction: float = 0.1
    check_every: int = 25
    beta: float = 0.5
    linear_start: bool = True


# The `GlobalsPreconditioner`'s size and optimisation (`LF.globals_preconditioner`): batches are
# data sets, each with its random site subset, so fewer of them; it starts from the identity (the
# prior's standardisation), so `linear_start` is not read.
GLOBALS_PRECONDITIONER = PreconditionerConfig(width=64, depth=2, steps=2000, batch_size=64)


# The surrogate learns q(y | globals, locals, inputs) with y standardised by its spread over the
# prior, against which a likelihood can be narrow: on Gaussian Linear (B = 5,000; 1.4 wide over
# the prior) x | mu, sigma at sigma = 0.1 is 0.07 standardised units wide, and the four trained
# members' draws there came out 1.06-2.59 times too wide and biased by up to 0.6 sigma, at sigma =
# 0.03 2.8-7.1 times and up to 5.6 sigma, with 16 or 64 flow steps alike: the network, not the
# integration; on SIR (B = 2,000, one member) the counts' draws at fixed (beta, gamma) were 0.9-7.1
# times as wide as the simulator's (median 1.8) and up to 2.2 sds off. So the surrogate's flow
# works in preconditioned observations, z = (y - loc(c)) / scale(c), c the standardised
# conditioning tokens (globals, the site's locals and inputs). `precondition="network"` (the
# default): loc and log scale are a `Preconditioner`, a linear map plus an MLP, fitted to the
# simulations before the flow, starting from the linear fit below, by beta-NLL (beta = 0.5; plain
# Gaussian NLL lets a large fitted scale starve the location of gradient where the mean is steep,
# and left SIR's fast epidemics with fitted scales up to 13 times too large). With it SIR's draws are
# 0.88-1.18 times as wide as the simulator's (median 1.03) and at most 0.56 sds off (median 0.16).
# `precondition="linear"`: loc and log scale linear in c, fitted by iteratively reweighted least
# squares, exact where the likelihood is a location-scale family in c (Gaussian Linear: draws
# 0.94-1.10 times as wide, within 0.15 sigma, at every sigma from 0.03 to 1) but far off where the
# location is not linear (SIR: draws up to 7.5 times too wide, 5.9 sds off). The network starts
# from it, so it keeps Gaussian Linear's exact whitening. The posterior network never sees z: its
# tokens go through `posterior_normaliser`, which drops the preconditioning.
PRECONDITION: Optional[str] = "network"
PRECONDITION_KINDS = (None, "network", "linear")


def _check_fraction(value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"all_sites_fraction must be between 0 and 1, got {value!r}")


@dataclass(frozen=True)
class LF:
    """Likelihood-factorised training (the default strategy).

    Arguments:
        surrogate, posterior: network sizes.
        surrogate_training, posterior_training: optimisation settings.
        num_synthetic: synthetic multi-site data sets drawn from the surrogate for the posterior
            (free: they cost no simulator calls). None: `max(2000, 2 * budget)`, capped by memory.
        min_sites: the smallest site count the posterior is trained for (it serves any count from
            `min_sites` to the estimator's `max_sites`).
        all_sites_fraction: the share of the posterior network's training examples that keep all
            `max_sites` sites; the others keep a uniformly drawn count from `min_sites` up (see
            `ALL_SITES_FRACTION`).
        sampler: how the surrogate is integrated when assembling synthetic data.
        surrogates: the number of surrogate networks trained on the simulations, from different
            initialisations; each synthetic site is drawn by one of them (see `SURROGATES`).
        noncentred: the posterior network sees each hierarchical local (a Normal or LogNormal
            local whose location or scale reads a global, `likelihood.hierarchical_locals`)
            standardised by its prior, `(z - loc) / scale`, instead of `z` (see `NONCENTRED`).
        precondition: None, or how the surrogate's flow sees the observations: "network", as
            residuals standardised by a location and scale network fitted first to the simulations,
            or "linear", by a location and log scale linear in the conditioning tokens (see
            `PRECONDITION`). True means "network", False None.
        preconditioner: the size and training of the "network" preconditioner (and of the
            posterior's, with `posterior_precondition`).
        posterior_precondition: the posterior network sees each site's locals as residuals of
            a regression on the globals and the site's own data (see `PosteriorPreconditioner`).
        globals_precondition: the posterior network sees the globals as residuals of a
            regression on all the sites' data (see `GlobalsPreconditioner`).
        globals_preconditioner: its size and training.
    """

    surrogate: NetworkConfig = NetworkConfig()
    posterior: NetworkConfig = NetworkConfig()
    surrogate_training: TrainConfig = TrainConfig()
    posterior_training: TrainConfig = POSTERIOR_TRAINING
    num_synthetic: Optional[int] = None
    min_sites: int = 1
    all_sites_fraction: float = ALL_SITES_FRACTION
    sampler: SamplerConfig = SamplerConfig()
    noncentred: bool = NONCENTRED
    surrogates: int = SURROGATES
    precondition: Optional[str] = PRECONDITION
    preconditioner: PreconditionerConfig = PreconditionerConfig()
    posterior_precondition: bool = False
    globals_precondition: bool = False
    globals_preconditioner: PreconditionerConfig = GLOBALS_PRECONDITIONER

    def __post_init__(self):
        _check_fraction(self.all_sites_fraction)
        if isinstance(self.precondition, bool):
            object.__setattr__(self, "precondition", "network" if self.precondition else None)
        if self.precondition not in PRECONDITION_KINDS:
            raise ValueError(f"precondition must be one of {PRECONDITION_KINDS}, got {self.precondition!r}")
        if self.surrogates < 1:
            raise ValueError(f"surrogates (the ensemble size) must be at least 1, got {self.surrogates!r}")

    name = "lf"


@dataclass(frozen=True)
class Direct:
    """The baseline: the same posterior network trained on `budget // max_sites` full simulations."""

    posterior: NetworkConfig = NetworkConfig()
    posterior_training: TrainConfig = POSTERIOR_TRAINING
    min_sites: int = 1
    all_sites_fraction: float = ALL_SITES_FRACTION
    noncentred: bool = NONCENTRED
    posterior_precondition: bool = False  # as `LF.posterior_precondition`, fitted to the simulations
    preconditioner: PreconditionerConfig = PreconditionerConfig()
    globals_precondition: bool = False  # as `LF.globals_precondition`, fitted to the simulations
    globals_preconditioner: PreconditionerConfig = GLOBALS_PRECONDITIONER

    name = "direct"

    def __post_init__(self):
        _check_fraction(self.all_sites_fraction)


# ----------------------------------------------------------------------------- normalisation


# A token whose sample kurtosis exceeds this is heavy-tailed (a Gaussian has 3; among the bundled
# examples the largest otherwise is 22, SIR's early-day counts; Eight Schools' school effects and
# scores, with a half-Cauchy spread, have 180-190). Its standard deviation is set by a few extreme
# values, so standardising by it squeezes the bulk into a sliver and lets those values dominate
# the squared-error loss: on Eight Schools the surrogate came out biased by 0.2-0.4 of the noise sd
# in the bulk, and 2 of 8 trainings failed outright (bias -1 to -3 sd, 4-19 times too wide).
HEAVY_TAIL_KURTOSIS = 50.0


PRECONDITION_LOG_SCALE = (-7.0, 3.0)  # the preconditioner's log scale is clipped to this range


class Normaliser(eqx.Module):
    """Per-token standardisation of `Tokens` (the same per-site statistics at every site).

    Most tokens are standardised affinely, `z = (x - mean) / scale`. Heavy-tailed tokens (sample
    kurtosis above `HEAVY_TAIL_KURTOSIS`; `global_squash` / `site_squash` are 1 for them) are
    centred on their median, scaled by their robust sd (IQR / 1.349) and squashed,
    `z = asinh((x - median) / scale)`: linear in the bulk, logarithmic in the tails, and a smooth
    bijection, so flows in z are flows in x with the Jacobian `target_log_jacobian` accounts for.

    With `observed` (per-site positions of the observation tokens; `fit(..., observed=...)`), those
    tokens are then preconditioned, `(z - loc) / exp(log_scale)`, where loc and log_scale are
    functions of each site's standardised features (the globals, the site's other tokens and a
    constant): a `Preconditioner` network (`observed_net`), or linear (`observed_loc`,
    `observed_log_scale`). Only the surrogate's tokens are; see `PRECONDITION` and
    `without_preconditioning`.
    """

    global_mean: Float[Array, " globals"]
    global_scale: Float[Array, " globals"]
    site_mean: Float[Array, " tokens"]
    site_scale: Float[Array, " tokens"]
    coord_mean: Float[Array, " coords"]
    coord_scale: Float[Array, " coords"]
    global_squash: Float[Array, " globals"]
    site_squash: Float[Array, " tokens"]
    observed_loc: Optional[Float[Array, "features observed"]] = None
    observed_log_scale: Optional[Float[Array, "features observed"]] = None
    observed: tuple[int, ...] = eqx.field(static=True, default=())
    observed_net: Optional["Preconditioner"] = None
    # None: the preconditioning reads the globals and the site's other tokens (the surrogate's);
    # a tuple: the globals and only these site tokens (the posterior's, `PosteriorPreconditioner`).
    feature_tokens: Optional[tuple[int, ...]] = eqx.field(static=True, default=None)
    # The posterior's globals as residuals given all real sites' data (`GlobalsPreconditioner`).
    globals_net: Optional["GlobalsPreconditioner"] = None

    @staticmethod
    def fit(tokens: Tokens, observed: tuple[int, ...] = (), precondition: str = "network",
            key: Optional[PRNGKeyArray] = None,
            config: PreconditionerConfig = PreconditionerConfig()) -> "Normaliser":
        """Statistics of a batch of tokens (leading batch axis), over real sites only; with
        `observed` (per-site token positions), also their preconditioning of kind `precondition`
        ("network" or "linear"; see `PRECONDITION`), the network's (`config`) initialisation,
        validation split and minibatches drawn with `key`."""
        def moments(values, weights, axes):
            count = jnp.maximum(weights.sum(axes), 1.0)
            mean = (values * weights).sum(axes) / count
            var = (((values - mean) ** 2) * weights).sum(axes) / count
            # Constant tokens (e.g. a fixed design) keep scale 1 so they pass through unchanged.
            return mean, jnp.where(var > 1e-12, jnp.sqrt(var), 1.0)

        g_mean, g_scale = moments(tokens.global_values, jnp.ones_like(tokens.global_values), 0)
        site_w = jnp.broadcast_to(tokens.site_mask[..., None], tokens.site_values.shape)
        s_mean, s_scale = moments(tokens.site_values, site_w, (0, 1))
        flat = (int(np.prod(tokens.site_coords.shape[:-1])), tokens.site_coords.shape[-1])
        coords = tokens.site_coords.reshape(flat)
        coord_w = jnp.broadcast_to(tokens.site_mask[..., None, None], tokens.site_coords.shape).reshape(flat)
        c_mean, c_scale = moments(coords, coord_w, 0)
        g_mean, g_scale, g_squash = _heavy_tails(np.asarray(tokens.global_values), g_mean, g_scale)
        real = np.asarray(tokens.site_mask) > 0
        site_values = np.asarray(tokens.site_values)[real]  # (real sites, tokens)
        s_mean, s_scale, s_squash = _heavy_tails(site_values, s_mean, s_scale)
        base = Normaliser(g_mean, g_scale, s_mean, s_scale, c_mean, c_scale, g_squash, s_squash)
        if not observed:
            return base
        observed = tuple(int(i) for i in observed)
        if precondition == "linear":
            return base._preconditioned(tokens, observed)
        if precondition != "network":
            raise ValueError(f"precondition must be 'network' or 'linear', got {precondition!r}")
        return base._network_preconditioned(tokens, observed, jr.key(0) if key is None else key, config)

    def _standard_features(self, tokens: Tokens, observed: tuple[int, ...]):
        """The real sites' features (`_features`) and observation tokens, standardised."""
        standard = self.forward(tokens)
        real = np.asarray(tokens.site_mask).reshape(-1) > 0
        features = _features(standard.global_values, standard.site_values, observed)
        features = np.asarray(features).reshape(-1, features.shape[-1])[real]
        values = np.asarray(standard.site_values).reshape(-1, standard.site_values.shape[-1])[real][:, list(observed)]
        return features, values

    def _network_preconditioned(self, tokens: Tokens, observed: tuple[int, ...], key: PRNGKeyArray,
                                config: PreconditionerConfig) -> "Normaliser":
        """This normaliser with the observed tokens preconditioned by a `Preconditioner` network
        fitted to `tokens` (batch) by `fit_preconditioner`, from the linear fit (`_preconditioned`)
        where `config.linear_start`."""
        features, values = self._standard_features(tokens, observed)
        start = self._preconditioned(tokens, observed) if config.linear_start else None
        linear = None if start is None else jnp.concatenate([start.observed_loc, start.observed_log_scale], axis=1)
        net = fit_preconditioner(jnp.asarray(features[:, :-1]), jnp.asarray(values), key, config, linear)
        return dataclasses.replace(self, observed=observed, observed_net=net)

    def _preconditioned(self, tokens: Tokens, observed: tuple[int, ...]) -> "Normaliser":
        """This normaliser with the observed tokens preconditioned, fitted to `tokens` (batch).

        Least squares in the standardised tokens: the observations' location on the features
        (`_features`), then their log scale from log |residual| (+0.635, the mean of log |N(0, 1)|
        subtracted back), three times over with the location weighted by 1 / scale², and a last
        factor per observation that makes the preconditioned residuals' robust sd (IQR / 1.349) one."""
        features, values = (np.asarray(a, np.float64) for a in self._standard_features(tokens, observed))
        # Iteratively reweighted: the location refitted with weights 1 / scale², per observation,
        # so that where the likelihood is narrow its location is not set by the noise of the wide.
        weights = np.ones_like(values)
        for _ in range(3):
            loc = np.stack([np.linalg.lstsq(features * np.sqrt(w)[:, None], values[:, k] * np.sqrt(w), rcond=None)[0]
                            for k, w in enumerate(weights.T)], axis=1)
            residual = values - features @ loc
            log_scale = np.linalg.lstsq(features, np.log(np.abs(residual) + 1e-6) + 0.635, rcond=None)[0]
            scale = np.exp(np.clip(features @ log_scale, *PRECONDITION_LOG_SCALE))
            weights = 1.0 / scale**2
        z = residual / scale
        q1, q3 = np.quantile(z, [0.25, 0.75], axis=0)
        log_scale[-1] += np.log(np.maximum((q3 - q1) / 1.349, 1e-6))  # the last feature is the constant
        return dataclasses.replace(self, observed_loc=jnp.asarray(loc, jnp.float32),
                                   observed_log_scale=jnp.asarray(log_scale, jnp.float32), observed=observed)

    def without_preconditioning(self) -> "Normaliser":
        """The same standardisation with the observations left as they are (the posterior's view)."""
        return dataclasses.replace(self, observed_loc=None, observed_log_scale=None, observed=(), observed_net=None,
                                   feature_tokens=None, globals_net=None)

    def _loc_log_scale(self, global_values, site_values):
        """The observed tokens' location and log scale at each site, from the standardised tokens."""
        if self.feature_tokens is None:
            features = _features(global_values, site_values, self.observed)
        else:
            features = _token_features(global_values, site_values, self.feature_tokens)
        if self.observed_net is not None:
            loc, log_scale = self.observed_net(features[..., :-1])
        else:
            loc, log_scale = features @ self.observed_loc, features @ self.observed_log_scale
        return loc, jnp.clip(log_scale, *PRECONDITION_LOG_SCALE)

    def _unprecondition(self, tokens: Tokens):
        """Normalised site tokens with the observations' preconditioning undone, and its log scale
        per site token (zero where nothing is preconditioned)."""
        site_values = tokens.site_values
        log_jacobian = jnp.zeros_like(site_values)
        if self.observed:
            # The features are conditioning tokens, which the preconditioning leaves unchanged.
            loc, log_scale = self._loc_log_scale(tokens.global_values, site_values)
            index = np.asarray(self.observed)
            log_jacobian = log_jacobian.at[..., index].set(log_scale)
            site_values = site_values.at[..., index].set(site_values[..., index] * jnp.exp(log_scale) + loc)
        return site_values, log_jacobian

    def precondition(self, global_values, site_values):
        """Standardised site tokens with the preconditioned ones replaced by their residuals (the
        last step of `forward`)."""
        if self.observed:
            loc, log_scale = self._loc_log_scale(global_values, site_values)
            index = np.asarray(self.observed)
            site_values = site_values.at[..., index].set((site_values[..., index] - loc) * jnp.exp(-log_scale))
        return site_values

    def forward(self, tokens: Tokens) -> Tokens:
        mask = tokens.site_mask[..., None]
        global_values = _squash((tokens.global_values - self.global_mean) / self.global_scale, self.global_squash)
        site_values = self.precondition(global_values,
                                        _squash((tokens.site_values - self.site_mean) / self.site_scale, self.site_squash))
        out = Tokens(
            global_values,
            site_values * mask,
            (tokens.site_coords - self.coord_mean) / self.coord_scale * mask[..., None],
            tokens.site_mask,
        )
        return out if self.globals_net is None else self.globals_net.precondition(out)

    def _unprecondition_globals(self, tokens: Tokens) -> tuple[Tokens, Float[Array, "... globals"]]:
        """Normalised tokens with the globals' preconditioning undone, and its log scale per global
        token (zero without it)."""
        if self.globals_net is None:
            return tokens, jnp.zeros_like(tokens.global_values)
        global_values, log_scale = self.globals_net.unprecondition(tokens)
        return dataclasses.replace(tokens, global_values=global_values), log_scale

    def inverse(self, tokens: Tokens) -> Tokens:
        mask = tokens.site_mask[..., None]
        tokens, _ = self._unprecondition_globals(tokens)  # the locals' preconditioning reads these globals
        site_values, _ = self._unprecondition(tokens)
        return Tokens(
            _unsquash(tokens.global_values, self.global_squash) * self.global_scale + self.global_mean,
            (_unsquash(site_values, self.site_squash) * self.site_scale + self.site_mean) * mask,
            (tokens.site_coords * self.coord_scale + self.coord_mean) * mask[..., None],
            tokens.site_mask,
        )

    def target_log_jacobian(self, split: TokenSplit, tokens: Tokens) -> Float[Array, ""]:
        """log |d x / d z| summed over the real target entries of one example's normalised
        `tokens`: the log-Jacobian of `inverse` (log scale, plus log cosh where squashed, plus the
        preconditioning's log scales)."""
        tokens, global_log_jacobian = self._unprecondition_globals(tokens)
        site_values, log_jacobian = self._unprecondition(tokens)
        g = (jnp.log(self.global_scale) + self.global_squash * _log_cosh(tokens.global_values) + global_log_jacobian
             ) * split.global_target
        s = (jnp.log(self.site_scale) + self.site_squash * _log_cosh(site_values) + log_jacobian) * split.site_target
        return jnp.sum(g) + jnp.sum(s * tokens.site_mask[:, None])


def _features(global_values, site_values, observed: tuple[int, ...]):
    """Per site: the global tokens, the site's other tokens and a constant (the last feature)."""
    conditioning = np.setdiff1d(np.arange(site_values.shape[-1]), np.asarray(observed, int))
    return _token_features(global_values, site_values, tuple(int(i) for i in conditioning))


def _token_features(global_values, site_values, tokens: tuple[int, ...]):
    """Per site: the global tokens, the site's tokens at positions `tokens` and a constant (the last feature)."""
    shape = site_values.shape[:-1]
    return jnp.concatenate([jnp.broadcast_to(global_values[..., None, :], (*shape, global_values.shape[-1])),
                            site_values[..., list(tokens)], jnp.ones((*shape, 1), site_values.dtype)], axis=-1)


class Preconditioner(eqx.Module):
    """The observation tokens' location and log scale at a site, as a function of its features f
    (`_features` without the constant): `[f, 1] @ linear + mlp(f)`, with `2 * observations` outputs
    (the locations, then the log scales)."""

    linear: Float[Array, "features_1 outputs"]
    mlp: eqx.nn.MLP
    observations: int = eqx.field(static=True)

    def __init__(self, features: int, observations: int, width: int, depth: int, key: PRNGKeyArray,
                 linear: Optional[Float[Array, "features_1 outputs"]] = None):
        mlp = eqx.nn.MLP(features, 2 * observations, width, depth, activation=jax.nn.gelu, key=key)
        # Zero output layer: the fit starts from the linear part alone.
        last = mlp.layers[-1]
        self.mlp = eqx.tree_at(lambda m: (m.layers[-1].weight, m.layers[-1].bias), mlp,
                               (jnp.zeros_like(last.weight), jnp.zeros_like(last.bias)))
        self.linear = jnp.zeros((features + 1, 2 * observations), jnp.float32) if linear is None else linear
        self.observations = observations

    def __call__(self, features: Float[Array, "... features"]):
        flat = features.reshape(-1, features.shape[-1])
        ones = jnp.ones((flat.shape[0], 1), flat.dtype)
        out = jnp.concatenate([flat, ones], axis=1) @ self.linear + jax.vmap(self.mlp)(flat)
        out = out.reshape(*features.shape[:-1], 2 * self.observations)
        return out[..., :self.observations], out[..., self.observations:]


def fit_preconditioner(features: Float[Array, "n features"], values: Float[Array, "n observations"],
                       key: PRNGKeyArray, config: PreconditionerConfig = PreconditionerConfig(),
                       linear: Optional[Float[Array, "features_1 outputs"]] = None) -> Preconditioner:
    """A `Preconditioner` fitted to `values` (standardised observation tokens) given `features`
    as each observation token ~ N(loc(features), exp(log_scale)²), by the beta-NLL of `config`,
    starting from `linear` (its linear part; None: zero, the identity). All steps run in one
    compiled `lax.scan`."""
    k_init, k_split, k_batches = jr.split(key, 3)
    net = Preconditioner(features.shape[-1], values.shape[-1], config.width, config.depth, k_init, linear)
    num = features.shape[0]
    num_val = min(max(1, int(round(config.validation_fraction * num))), num - 1) if num > 1 else 0
    order = jr.permutation(k_split, num)
    train_idx, val_idx = (order[num_val:], order[:num_val]) if num_val else (order, order)
    checks = max(1, -(-config.steps // config.check_every))
    params, static = eqx.partition(net, eqx.is_inexact_array)
    optimiser = optax.adam(optax.cosine_decay_schedule(config.learning_rate, checks * config.check_every))
    best = _fit_preconditioner(params, static, optimiser, (checks, config.check_every, min(config.batch_size, len(train_idx)), config.beta),
                               features[train_idx], values[train_idx], features[val_idx], values[val_idx], k_batches)
    return eqx.combine(best, static)


def _beta_nll(loc, log_scale, values, beta):
    log_scale = jnp.clip(log_scale, *PRECONDITION_LOG_SCALE)
    nll = log_scale + 0.5 * ((values - loc) * jnp.exp(-log_scale)) ** 2
    # beta-NLL: each term weighted by scale^(2 beta), held constant, so that where the scale is
    # large the location still gets the gradient it would under squared error (beta = 1).
    return jnp.mean(jax.lax.stop_gradient(jnp.exp(2.0 * beta * log_scale)) * nll)


def _preconditioner_loss(params, static, features, values, beta=0.0):
    return _beta_nll(*eqx.combine(params, static)(features), values, beta)


def _best_of_steps(params, optimiser, grads, val_loss, key, checks: int, every: int):
    """`checks * every` optimiser steps with `grads(params, key)`, keeping the parameters with the
    lowest `val_loss(params)`, checked every `every` steps (and at the start); one `lax.scan`."""
    def step(carry, key):
        params, state = carry
        updates, state = optimiser.update(grads(params, key), state, params)
        return (optax.apply_updates(params, updates), state), None

    def check(carry, key):
        params, state, best, best_loss = carry
        (params, state), _ = jax.lax.scan(step, (params, state), jr.split(key, every))
        loss = val_loss(params)
        better = loss < best_loss
        best = jax.tree.map(lambda new, old: jnp.where(better, new, old), params, best)
        return (params, state, best, jnp.where(better, loss, best_loss)), None

    start = (params, optimiser.init(params), params, val_loss(params))
    (_, _, best, _), _ = jax.lax.scan(check, start, jr.split(key, checks))
    return best


@eqx.filter_jit
def _fit_preconditioner(params, static, optimiser, shape, features, values, val_features, val_values, key):
    checks, every, batch, beta = shape

    def grads(params, key):
        idx = jr.randint(key, (batch,), 0, features.shape[0])
        return jax.grad(_preconditioner_loss)(params, static, features[idx], values[idx], beta)

    return _best_of_steps(params, optimiser, grads, lambda p: _preconditioner_loss(p, static, val_features, val_values),
                          key, checks, every)


def _heavy_tails(values: np.ndarray, mean, scale):
    """Per column of `values` (rows: draws): median, robust sd and squash flag 1.0 for the
    heavy-tailed columns (see `HEAVY_TAIL_KURTOSIS`); the given mean and scale for the others."""
    mean, scale = np.array(mean, np.float32), np.array(scale, np.float32)
    squash = np.zeros(values.shape[1:], np.float32)
    if values.shape[0] >= 2:
        centred = values - values.mean(axis=0)
        var = np.mean(centred**2, axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            kurtosis = np.where(var > 1e-12, np.mean(centred**4, axis=0) / var**2, 0.0)
        q1, median, q3 = np.quantile(values, [0.25, 0.5, 0.75], axis=0)
        robust = (q3 - q1) / 1.349
        heavy = (kurtosis > HEAVY_TAIL_KURTOSIS) & (robust > 1e-6 * np.maximum(np.sqrt(var), 1e-30))
        mean = np.where(heavy, median, mean).astype(np.float32)
        scale = np.where(heavy, robust, scale).astype(np.float32)
        squash = heavy.astype(np.float32)
    return jnp.asarray(mean), jnp.asarray(scale), jnp.asarray(squash)


def _squash(z, squash):
    return jnp.where(squash > 0, jnp.arcsinh(z), z)


def _unsquash(z, squash):
    return jnp.where(squash > 0, jnp.sinh(z), z)


def _log_cosh(z):
    # log cosh z = |z| + log1p(exp(-2|z|)) - log 2, exact without overflow.
    a = jnp.abs(z)
    return a + jnp.log1p(jnp.exp(-2.0 * a)) - jnp.log(2.0)


def posterior_normaliser(normaliser: Normaliser, layout: TokenLayout, noncentred: tuple[str, ...],
                         preconditioner: Optional["PosteriorPreconditioner"] = None,
                         globals_preconditioner: Optional["GlobalsPreconditioner"] = None) -> Normaliser:
    """The normaliser of the posterior network's tokens: `normaliser`, except that the tokens of
    the non-centred locals, standard normal under the prior, pass through (mean 0, scale 1), and the
    observations are not preconditioned (that depends on the parameters, the posterior's targets).
    With `preconditioner`, the centred locals' tokens are its residuals instead; with
    `globals_preconditioner`, the globals' tokens are its."""
    normaliser = normaliser.without_preconditioning()
    if noncentred:
        index = np.concatenate([np.arange(layout.tokens_per_site)[layout.slot(name).tokens] for name in noncentred])
        normaliser = dataclasses.replace(normaliser, site_mean=normaliser.site_mean.at[index].set(0.0),
                                         site_scale=normaliser.site_scale.at[index].set(1.0),
                                         site_squash=normaliser.site_squash.at[index].set(0.0))
    if preconditioner is not None:
        normaliser = dataclasses.replace(normaliser, observed=preconditioner.targets, observed_net=preconditioner.net,
                                         feature_tokens=preconditioner.features)
    if globals_preconditioner is not None:
        normaliser = dataclasses.replace(normaliser, globals_net=globals_preconditioner)
    return normaliser


# The posterior network's flow starts from a standard normal and contracts it onto the posterior.
# Where that is a tiny part of the prior it stays too wide at the default training length: SIR's
# betas have posterior sds of 0.01-0.03 in the prior's standardised units, and the 3-site
# estimator's came out a median 1.9 times too wide, up to 5.8 (docs/benchmark.md, "Where SIR's
# excess width comes from"), with the surrogate ruled out as the cause. `posterior_precondition`
# (off by default) gives the flow each site's locals as residuals, z = (u - loc(g, d)) / scale(g, d),
# of a regression on the globals g and the site's own data d (observations and inputs), all
# standardised: a `Preconditioner` fitted by beta-NLL to the synthetic pool's sites (the
# simulations, for direct) before the flow trains, from a linear least-squares start. The map is
# triangular (a site's locals read the globals, never the other way round, and no local reads
# another), so its log-Jacobian is the sum of the log scales, which `Normaliser.target_log_jacobian`
# includes; sampling undoes it with the globals the flow drew.
class PosteriorPreconditioner(eqx.Module):
    """Location and log scale of a site's centred local tokens (`targets`) given its data tokens
    (`features`), for the posterior network's tokens (see `posterior_normaliser`)."""

    net: "Preconditioner"
    targets: tuple[int, ...] = eqx.field(static=True)
    features: tuple[int, ...] = eqx.field(static=True)

    def residual_scale(self, tokens: Tokens, max_sites: int = 100_000) -> float:
        """The median of the fitted scales over the real sites of `tokens` (normalised posterior
        tokens, before preconditioning) and the locals: how narrow, as a share of their prior's
        width, the locals are given the globals and their site's data. At most `max_sites` real
        sites are read (the first data sets' that hold them)."""
        real_so_far = np.cumsum((np.asarray(tokens.site_mask) > 0).sum(axis=-1))  # per data set, cumulative
        first = jax.tree.map(lambda a: a[:int(np.searchsorted(real_so_far, max_sites)) + 1], tokens)
        _, log_scale = self.net(jnp.asarray(_real_site_features(first, self.features)[:max_sites], jnp.float32))
        return float(np.median(np.exp(np.asarray(log_scale))))


def posterior_precondition_tokens(layout: TokenLayout) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per-site token positions: the locals (preconditioned) and the data (read with the globals)."""
    positions = np.arange(layout.tokens_per_site)
    targets = tuple(int(i) for slot in layout.site_slots if slot.role == "local" for i in positions[slot.tokens])
    features = tuple(int(i) for slot in layout.site_slots if slot.role != "local" for i in positions[slot.tokens])
    return targets, features


def _real_site_features(tokens: Tokens, features: tuple[int, ...]) -> np.ndarray:
    """The `PosteriorPreconditioner`'s inputs at every real site of `tokens` (leading batch axis),
    one row per site: the globals and the site's tokens at `features`."""
    real = np.asarray(tokens.site_mask).reshape(-1) > 0
    rows = np.asarray(_token_features(tokens.global_values, tokens.site_values, features), np.float64)
    return rows.reshape(-1, rows.shape[-1])[real][:, :-1]


def fit_posterior_preconditioner(tokens: Tokens, layout: TokenLayout, key: PRNGKeyArray,
                                 config: PreconditionerConfig) -> Optional[PosteriorPreconditioner]:
    """A `PosteriorPreconditioner` fitted to the real sites of `tokens` (the posterior's
    normalised tokens, leading batch axis); None where the sites have no locals."""
    targets, features = posterior_precondition_tokens(layout)
    if not targets:
        return None
    real = np.asarray(tokens.site_mask).reshape(-1) > 0
    x = _real_site_features(tokens, features)
    y = np.asarray(tokens.site_values, np.float64).reshape(-1, tokens.site_values.shape[-1])[real][:, list(targets)]
    # The linear start: least-squares location, constant log scale at the residuals' sd.
    design = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
    loc = np.linalg.lstsq(design, y, rcond=None)[0]
    log_scale = np.zeros_like(loc)
    log_scale[-1] = np.log(np.maximum((y - design @ loc).std(axis=0), 1e-6))
    linear = jnp.asarray(np.concatenate([loc, log_scale], axis=1), jnp.float32)
    net = fit_preconditioner(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), key, config,
                             linear if config.linear_start else None)
    return PosteriorPreconditioner(net, targets, features)


@eqx.filter_jit
def _precondition_chunk(normaliser: Normaliser, tokens: Tokens) -> Tokens:
    site_values = normaliser.precondition(tokens.global_values, tokens.site_values) * tokens.site_mask[..., None]
    return dataclasses.replace(tokens, site_values=site_values)


def precondition_tokens(normaliser: Normaliser, tokens: Tokens, chunk: int = 1024) -> Tokens:
    """Normalised posterior tokens (from the normaliser without the posterior preconditioner) →
    the same with `normaliser`'s preconditioning applied, in chunks of `chunk` data sets."""
    num = tokens.site_mask.shape[0]
    parts = [_precondition_chunk(normaliser, jax.tree.map(lambda a: a[i:i + chunk], tokens))
             for i in range(0, num, chunk)]
    return jax.tree.map(lambda *a: jnp.concatenate(a), *parts)


# The posterior preconditioner above reads the globals, so the flow's error in them moves every
# site's locals: on 50-site SIR (cpu preset) it made the C2ST worse, 0.985 against 0.968, though it
# fixed the 10-site estimator's betas. `globals_precondition` (off by default) gives the flow the
# globals as residuals too, z = (g - loc(D)) / scale(D), of a regression on the data D of all the
# real sites: each site's data tokens (observations and inputs) go through an encoder MLP, their
# mean over the real sites and 1 / sqrt(number of sites) through a head MLP to the location and log
# scale of every global token (a permutation-invariant summary, as the posterior's, of any site
# count). It is fitted like the locals' preconditioner, to the synthetic pool (the simulations, for
# direct), but on the random site subsets the posterior trains on, and since the subset decides
# which data it reads it is applied to each training batch after its subset is drawn
# (`SiteSubsets`), not to the pool. The globals read no local, so with both preconditioners the map
# stays triangular: its log-Jacobian adds the globals' log scales (`Normaliser.target_log_jacobian`).
class GlobalsPreconditioner(eqx.Module):
    """Location and log scale of the standardised global tokens given every real site's tokens at
    `features` (its data: observations and inputs)."""

    encoder: eqx.nn.MLP
    head: eqx.nn.MLP
    features: tuple[int, ...] = eqx.field(static=True)

    def __init__(self, features: tuple[int, ...], num_globals: int, width: int, depth: int, key: PRNGKeyArray):
        k_encoder, k_head = jr.split(key)
        self.encoder = eqx.nn.MLP(len(features), width, width, depth, activation=jax.nn.gelu, key=k_encoder)
        head = eqx.nn.MLP(width + 1, 2 * num_globals, width, depth, activation=jax.nn.gelu, key=k_head)
        # Zero output layer: the fit starts from the identity (the prior's standardisation).
        last = head.layers[-1]
        self.head = eqx.tree_at(lambda m: (m.layers[-1].weight, m.layers[-1].bias), head,
                                (jnp.zeros_like(last.weight), jnp.zeros_like(last.bias)))
        self.features = tuple(int(i) for i in features)

    def __call__(self, site_values: Float[Array, "... sites tokens"], site_mask: Float[Array, "... sites"]):
        x = site_values[..., list(self.features)]
        h = jax.vmap(self.encoder)(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)
        count = jnp.maximum(site_mask.sum(-1, keepdims=True), 1.0)
        summary = jnp.concatenate([(h * site_mask[..., None]).sum(-2) / count, 1.0 / jnp.sqrt(count)], axis=-1)
        out = jax.vmap(self.head)(summary.reshape(-1, summary.shape[-1])).reshape(*summary.shape[:-1], -1)
        num_globals = out.shape[-1] // 2
        return out[..., :num_globals], jnp.clip(out[..., num_globals:], *PRECONDITION_LOG_SCALE)

    def precondition(self, tokens: Tokens) -> Tokens:
        """Normalised tokens → the same with the globals as residuals."""
        loc, log_scale = self(tokens.site_values, tokens.site_mask)
        return dataclasses.replace(tokens, global_values=(tokens.global_values - loc) * jnp.exp(-log_scale))

    def unprecondition(self, tokens: Tokens):
        """The inverse of `precondition`: the standardised globals, and their log scales."""
        loc, log_scale = self(tokens.site_values, tokens.site_mask)
        return tokens.global_values * jnp.exp(log_scale) + loc, log_scale

    def residual_scale(self, tokens: Tokens) -> float:
        """The median over `tokens`' data sets (all their real sites) and the globals of the fitted
        scale: how narrow, as a share of the prior's width, the globals are given the data."""
        _, log_scale = _globals_chunked(self, tokens)
        return float(np.median(np.exp(log_scale)))


@eqx.filter_jit
def _globals_loc_log_scale(net: GlobalsPreconditioner, tokens: Tokens):
    return net(tokens.site_values, tokens.site_mask)


def _globals_chunked(net: GlobalsPreconditioner, tokens: Tokens, chunk: int = 1024):
    parts = [_globals_loc_log_scale(net, jax.tree.map(lambda a: a[i:i + chunk], tokens))
             for i in range(0, tokens.site_mask.shape[0], chunk)]
    return tuple(np.concatenate([np.asarray(p[j]) for p in parts]) for j in range(2))


def site_subsets(tokens: Tokens, key: PRNGKeyArray, batch_size: int, min_sites: int,
                 all_sites_fraction: float) -> Tokens:
    """`batch_size` random data sets of `tokens` (leading pool axis), each with a random number of
    real sites, its first ones (the rest masked): `all_sites_fraction` of them keep every site, the
    others a count drawn uniformly from `min_sites` to all."""
    k_index, k_count, k_all = jr.split(key, 3)
    pool, max_sites = tokens.site_mask.shape
    index = jr.randint(k_index, (batch_size,), 0, pool)
    counts = jr.randint(k_count, (batch_size,), min_sites, max_sites + 1)
    counts = jnp.where(jr.uniform(k_all, (batch_size,)) < all_sites_fraction, max_sites, counts)
    site_mask = (jnp.arange(max_sites)[None, :] < counts[:, None]).astype(jnp.float32)
    chosen = jax.tree.map(lambda a: a[index], tokens)
    return Tokens(chosen.global_values, chosen.site_values * site_mask[..., None],
                  chosen.site_coords * site_mask[..., None, None], site_mask)


def fit_globals_preconditioner(tokens: Tokens, layout: TokenLayout, key: PRNGKeyArray,
                               config: PreconditionerConfig = GLOBALS_PRECONDITIONER, min_sites: int = 1,
                               all_sites_fraction: float = ALL_SITES_FRACTION) -> Optional[GlobalsPreconditioner]:
    """A `GlobalsPreconditioner` fitted to `tokens` (the posterior's normalised tokens, leading
    pool axis, every site real) on random site subsets drawn as the posterior's training batches
    are (`site_subsets`); None where the model has no globals or its sites no data."""
    _, features = posterior_precondition_tokens(layout)
    num_globals = tokens.global_values.shape[-1]
    if not num_globals or not features:
        return None
    k_init, k_split, k_val, k_steps = jr.split(key, 4)
    net = GlobalsPreconditioner(features, num_globals, config.width, config.depth, k_init)
    num = tokens.site_mask.shape[0]
    num_val = min(max(1, int(round(config.validation_fraction * num))), num - 1) if num > 1 else 0
    order = np.asarray(jr.permutation(k_split, num))
    train_part = jax.tree.map(lambda a: a[order[num_val:]], tokens)
    val_part = jax.tree.map(lambda a: a[order[:num_val] if num_val else order], tokens)
    validation = site_subsets(val_part, k_val, max(256, 4 * config.batch_size), min_sites, all_sites_fraction)
    checks = max(1, -(-config.steps // config.check_every))
    params, static = eqx.partition(net, eqx.is_inexact_array)
    optimiser = optax.adam(optax.cosine_decay_schedule(config.learning_rate, checks * config.check_every))
    best = _fit_globals(params, static, optimiser, (checks, config.check_every, config.batch_size, config.beta,
                                                    min_sites, all_sites_fraction), train_part, validation, k_steps)
    return eqx.combine(best, static)


def _globals_loss(params, static, tokens: Tokens, beta=0.0):
    return _beta_nll(*eqx.combine(params, static)(tokens.site_values, tokens.site_mask), tokens.global_values, beta)


@eqx.filter_jit
def _fit_globals(params, static, optimiser, shape, tokens, validation, key):
    checks, every, batch, beta, min_sites, all_sites_fraction = shape

    def grads(params, key):
        subsets = site_subsets(tokens, key, batch, min_sites, all_sites_fraction)
        return jax.grad(_globals_loss)(params, static, subsets, beta)

    return _best_of_steps(params, optimiser, grads, lambda p: _globals_loss(p, static, validation), key, checks, every)


def noncentred_locals(lowered: LoweredModel, strategy) -> tuple[str, ...]:
    """The locals the posterior network of `strategy` sees non-centred."""
    return likelihood.hierarchical_locals(lowered.ir) if getattr(strategy, "noncentred", False) else ()


def _site_inputs(lowered: LoweredModel, values: Mapping[str, Array]) -> Values:
    return {v.name: values[v.name] for v in lowered.ir.inputs if v.name in values}


def noncentre(lowered: LoweredModel, z: Values, names: tuple[str, ...], site_mask: Float[Array, " sites"]) -> Values:
    """Flow values of one data set (`to_flow_values`) with the locals `names` non-centred; zero at
    padded sites (their location and scale may be anything)."""
    if not names:
        return z
    num_sites = site_mask.shape[0]
    u = likelihood.noncentre(lowered, z, _site_inputs(lowered, z), names, num_sites)
    for name in names:
        real = site_mask.reshape(num_sites, *([1] * (u[name].ndim - 1))) > 0
        u[name] = jnp.where(real, u[name], 0.0)
    return u


def recentre(lowered: LoweredModel, u: Values, site_values: Mapping[str, Array], names: tuple[str, ...],
             site_mask: Float[Array, " sites"]) -> tuple[Values, Float[Array, ""]]:
    """The inverse of `noncentre`, with log |det ∂z/∂u| over the real sites."""
    if not names:
        return u, jnp.zeros((), jnp.float32)
    num_sites = site_mask.shape[0]
    z, log_det = likelihood.recentre(lowered, u, _site_inputs(lowered, site_values), names, num_sites)
    return z, jnp.sum(jnp.where(site_mask > 0, log_det, 0.0))


# ----------------------------------------------------------------------------- flow space


def to_flow_values(lowered: LoweredModel, values: Mapping[str, Array]) -> Values:
    """Model values of one data set (globals at shape, site values with a site axis) → flow space:
    parameters unconstrained, everything else unchanged, all as floats."""
    params = {name: values[name] for name in (*lowered.parameter_names, *lowered.prior_inputs)}
    z = lowered.to_unconstrained(params)
    out = {name: jnp.asarray(value, jnp.float32) for name, value in values.items()}
    out.update({name: jnp.asarray(z[name], jnp.float32) for name in lowered.parameter_names})
    return out


def from_flow_values(lowered: LoweredModel, z: Mapping[str, Array], site_values: Mapping[str, Array],
                     site_mask: Float[Array, " sites"]) -> tuple[Values, Float[Array, ""]]:
    """Unconstrained parameters (+ the sites' inputs) → constrained, with the log-Jacobian over
    real sites only (padded sites contribute nothing)."""
    ir = lowered.ir
    globals, log_det = lowered.globals_to_constrained({v.name: z[v.name] for v in ir.globals})

    def one_site(z_site):
        return lowered.site_to_constrained(globals, z_site)

    z_sites = {v.name: z[v.name] for v in ir.locals}
    z_sites.update({name: site_values[name] for name in lowered.prior_inputs})
    sites, site_log_det = jax.vmap(one_site)(z_sites)
    out = {v.name: globals[v.name] for v in ir.globals}
    out.update({v.name: sites[v.name] for v in ir.locals})
    return out, log_det + jnp.sum(site_log_det * site_mask)


def integer_observations(lowered: LoweredModel) -> tuple[str, ...]:
    return tuple(v.name for v in lowered.ir.observations if v.dtype in ("int", "bool"))


# ----------------------------------------------------------------------------- simulation


@dataclass
class SimulationCounter:
    """Counts single-site simulator calls (one per simulated site)."""

    calls: int = 0


def _chunks(total: int, size: int):
    for start in range(0, total, size):
        yield start, min(size, total - start)


def simulate_single_sites(lowered: LoweredModel, key: PRNGKeyArray, num: int, counter: SimulationCounter,
                          *, chunk: int = 2048, progress: Optional[Callable[[int, int], None]] = None) -> Values:
    """`num` single-site simulations: fresh globals, one site's inputs and locals, its observations.

    Returns values with a leading simulation axis; per-site values also have a site axis of 1.
    """
    size = min(chunk, num)

    def build():
        def one(k):
            kg, ks = jr.split(k)
            g = lowered.sample_globals(kg)
            s = lowered.sample_site(ks, g)
            return {**g, **{name: value[None] for name, value in s.items()}}
        return jax.jit(jax.vmap(one))

    batch = lowered.compiled_once("single_sites", build)
    keys = jr.split(key, num)
    parts = []
    # No padding of the last chunk: every simulation run is one the budget pays for (a shorter last
    # chunk compiles once more instead).
    for start, n in _chunks(num, size):
        parts.append(jax.tree.map(np.asarray, batch(keys[start:start + n])))
        counter.calls += n
        if progress:
            progress(start + n, num)
    sims = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    _check(lowered, sims)
    return sims


def full_simulator(lowered: LoweredModel, num_sites: int) -> Callable[[PRNGKeyArray], Values]:
    """`keys (num,) -> num` simulations of `num_sites` sites, compiled once per model and site count."""
    return lowered.compiled_once(("full", num_sites),
                                 lambda: jax.jit(jax.vmap(lambda k: lowered.simulate(k, num_sites))))


def simulate_full(lowered: LoweredModel, key: PRNGKeyArray, num: int, num_sites: int, counter: SimulationCounter,
                  *, progress: Optional[Callable[[int, int], None]] = None) -> Values:
    """`num` full simulations of `num_sites` sites each (`num * num_sites` simulator calls)."""
    size = max(1, min(num, 8192 // max(1, num_sites)))
    batch = full_simulator(lowered, num_sites)
    keys = jr.split(key, num)
    parts = []
    for start, n in _chunks(num, size):
        parts.append(jax.tree.map(np.asarray, batch(keys[start:start + n])))
        counter.calls += n * num_sites
        if progress:
            progress(start + n, num)
    sims = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    _check(lowered, sims)
    return sims


def _check(lowered: LoweredModel, sims: Values) -> None:
    observed = {v.name: sims[v.name] for v in lowered.ir.observations}
    params = {name: sims[name] for name in lowered.parameter_names}
    check_simulations(observed, params)


# ----------------------------------------------------------------------------- token data


def encode_batch(layout: TokenLayout, flow_values: Values, num_sites: int) -> Tokens:
    """Encode a batch of flow-space data sets (leading batch axis) into tokens."""
    names = set(layout.labels)
    values = {k: v for k, v in flow_values.items() if k in names}
    return jax.vmap(lambda v: layout.encode(v, num_sites))(values)


def flow_values_batch(lowered: LoweredModel, sims: Values, key: PRNGKeyArray, dequantise: bool = True) -> Values:
    """Model values with a leading batch axis → flow space (integer observations dequantised)."""
    to_flow = lowered.compiled_once("flow_values", lambda: jax.jit(jax.vmap(lambda v: to_flow_values(lowered, v))))
    out = to_flow(
        {k: jnp.asarray(v) for k, v in sims.items() if k in _token_names(lowered) or k in lowered.prior_inputs})
    if dequantise:
        for name in integer_observations(lowered):
            key, sub = jr.split(key)
            out[name] = out[name] + jr.uniform(sub, out[name].shape, minval=-0.5, maxval=0.5)
    return out


def _token_names(lowered: LoweredModel) -> set[str]:
    return {v.name for v in lowered.ir.variables if v.role in ("global", "local", "input", "observation")}


def flow_data(split: TokenSplit, layout: TokenLayout, tokens: Tokens) -> FlowData:
    """Normalised tokens (batch) → flow-matching examples: targets, context, mask."""
    x1 = jax.vmap(split.gather)(tokens.global_values, tokens.site_values)
    mask = jax.vmap(lambda m: target_mask(layout, split, m))(tokens.site_mask)
    return FlowData(x1, tokens, mask)


class SiteSubsets(eqx.Module):
    """A generator of posterior training batches from a pool of data sets: random data sets with a
    random number of real sites each (the rest masked), so one network serves every site count.
    A share `all_sites_fraction` of the examples keeps all sites; the others keep a count drawn
    uniformly from `min_sites` to `max_sites`."""

    tokens: Tokens  # normalised, (pool, max_sites, …)
    layout: TokenLayout = eqx.field(static=True)
    split: TokenSplit = eqx.field(static=True)
    batch_size: int = eqx.field(static=True)
    min_sites: int = eqx.field(static=True)
    all_sites_fraction: float = eqx.field(static=True, default=ALL_SITES_FRACTION)

    # With `LF.globals_precondition`: the globals become residuals given each example's real sites.
    globals_preconditioner: Optional[GlobalsPreconditioner] = None

    def __call__(self, key: PRNGKeyArray) -> FlowData:
        tokens = site_subsets(self.tokens, key, self.batch_size, self.min_sites, self.all_sites_fraction)
        if self.globals_preconditioner is not None:
            tokens = self.globals_preconditioner.precondition(tokens)
        return flow_data(self.split, self.layout, tokens)


# ----------------------------------------------------------------------------- the surrogate


def observed_tokens(layout: TokenLayout, lowered: LoweredModel) -> tuple[int, ...]:
    """The per-site token positions of the observations (the surrogate's targets)."""
    positions = np.arange(layout.tokens_per_site)
    return tuple(int(i) for v in lowered.ir.observations for i in positions[layout.slot(v.name).tokens])


def surrogate_split(layout: TokenLayout, lowered: LoweredModel) -> TokenSplit:
    return layout.split(target=tuple(v.name for v in lowered.ir.observations))


def posterior_split(layout: TokenLayout, lowered: LoweredModel) -> TokenSplit:
    return layout.split(target=lowered.parameter_names)


def sample_surrogate(network: TokenTransformer, split: TokenSplit, normaliser: Normaliser, lowered: LoweredModel,
                     contexts: Tokens, key: PRNGKeyArray, sampler: SamplerConfig) -> Tokens:
    """One surrogate draw of the observations for each single-site context (normalised tokens,
    leading batch axis). Returns normalised tokens with the observations filled in."""
    return _sample_sites(network, split, normaliser, lowered, contexts, jr.split(key, contexts.site_mask.shape[0]),
                         sampler)


def _sample_sites(network: TokenTransformer, split: TokenSplit, normaliser: Normaliser, lowered: LoweredModel,
                  contexts: Tokens, keys: PRNGKeyArray, sampler: SamplerConfig) -> Tokens:
    """`sample_surrogate` with one key per context."""
    vf = TokenVectorField(network, split)
    options = sampler.options()
    layout = split.layout

    def one(context, k):
        mask = target_mask(layout, split, context.site_mask)
        x = flow_sample(vf, context, mask, k, 1, **options)[0]
        filled = normaliser.inverse(split.scatter(context, x))
        filled = _round_integers(layout, lowered, filled)
        return normaliser.forward(filled)

    return jax.vmap(one)(contexts, keys)


def _round_integers(layout: TokenLayout, lowered: LoweredModel, tokens: Tokens) -> Tokens:
    """Surrogate draws of integer observations are rounded (and kept non-negative where needed)."""
    site_values = tokens.site_values
    for v in lowered.ir.observations:
        if v.dtype not in ("int", "bool"):
            continue
        sl = layout.slot(v.name).tokens
        part = jnp.round(site_values[:, sl])
        if v.support.kind in ("nonnegative_integer", "boolean"):
            part = jnp.maximum(part, 0.0)
        if v.support.kind == "boolean":
            part = jnp.minimum(part, 1.0)
        site_values = site_values.at[:, sl].set(part)
    return dataclasses.replace(tokens, site_values=site_values)


# ----------------------------------------------------------------------------- training


@dataclass
class StageLog:
    """What one training stage did, for the manifest and the loss plots."""

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0

    @property
    def best_val_loss(self) -> float:
        return self.val_loss[self.best_epoch]


@dataclass
class Trained:
    """Everything LF or direct training produced."""

    normaliser: Normaliser
    posterior: TokenTransformer
    surrogate: Optional[tuple[TokenTransformer, ...]]  # the ensemble's members (LF), or None (direct)
    max_sites: int
    simulator_calls: int
    stages: dict[str, StageLog]
    seconds: dict[str, float]
    simulations: Optional[Values] = None  # kept in memory for sequential rounds; never saved
    truncation: Optional["Truncation"] = None  # the last sequential round's proposal region, if any
    posterior_preconditioner: Optional[PosteriorPreconditioner] = None  # `LF.posterior_precondition`
    globals_preconditioner: Optional[GlobalsPreconditioner] = None  # `LF.globals_precondition`


def _fit(network, data, key, config: TrainConfig, log: StageLog, on_epoch, *, validation_data=None,
         steps_per_epoch=None) -> TokenTransformer:
    start = time.perf_counter()
    result: TrainResult = train(
        network, data, key, validation_data=validation_data, validation_fraction=config.validation_fraction,
        optimiser=config.optimiser(steps_per_epoch), batch_size=config.batch_size,
        steps_per_epoch=steps_per_epoch, max_epochs=config.max_epochs, patience=config.patience,
        ema_decay=config.ema_decay, on_epoch=on_epoch,
    )
    log.train_loss = [float(x) for x in result.train_losses]
    log.val_loss = [float(x) for x in result.val_losses]
    log.best_epoch = int(result.best_epoch)
    log.seconds = time.perf_counter() - start
    return result.model


class _VF(eqx.Module):
    """Binds a token network to a split so `train` sees a plain vector field."""

    network: TokenTransformer
    split: TokenSplit = eqx.field(static=True)

    def __call__(self, t, x, context):
        return TokenVectorField(self.network, self.split)(t, x, context)


class StageStore:
    """Keeps finished training stages so that an interrupted run can resume; this one keeps
    nothing (`hierdsl.checkpoint.PartialRun` keeps them on disk)."""

    def load_arrays(self, stage: str) -> Optional[dict]:
        return None

    def save_arrays(self, stage: str, arrays: dict) -> None:
        pass

    def load_modules(self, stage: str, like):
        return None

    def save_modules(self, stage: str, modules, info: dict) -> None:
        pass


def _simulations(store: StageStore, progress, counter: SimulationCounter, seconds: dict, simulate) -> Values:
    """Run (or reload) the simulation stage: the only stage that calls the simulator."""
    saved = store.load_arrays("simulations")
    if saved is not None:
        counter.calls = int(saved.pop("__calls__"))
        seconds["simulate"] = float(saved.pop("__seconds__"))
        progress.message(f"simulate: reusing {counter.calls} simulator calls from the interrupted run")
        return saved
    start = time.perf_counter()
    sims = simulate()
    seconds["simulate"] = time.perf_counter() - start
    store.save_arrays("simulations", {**sims, "__calls__": np.asarray(counter.calls),
                                      "__seconds__": np.asarray(seconds["simulate"])})
    return sims


def train_lf(lowered: LoweredModel, budget: int, key: PRNGKeyArray, strategy: LF, max_sites: int,
             *, progress=None, store: Optional[StageStore] = None) -> Trained:
    """Likelihood-factorised training from `budget` single-site simulations."""
    progress = progress or _NoProgress()
    store = store or StageStore()
    counter = SimulationCounter()
    seconds: dict[str, float] = {}
    k_sim, k_deq, k_net_s, k_train_s, k_pool, k_net_p, k_train_p = jr.split(key, 7)

    sims = _simulations(store, progress, counter, seconds, lambda: simulate_single_sites(
        lowered, k_sim, budget, counter, progress=progress.bar("simulate", budget)))

    layout1 = TokenLayout.from_ir(lowered.ir, max_sites=1)
    observed = observed_tokens(layout1, lowered) if strategy.precondition else ()
    # The preconditioner's key is folded from k_deq so that every other key stays as it was.
    start = time.perf_counter()
    normaliser = Normaliser.fit(encode_batch(layout1, flow_values_batch(lowered, sims, k_deq), 1), observed,
                                strategy.precondition or "network", jr.fold_in(k_deq, 1), strategy.preconditioner)
    jax.block_until_ready(normaliser)
    precondition_seconds = time.perf_counter() - start
    if observed:
        progress.message(f"precondition: {strategy.precondition} location-scale fit of the observations, "
                         f"{precondition_seconds:.1f}s")
    members = range(strategy.surrogates)
    stages = {**{_member_stage(m): StageLog() for m in members}, "posterior": StageLog()}
    networks = tuple(strategy.surrogate.build(layout1, _member_key(k_net_s, m)) for m in members)
    saved = store.load_modules("surrogate", networks)
    if saved is not None:
        surrogate, info = saved
        stages.update({name: StageLog(**log) for name, log in info["stages"].items()})
        progress.message("surrogate: reusing the network trained by the interrupted run")
    else:
        surrogate = surrogate_members(lowered, sims, normaliser, networks, k_deq, k_train_s, strategy, stages, progress)
        store.save_modules("surrogate", surrogate,
                           {"stages": {_member_stage(m): dataclasses.asdict(stages[_member_stage(m)]) for m in members}})
    # The surrogate's time includes fitting its preconditioner.
    seconds["surrogate"] = precondition_seconds + sum(stages[_member_stage(m)].seconds for m in members)

    layout = TokenLayout.from_ir(lowered.ir, max_sites=max_sites)
    posterior = strategy.posterior.build(layout, k_net_p)
    posterior, preconditioner, globals_preconditioner = posterior_stage(
        lowered, surrogate, normaliser, posterior, k_pool, k_train_p, strategy, budget, max_sites, stages["posterior"],
        seconds, progress)
    return Trained(normaliser, posterior, surrogate, max_sites, counter.calls, stages, seconds, sims,
                   posterior_preconditioner=preconditioner, globals_preconditioner=globals_preconditioner)


def _member_key(key: PRNGKeyArray, member: int) -> PRNGKeyArray:
    return key if member == 0 else jr.fold_in(key, member)


def _member_stage(member: int) -> str:
    """The stage name of ensemble member `member` (0-based): the first keeps the plain name."""
    return "surrogate" if member == 0 else f"surrogate_{member + 1}"


def surrogate_members(lowered: LoweredModel, sims: Values, normaliser: Normaliser,
                      networks: tuple[TokenTransformer, ...], key_deq: PRNGKeyArray, key: PRNGKeyArray, strategy: LF,
                      stages: dict[str, StageLog], progress) -> tuple[TokenTransformer, ...]:
    """Train every member of the surrogate ensemble (from `networks`, their initial or previous
    weights) on the same simulations, each with its own training key (its own validation split,
    batches and noise); member m logs into `stages[_member_stage(m)]`."""
    return tuple(surrogate_stage(lowered, sims, normaliser, network, key_deq, _member_key(key, m), strategy,
                                 stages[_member_stage(m)], progress,
                                 label="surrogate" if len(networks) == 1 else f"surrogate {m + 1}/{len(networks)}")
                 for m, network in enumerate(networks))


def surrogate_stage(lowered: LoweredModel, sims: Values, normaliser: Normaliser, network: TokenTransformer,
                    key_deq: PRNGKeyArray, key: PRNGKeyArray, strategy: LF, log: StageLog, progress,
                    label: str = "surrogate") -> TokenTransformer:
    """Train the single-site surrogate q(y | globals, locals, inputs) on single-site simulations."""
    layout1 = TokenLayout.from_ir(lowered.ir, max_sites=1)
    split1 = surrogate_split(layout1, lowered)
    tokens = normaliser.forward(encode_batch(layout1, flow_values_batch(lowered, sims, key_deq), 1))
    vf = _fit(_VF(network, split1), flow_data(split1, layout1, tokens), key, strategy.surrogate_training, log,
              progress.epochs(label, strategy.surrogate_training.max_epochs))
    _report(progress, label, log)
    return vf.network


def posterior_stage(lowered: LoweredModel, surrogate: TokenTransformer, normaliser: Normaliser,
                    network: TokenTransformer, key_pool: PRNGKeyArray, key: PRNGKeyArray, strategy: LF, budget: int,
                    max_sites: int, log: StageLog, seconds: dict, progress,
                    truncation: Optional["Truncation"] = None,
                    preconditioner: Optional[PosteriorPreconditioner] = None,
                    globals_preconditioner: Optional[GlobalsPreconditioner] = None,
                    ) -> tuple[TokenTransformer, Optional[PosteriorPreconditioner], Optional[GlobalsPreconditioner]]:
    """Assemble synthetic multi-site data sets from the prior and the surrogate (no simulator
    calls), then train the posterior network on random site subsets of them. With `truncation`
    (a sequential round), their globals come from the prior truncated to its box. With
    `strategy.posterior_precondition`, the posterior's `preconditioner` (a previous round's, or
    fitted here to the pool) is applied to the pool first, and with `strategy.globals_precondition`
    the `globals_preconditioner` (likewise) to each training batch; returns the network and them."""
    layout1 = TokenLayout.from_ir(lowered.ir, max_sites=1)
    split1 = surrogate_split(layout1, lowered)
    start = time.perf_counter()
    num_synthetic = strategy.num_synthetic or _default_pool(budget, max_sites, layout1.tokens_per_site)
    globals = None
    if truncation is not None:
        key_pool, k_globals = jr.split(key_pool)
        globals, _, _ = sample_truncated(lowered, k_globals, num_synthetic, truncation, with_site=False)
    noncentred = noncentred_locals(lowered, strategy)
    pool = synthetic_pool(lowered, surrogate, split1, normaliser, key_pool, num_synthetic, max_sites,
                          strategy.sampler, globals=globals, noncentred=noncentred,
                          progress=progress.bar("synthesise", num_synthetic))
    seconds["synthesise"] = seconds.get("synthesise", 0.0) + time.perf_counter() - start

    layout = TokenLayout.from_ir(lowered.ir, max_sites=max_sites)
    split = posterior_split(layout, lowered)
    k_val, key = jr.split(key)
    config = strategy.posterior_training
    n_val = max(1, int(round(num_synthetic * config.validation_fraction)))
    pool, preconditioner = _posterior_preconditioning(pool, n_val, normaliser, layout, noncentred, strategy,
                                                      preconditioner, jr.fold_in(key, 1), seconds, progress)
    train_pool = jax.tree.map(lambda a: a[n_val:], pool)
    val_pool = jax.tree.map(lambda a: a[:n_val], pool)
    globals_preconditioner = _globals_preconditioning(train_pool, layout, strategy, globals_preconditioner,
                                                      jr.fold_in(key, 2), seconds, progress)
    generator = SiteSubsets(train_pool, layout, split, config.batch_size, strategy.min_sites,
                            strategy.all_sites_fraction, globals_preconditioner)
    validation = SiteSubsets(val_pool, layout, split, n_val, strategy.min_sites, strategy.all_sites_fraction,
                             globals_preconditioner)(k_val)
    vf = _fit(_VF(network, split), generator, key, config, log, progress.epochs("posterior", config.max_epochs),
              validation_data=validation, steps_per_epoch=config.steps_per_epoch)
    seconds["posterior"] = seconds.get("posterior", 0.0) + log.seconds
    _report(progress, "posterior", log)
    return vf.network, preconditioner, globals_preconditioner


def _posterior_preconditioning(tokens: Tokens, num_validation: int, normaliser: Normaliser, layout: TokenLayout,
                               noncentred: tuple[str, ...], strategy, preconditioner: Optional[PosteriorPreconditioner],
                               key: PRNGKeyArray, seconds: dict, progress) -> tuple[Tokens, Optional[PosteriorPreconditioner]]:
    """The posterior's tokens with `strategy.posterior_precondition` applied: `preconditioner`, or
    one fitted to the tokens after the first `num_validation` (the training part)."""
    if not getattr(strategy, "posterior_precondition", False):
        return tokens, None
    if preconditioner is None:
        training = jax.tree.map(lambda a: a[num_validation:], tokens)
        preconditioner = _fit_and_report(
            lambda: fit_posterior_preconditioner(training, layout, key, strategy.preconditioner), seconds, progress,
            "precondition posterior", lambda fitted: "network location-scale fit of the sites' locals given the "
            f"globals and their data (residual scale {fitted.residual_scale(training):.3g} of the prior's, median)",
            "nothing to precondition (the sites have no locals)")
    if preconditioner is None:
        return tokens, None
    return precondition_tokens(posterior_normaliser(normaliser, layout, noncentred, preconditioner), tokens), preconditioner


def _globals_preconditioning(train_tokens: Tokens, layout: TokenLayout, strategy,
                             preconditioner: Optional[GlobalsPreconditioner], key: PRNGKeyArray, seconds: dict,
                             progress) -> Optional[GlobalsPreconditioner]:
    """With `strategy.globals_precondition`: `preconditioner` (a previous round's), or one fitted to
    `train_tokens` (the training part of the posterior's tokens); else None."""
    if not getattr(strategy, "globals_precondition", False):
        return None
    if preconditioner is None:
        preconditioner = _fit_and_report(
            lambda: fit_globals_preconditioner(train_tokens, layout, key, strategy.globals_preconditioner,
                                               strategy.min_sites, strategy.all_sites_fraction), seconds, progress,
            "precondition globals", lambda fitted: "network location-scale fit of the globals given all the sites' "
            f"data (residual scale {fitted.residual_scale(train_tokens):.3g} of the prior's at all sites, median)",
            "nothing to precondition (no globals, or the sites have no data)")
    return preconditioner


def _fit_and_report(fit: Callable[[], object], seconds: dict, progress, label: str, report: Callable[[object], str],
                    nothing: str):
    """`fit()`, timed into the posterior stage's seconds, and a progress message: `report(fitted)`,
    or `nothing` where it fitted nothing (None)."""
    start = time.perf_counter()
    fitted = fit()
    elapsed = time.perf_counter() - start
    seconds["posterior"] = seconds.get("posterior", 0.0) + elapsed  # the posterior stage's time includes it
    progress.message(f"{label}: " + (f"{report(fitted)}, {elapsed:.1f}s" if fitted is not None else nothing))
    return fitted


def simulate_sites_at(lowered: LoweredModel, key: PRNGKeyArray, globals: Values, site_params: Values,
                      counter: SimulationCounter) -> Values:
    """Single-site simulations at given parameters (leading axis: simulations): one call each."""
    num = jax.tree.leaves(globals)[0].shape[0]

    def build():
        def one(k, gi, pi):
            sim = lowered.simulate_site(k, gi, pi)
            site = {**pi, **sim}
            return {**gi, **{name: value[None] for name, value in site.items()}}
        return jax.jit(jax.vmap(one))

    batch = lowered.compiled_once("sites_at", build)
    sims = jax.tree.map(np.asarray, batch(jr.split(key, num), globals, site_params))
    counter.calls += num
    _check(lowered, sims)
    return sims


# ----------------------------------------------------------------------------- sequential rounds

TRUNCATION_QUANTILE = 1e-3  # the box spans these quantiles of the posterior draws …
TRUNCATION_WIDEN = 0.25     # … widened on each side by this share of its width
MAX_TRUNCATION_CANDIDATES = 2 ** 24


@dataclass(frozen=True)
class Truncation:
    """The proposal of a sequential round: the prior restricted to a box around the current
    posterior's high-probability region (TSNPE's truncated prior, Deistler et al. 2022, with a
    per-coordinate box standing in for the highest-probability region).

    The box is in unconstrained coordinates (where the networks work): per global, and per local
    pooled over the observed sites; `lower` and `upper` map names to arrays of the parameter's
    unconstrained shape (per site for locals). `acceptance` is the share of prior draws that fell
    inside it when it was last sampled (for the run's report).
    """

    lower: Mapping[str, np.ndarray]
    upper: Mapping[str, np.ndarray]
    acceptance: Optional[float] = None

    @staticmethod
    def from_draws(lowered: LoweredModel, z: Mapping[str, np.ndarray], num_sites: int,
                   quantile: float = TRUNCATION_QUANTILE, widen: float = TRUNCATION_WIDEN) -> "Truncation":
        """The box around unconstrained posterior draws: globals `(num, *shape)`, locals
        `(num, sites, *shape)` (the first `num_sites` sites are the observed ones)."""
        lower, upper = {}, {}
        for v in (*lowered.ir.globals, *lowered.ir.locals):
            a = np.asarray(z[v.name], np.float64)
            if v.per_site:
                a = a[:, :num_sites].reshape(-1, *a.shape[2:])
            lo, hi = np.quantile(a, [quantile, 1.0 - quantile], axis=0)
            pad = widen * (hi - lo)
            lower[v.name] = (lo - pad).astype(np.float32)
            upper[v.name] = (hi + pad).astype(np.float32)
        return Truncation(lower, upper)

    def contains(self, z: Mapping[str, Array], names) -> Array:
        """Whether unconstrained values of one draw (locals of one site, no site axis) lie in the
        box, for the parameters `names`."""
        inside = jnp.asarray(True)
        for name in names:
            inside &= jnp.all((z[name] >= self.lower[name]) & (z[name] <= self.upper[name]))
        return inside

    def to_json(self) -> dict:
        return {"lower": {k: np.asarray(v).tolist() for k, v in self.lower.items()},
                "upper": {k: np.asarray(v).tolist() for k, v in self.upper.items()},
                "acceptance": self.acceptance}

    @staticmethod
    def from_json(data: dict) -> "Truncation":
        return Truncation({k: np.asarray(v, np.float32) for k, v in data["lower"].items()},
                          {k: np.asarray(v, np.float32) for k, v in data["upper"].items()},
                          data.get("acceptance"))


def sample_truncated(lowered: LoweredModel, key: PRNGKeyArray, num: int, truncation: Truncation, *,
                     site_inputs: Optional[Mapping[str, np.ndarray]] = None, with_site: bool = True,
                     batch: int = 8192, max_candidates: int = MAX_TRUNCATION_CANDIDATES
                     ) -> tuple[Values, Values, float]:
    """`num` draws from the truncated prior, by rejection from the prior.

    Each candidate draws the globals and one site's locals from the prior (the site's stochastic
    inputs picked at random from `site_inputs`, the observed sites' inputs, when given) and is kept
    when its globals — and, with `with_site`, its locals — lie in the box. Returns the globals
    `(num, *shape)`, the site parameters (locals and stochastic inputs, `(num, *shape)`) and the
    share of candidates accepted. Raises `RuntimeModelError` when fewer than one in
    `max_candidates / num` prior draws lands in the box.
    """
    ir = lowered.ir
    global_names = [v.name for v in ir.globals]
    local_names = [v.name for v in ir.locals]
    input_names = [v.name for v in ir.inputs if v.stochastic]
    checked = global_names + (local_names if with_site else [])
    inputs = {name: jnp.asarray(site_inputs[name], jnp.float32) for name in input_names} if site_inputs else {}
    lower = {k: jnp.asarray(truncation.lower[k]) for k in checked}
    upper = {k: jnp.asarray(truncation.upper[k]) for k in checked}

    def build():
        # The box and the observed inputs are arguments, not constants: one compilation serves
        # every round.
        def run(k, lower, upper, inputs):
            box = Truncation(lower, upper)

            def one(k):
                kg, ks, ki = jr.split(k, 3)
                g = lowered.sample_globals(kg)
                given = None
                if inputs:
                    i = jr.randint(ki, (), 0, next(iter(inputs.values())).shape[0])
                    given = {name: value[i] for name, value in inputs.items()}
                s = lowered.sample_site_params(ks, g, given)
                params = {**{n: g[n] for n in global_names},
                          **{n: s[n][None] for n in (*local_names, *lowered.prior_inputs)}}
                z = lowered.to_unconstrained(params)
                z = {n: (z[n][0] if n in local_names else z[n]) for n in checked}
                site = {n: s[n] for n in (*local_names, *input_names)}
                return {n: g[n] for n in global_names}, site, box.contains(z, checked)
            return jax.vmap(one)(jr.split(k, batch))
        return jax.jit(run)

    run = lowered.compiled_once(("truncated", with_site, batch), build)

    def candidates(k):
        return run(k, lower, upper, inputs)

    kept: list = []
    count = tried = 0
    while count < num:
        if tried >= max_candidates:
            raise RuntimeModelError(
                f"the sequential round's proposal accepted {count} of {tried} prior draws (it needs {num}): the "
                "posterior region is too small a part of the prior to reach by rejection; use fewer rounds, "
                "or a prior closer to the data")
        key, k = jr.split(key)
        g, s, inside = candidates(k)
        inside = np.asarray(inside)
        tried += batch
        if inside.any():
            kept.append(jax.tree.map(lambda a: np.asarray(a)[inside], (g, s)))
            count += int(inside.sum())
    g = {n: np.concatenate([part[0][n] for part in kept])[:num] for n in global_names}
    s = {n: np.concatenate([part[1][n] for part in kept])[:num] for n in (*local_names, *input_names)}
    return g, s, count / tried


def refine_lf(lowered: LoweredModel, trained: Trained, truncation: Truncation, budget: int, key: PRNGKeyArray,
              strategy: LF, progress=None, *, site_inputs: Optional[Mapping[str, np.ndarray]] = None) -> Trained:
    """One sequential round (TSNPE-style): `budget` more single-site simulations drawn from the
    prior truncated to `truncation` (the current posterior's region for the observed data), then
    the surrogate and the posterior are trained further, warm-started from the previous round.

    Why no importance weights are needed:
    - the surrogate models the likelihood q(y | parameters), which does not depend on where its
      training parameters were drawn; it trains on every round's simulations together;
    - the posterior network trains on fresh synthetic data sets whose globals come from the
      truncated prior p(g) 1[g in box] / Z (the sites' locals and inputs from the prior given g).
      The importance weight back to the prior, p(g) / (p(g) 1[g in box] / Z) = Z, is constant
      inside the box, so the network targets the posterior under the model's prior there; it is
      meant for data whose posterior lies inside the box — the data this round focuses on.

    `site_inputs` are the observed sites' stochastic inputs; each simulation takes one site's at
    random (the sites' inputs are data, not parameters).
    """
    progress = progress or _NoProgress()
    counter = SimulationCounter(trained.simulator_calls)
    seconds = dict(trained.seconds)
    k_prop, k_sim, k_deq, k_train_s, k_pool, k_train_p = jr.split(key, 6)
    start = time.perf_counter()
    globals, site_params, acceptance = sample_truncated(lowered, k_prop, budget, truncation, site_inputs=site_inputs)
    truncation = dataclasses.replace(truncation, acceptance=acceptance)
    progress.message(f"proposal: the prior truncated to the posterior's region ({100 * acceptance:.3g}% of prior "
                     "draws fall inside it)")
    new = simulate_sites_at(lowered, k_sim, globals, site_params, counter)
    seconds["simulate"] = seconds.get("simulate", 0.0) + time.perf_counter() - start
    sims = {name: np.concatenate([trained.simulations[name], new[name]]) for name in new}
    members = range(len(trained.surrogate))
    stages = {**{_member_stage(m): StageLog() for m in members}, "posterior": StageLog()}
    surrogate = surrogate_members(lowered, sims, trained.normaliser, trained.surrogate, k_deq, k_train_s, strategy,
                                  stages, progress)
    seconds["surrogate"] = seconds.get("surrogate", 0.0) + sum(stages[_member_stage(m)].seconds for m in members)
    posterior, preconditioner, globals_preconditioner = posterior_stage(
        lowered, surrogate, trained.normaliser, trained.posterior, k_pool, k_train_p, strategy, counter.calls,
        trained.max_sites, stages["posterior"], seconds, progress, truncation=truncation,
        preconditioner=trained.posterior_preconditioner, globals_preconditioner=trained.globals_preconditioner)
    for name, log in stages.items():
        old = trained.stages[name]
        stages[name] = StageLog(old.train_loss + log.train_loss, old.val_loss + log.val_loss,
                                len(old.train_loss) + log.best_epoch, old.seconds + log.seconds)
    return Trained(trained.normaliser, posterior, surrogate, trained.max_sites, counter.calls, stages, seconds, sims,
                   truncation, preconditioner, globals_preconditioner)


def _default_pool(budget: int, max_sites: int, tokens_per_site: int) -> int:
    # Synthetic data sets are free; bound the pool by memory (~4e7 token values) rather than budget.
    cap = max(200, int(4e7 // max(1, max_sites * tokens_per_site)))
    return int(min(max(2000, 2 * budget), cap))


def synthetic_pool(lowered: LoweredModel, surrogate, split1: TokenSplit, normaliser: Normaliser,
                   key: PRNGKeyArray, num: int, max_sites: int, sampler: SamplerConfig,
                   *, globals: Optional[Values] = None, noncentred: tuple[str, ...] = (), chunk_sites: int = 8192,
                   progress=None) -> Tokens:
    """`num` synthetic data sets of `max_sites` sites (normalised posterior tokens).

    The globals are drawn from the prior, or taken from `globals` (arrays with a leading axis of
    `num`: a sequential round's truncated prior); the sites' inputs and locals always come from
    the prior given the globals, their observations from the surrogate (a network, or a tuple of
    ensemble members that share the sites between them). The locals `noncentred` are non-centred
    in the posterior's tokens (`noncentre`, `posterior_normaliser`).
    """
    surrogates = tuple(surrogate) if isinstance(surrogate, (tuple, list)) else (surrogate,)
    layout = TokenLayout.from_ir(lowered.ir, max_sites=max_sites)
    per_chunk = max(1, chunk_sites // max_sites)
    given_globals = globals is not None

    def build():
        # The surrogate and the normaliser are arguments, not constants: one compilation serves
        # every round (and every estimator of this model with the same surrogate architecture).
        return eqx.filter_jit(functools.partial(_make_pool, lowered, split1, layout, max_sites, sampler,
                                                given_globals, noncentred))

    make = lowered.compiled_once(("pool", split1, max_sites, sampler, given_globals, noncentred), build)
    keys = jr.split(key, num)
    gs = ({name: jnp.asarray(value, jnp.float32) for name, value in globals.items()} if given_globals
          else jnp.zeros((num,)))
    parts = []
    for start, n in _chunks(num, per_chunk):
        chunk_keys, chunk_gs = keys[start:start + n], jax.tree.map(lambda a: a[start:start + n], gs)
        if n < per_chunk:
            chunk_keys = jnp.concatenate([chunk_keys, keys[:per_chunk - n]])
            chunk_gs = jax.tree.map(lambda a, c: jnp.concatenate([c, a[:per_chunk - n]]), gs, chunk_gs)
        parts.append(jax.tree.map(lambda a: a[:n], make(surrogates, normaliser, chunk_keys, chunk_gs)))
        if progress:
            progress(start + n, num)
    return jax.tree.map(lambda *a: jnp.concatenate(a), *parts)


def _make_pool(lowered: LoweredModel, split1: TokenSplit, layout: TokenLayout, max_sites: int,
               sampler: SamplerConfig, given_globals: bool, noncentred: tuple[str, ...],
               surrogates: tuple[TokenTransformer, ...], normaliser: Normaliser, keys: PRNGKeyArray, gs) -> Tokens:
    """One chunk of `synthetic_pool`: a synthetic data set per key."""
    layout1 = split1.layout
    # The non-centred locals' tokens come from the non-centred values, the rest from the surrogate's
    # single-site tokens (which hold the drawn inputs and locals, and the new observations).
    standardised = [int(i) for name in noncentred for i in np.arange(layout.tokens_per_site)[layout.slot(name).tokens]]
    target_normaliser = posterior_normaliser(normaliser, layout, noncentred)

    site_names = _site_names(lowered)

    def prepare(k, given):
        """Draw the data set's parameters and inputs; its sites as single-site surrogate contexts."""
        kg, ks, kq = jr.split(k, 3)
        g = lowered.sample_globals(kg, given if given_globals else None)
        sites = jax.vmap(lambda kk: lowered.sample_site_params(kk, g))(jr.split(ks, max_sites))
        values = {**g, **sites}
        values.update({v.name: jnp.zeros((max_sites, *v.shape), jnp.float32) for v in lowered.ir.observations})
        flow = to_flow_values(lowered, values)
        contexts = jax.vmap(lambda s: layout1.encode(
            {**{n: flow[n] for n in flow if n in _global_names(lowered)},
             **{n: s[n][None] for n in s}}, 1))({n: flow[n] for n in flow if n in site_names})
        return flow, normaliser.forward(contexts), kq

    def finish(flow, filled, order):
        """The data set's posterior tokens from its values and its sites' surrogate draws."""
        site_tokens = normaliser.inverse(filled).site_values[:, 0, :]  # (max_sites, T)
        if order is not None:
            flow = {n: (value[order] if n in site_names else value) for n, value in flow.items()}
            site_tokens = site_tokens[order]
        # Coordinates come from the inputs, already in `flow`; only the observations are new.
        flow = noncentre(lowered, flow, noncentred, jnp.ones((max_sites,), jnp.float32))
        tokens = layout.encode({n: flow[n] for n in flow if n in set(layout.labels)}, max_sites)
        if standardised:
            site_tokens = site_tokens.at[:, standardised].set(tokens.site_values[:, standardised])
        return target_normaliser.forward(dataclasses.replace(tokens, site_values=site_tokens))

    if len(surrogates) == 1:
        def one(k, given):
            flow, contexts, kq = prepare(k, given)
            return finish(flow, sample_surrogate(surrogates[0], split1, normaliser, lowered, contexts, kq, sampler),
                          None)
        return jax.vmap(one)(keys, gs)

    # An ensemble: the flat site n of the chunk is drawn by member n mod K, so every data set mixes
    # the members (each site's likelihood is the members' average), then each data set's sites are
    # shuffled so that no site position belongs to one member (site subsets keep the first sites).
    flows, contexts, site_keys = jax.vmap(prepare)(keys, gs)
    num_members = len(surrogates)
    site_keys = jax.vmap(lambda k: jr.split(k, max_sites))(site_keys)
    flat = jax.tree.map(lambda a: a.reshape(a.shape[0] * a.shape[1], *a.shape[2:]), (contexts, site_keys))
    total = flat[1].shape[0]
    per_member = -(-total // num_members)
    padded = jax.tree.map(lambda a: jnp.concatenate([a, a[:per_member * num_members - total]]), flat)
    grouped = jax.tree.map(lambda a: jnp.swapaxes(a.reshape(per_member, num_members, *a.shape[1:]), 0, 1), padded)
    members = jax.tree.map(lambda *leaves: jnp.stack(leaves), *surrogates)
    filled = jax.vmap(lambda net, c, k: _sample_sites(net, split1, normaliser, lowered, c, k, sampler))(members, *grouped)
    filled = jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1).reshape(a.shape[0] * a.shape[1], *a.shape[2:])[:total], filled)
    filled = jax.tree.map(lambda a: a.reshape(keys.shape[0], max_sites, *a.shape[1:]), filled)
    orders = jax.vmap(lambda k: jr.permutation(jr.fold_in(k, num_members), max_sites))(keys)
    return jax.vmap(finish)(flows, filled, orders)


def _global_names(lowered: LoweredModel) -> set[str]:
    return {v.name for v in lowered.ir.globals}


def _site_names(lowered: LoweredModel) -> set[str]:
    return {v.name for v in lowered.ir.variables if v.role in ("local", "input", "observation")}


def train_direct(lowered: LoweredModel, budget: int, key: PRNGKeyArray, strategy: Direct, max_sites: int,
                 *, progress=None, store: Optional[StageStore] = None) -> Trained:
    """The baseline: the posterior network trained on `budget // max_sites` full simulations."""
    progress = progress or _NoProgress()
    num = budget // max_sites
    if num < 2:
        raise ValueError(f"a budget of {budget} gives {num} full simulations of {max_sites} sites; "
                         f"direct training needs at least 2 (budget ≥ {2 * max_sites})")
    store = store or StageStore()
    counter = SimulationCounter()
    seconds: dict[str, float] = {}
    k_sim, k_deq, k_net, k_train, k_val = jr.split(key, 5)
    sims = _simulations(store, progress, counter, seconds, lambda: simulate_full(
        lowered, k_sim, num, max_sites, counter, progress=progress.bar("simulate", num)))
    layout = TokenLayout.from_ir(lowered.ir, max_sites=max_sites)
    split = posterior_split(layout, lowered)
    flow_vals = flow_values_batch(lowered, sims, k_deq, dequantise=False)
    normaliser = Normaliser.fit(encode_batch(layout, flow_vals, max_sites))
    noncentred = noncentred_locals(lowered, strategy)
    if noncentred:
        real = jnp.ones((max_sites,), jnp.float32)
        flow_vals = jax.vmap(lambda z: noncentre(lowered, z, noncentred, real))(flow_vals)
    tokens = posterior_normaliser(normaliser, layout, noncentred).forward(encode_batch(layout, flow_vals, max_sites))
    config = strategy.posterior_training
    n_val = max(1, int(round(num * config.validation_fraction)))
    order = np.asarray(jr.permutation(k_val, num))
    tokens = jax.tree.map(lambda a: a[order], tokens)  # validation first, as the LF pool
    tokens, preconditioner = _posterior_preconditioning(tokens, n_val, normaliser, layout, noncentred, strategy, None,
                                                        jr.fold_in(k_train, 1), seconds, progress)
    val_tokens = jax.tree.map(lambda a: a[:n_val], tokens)
    train_tokens = jax.tree.map(lambda a: a[n_val:], tokens)
    globals_preconditioner = _globals_preconditioning(train_tokens, layout, strategy, None, jr.fold_in(k_train, 2),
                                                      seconds, progress)
    stages = {"posterior": StageLog()}
    generator = SiteSubsets(train_tokens, layout, split, min(config.batch_size, max(1, num - n_val)),
                            strategy.min_sites, strategy.all_sites_fraction, globals_preconditioner)
    validation = SiteSubsets(val_tokens, layout, split, n_val, strategy.min_sites, strategy.all_sites_fraction,
                             globals_preconditioner)(k_val)
    network = strategy.posterior.build(layout, k_net)
    vf = _fit(_VF(network, split), generator, k_train, config, stages["posterior"],
              progress.epochs("posterior", config.max_epochs), validation_data=validation,
              steps_per_epoch=config.steps_per_epoch)
    seconds["posterior"] = seconds.get("posterior", 0.0) + stages["posterior"].seconds
    _report(progress, "posterior", stages["posterior"])
    return Trained(normaliser, vf.network, None, max_sites, counter.calls, stages, seconds,
                   posterior_preconditioner=preconditioner, globals_preconditioner=globals_preconditioner)


class _NoProgress:
    def bar(self, label, total):
        return None

    def epochs(self, label, total):
        return None

    def message(self, text):
        pass


def _report(progress, label: str, log: StageLog) -> None:
    progress.message(f"{label}: {len(log.train_loss)} epochs, best {log.best_epoch + 1} "
                     f"(validation loss {log.best_val_loss:.4f}), {log.seconds:.1f}s")


def num_targets(lowered: LoweredModel, num_sites: int) -> int:
    ir = lowered.ir
    return sum(v.size for v in ir.globals) + num_sites * sum(v.size for v in ir.locals)


def log_prob_divergence(num_target_dims: int) -> str:
    """Exact divergence while it is cheap, Hutchinson beyond (the cost of exact grows with dim)."""
    return "exact" if num_target_dims <= 64 else "hutchinson"
