"""Runtime stage: diagnostics — accuracy and calibration metrics for posterior estimators.

Input: posterior samples (from a trained estimator, an exact sampler or NUTS), and where a metric
needs them, reference samples, simulated calibration pairs or the true parameters behind simulated
data. Output: host values — scores and p-values as Python floats, per-dimension results as NumPy
arrays — ready for reports.

- **C2ST** (`c2st`): the cross-validated accuracy of a classifier telling estimator samples from
  reference samples at one observation; 0.5 means indistinguishable, 1.0 disjoint.
- **l-C2ST** (`fit_lc2st`, `LC2ST.test`, `lc2st`; Linhart et al. 2023): a reference-free local test
  of q(θ | x) at an observation x₀, from simulated pairs (θᵢ, xᵢ) and one draw θ'ᵢ ~ q(· | xᵢ) each;
  the statistic is 0 for a perfect estimator, and a permutation null gives its p-value.
- **SBC** (`sbc_ranks`, `sbc_uniformity`, `bonferroni`, `sbc`; Talts et al. 2018): the rank of each
  true parameter among its posterior samples is uniform on {0, …, L} for a calibrated estimator;
  a chi-square test per dimension, combined across dimensions with a Bonferroni correction.
  Ranks that come in correlated clusters (the sites of one data set) take the cluster-robust
  `sbc_uniformity_clustered` instead.
- **Expected coverage** (`expected_coverage`): the fraction of true parameters inside the central
  α-credible interval of their marginal posterior; below α means over-confident, above α
  under-confident.

Every classifier is the sbibm MLP — two hidden ReLU layers, full-batch Adam for a fixed number of
steps — and all classifiers of one call (the C2ST folds, the l-C2ST observed and null fits) train
at once, vmapped, inside one compiled function that is reused for every call of the same shapes.
SBC and coverage are rank bookkeeping in NumPy (float64, nothing to compile). The library imports
no SciPy: the chi-square tail has a closed form for integer degrees of freedom.
"""

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

# ----------------------------------------------------------------------------- shared helpers


def _as_matrix(values: ArrayLike, name: str) -> Float[Array, "num dim"]:
    """`(num,)` → `(num, 1)`; `(num, *shape)` → `(num, prod(shape))`; checks values are finite."""
    values = jnp.asarray(values, dtype=jnp.result_type(float))
    if values.ndim == 0:
        raise ValueError(f"`{name}` is a scalar; pass one row per sample, shape (num_samples, dim).")
    values = values.reshape(values.shape[0], -1)
    if values.shape[0] == 0 or values.shape[1] == 0:
        raise ValueError(f"`{name}` has shape {values.shape}; it needs at least one sample and one dimension.")
    if not bool(jnp.all(jnp.isfinite(values))):
        raise ValueError(f"`{name}` holds NaN or infinite values; drop those samples first.")
    return values


def _standardiser(values: Float[Array, "num dim"]) -> tuple[Float[Array, " dim"], Float[Array, " dim"]]:
    """Mean and standard deviation per column; a constant column keeps scale 1 (no division by 0)."""
    std = jnp.std(values, axis=0)
    return jnp.mean(values, axis=0), jnp.where(std > 0, std, 1.0)


def flatten_draws(
    draws: Mapping[str, ArrayLike], names: Sequence[str] | None = None
) -> Float[Array, "num_draws dim"]:
    """Stack named posterior draws into one matrix, one row per draw.

    Turns the `{IR name: array}` dictionaries that posteriors return (globals `(num, *shape)`,
    locals `(num, sites, *shape)`) into the `(num, dim)` matrices the metrics take: e.g.
    `flatten_draws(draws, global_names)` for a C2ST on the globals alone, `flatten_draws(draws)`
    for the full joint.

    **Arguments:**

    - `draws`: the draws by variable name, all with the same leading number of draws.
    - `names`: the variables to keep, in this column order; default all, in the mapping's order.

    **Returns:** the flattened draws side by side.
    """
    names = list(draws) if names is None else list(names)
    missing = [name for name in names if name not in draws]
    if missing:
        raise KeyError(f"no draws named {missing}; the draws hold {sorted(draws)}.")
    if not names:
        raise ValueError("flatten_draws needs at least one variable name.")
    columns = [jnp.asarray(draws[name]) for name in names]
    counts = {name: column.shape[0] for name, column in zip(names, columns, strict=True)}
    if len(set(counts.values())) != 1:
        raise ValueError(f"the variables hold different numbers of draws: {counts}.")
    return jnp.concatenate([column.reshape(column.shape[0], -1) for column in columns], axis=1)


# ----------------------------------------------------------------------------- MLP classifier
#
# A classifier's weights and biases live in one flat vector: Adam then updates a single array,
# which compiles several times faster than a pytree of layers. Each compiled function draws all its
# randomness in one `jr.uniform` call, because every separate threefry draw costs seconds of XLA
# compilation on CPU — far more than the training itself at these sizes.


def _layer_sizes(dim: int, width: int) -> tuple[int, ...]:
    return (dim, width, width, 1)


def _num_params(sizes: tuple[int, ...]) -> int:
    return sum(n_in * n_out + n_out for n_in, n_out in itertools.pairwise(sizes))


def _init_params(uniforms: Float[Array, " num_params"], sizes: tuple[int, ...]) -> Float[Array, " num_params"]:
    """Weights uniform on ±1/√fan_in (PyTorch's default), biases zero, from uniforms on [0, 1)."""
    scale = []
    for n_in, n_out in itertools.pairwise(sizes):
        scale += [1 / math.sqrt(n_in)] * (n_in * n_out) + [0.0] * n_out
    return (2 * uniforms - 1) * jnp.asarray(scale, dtype=uniforms.dtype)


def _logits(
    params: Float[Array, " num_params"], inputs: Float[Array, "n dim"], sizes: tuple[int, ...]
) -> Float[Array, " n"]:
    hidden, offset = inputs, 0
    for layer, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        weight = params[offset : offset + n_in * n_out].reshape(n_in, n_out)
        bias = params[offset + n_in * n_out : offset + n_in * n_out + n_out]
        offset += n_in * n_out + n_out
        hidden = hidden @ weight + bias
        if layer < len(sizes) - 2:
            hidden = jax.nn.relu(hidden)
    return hidden[:, 0]


def _fit_classifier(
    inputs: Float[Array, "n dim"],
    labels: Float[Array, " n"],
    train_weight: Float[Array, " n"],
    init: Float[Array, " num_params"],
    sizes: tuple[int, ...],
    num_steps: int,
    learning_rate: float,
) -> Float[Array, " num_params"]:
    """Full-batch Adam on the weighted binary cross-entropy of an MLP, from `init`."""
    optimiser = optax.adam(learning_rate)

    def loss(params):
        losses = optax.sigmoid_binary_cross_entropy(_logits(params, inputs, sizes), labels)
        return jnp.sum(train_weight * losses) / jnp.sum(train_weight)

    def step(carry, _):
        params, opt_state = carry
        updates, opt_state = optimiser.update(jax.grad(loss)(params), opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    (params, _), _ = jax.lax.scan(step, (init, optimiser.init(init)), None, length=num_steps)
    return params


def _uniforms(key: PRNGKeyArray, shapes: Sequence[tuple[int, ...]]) -> list[Float[Array, "..."]]:
    """Independent uniforms on [0, 1) of the given shapes, from a single draw (see above)."""
    sizes = [math.prod(shape) for shape in shapes]
    flat = jr.uniform(key, (sum(sizes),))
    offsets = np.cumsum([0, *sizes])
    return [flat[start:stop].reshape(shape) for start, stop, shape in zip(offsets[:-1], offsets[1:], shapes)]


# ----------------------------------------------------------------------------- C2ST


@eqx.filter_jit
def _c2st_accuracy(
    reference: Float[Array, "num_reference dim"],
    samples: Float[Array, "num_samples dim"],
    key: PRNGKeyArray,
    num_folds: int,
    num_steps: int,
    learning_rate: float,
    hidden_width: int,
) -> Float[Array, ""]:
    num_reference, dim = reference.shape
    num_samples = min(num_reference, samples.shape[0])
    sizes = _layer_sizes(dim, hidden_width)
    reference_order, samples_order, fold_order, inits = _uniforms(
        key,
        [(num_reference,), (samples.shape[0],), (2, num_samples), (num_folds, _num_params(sizes))],
    )
    # The larger set is subsampled without replacement (a random order, truncated).
    if num_reference > num_samples:
        reference = reference[jnp.argsort(reference_order)[:num_samples]]
    if samples.shape[0] > num_samples:
        samples = samples[jnp.argsort(samples_order)[:num_samples]]
    mean, std = _standardiser(reference)
    inputs = (jnp.concatenate([reference, samples]) - mean) / std
    labels = jnp.concatenate([jnp.zeros(num_samples), jnp.ones(num_samples)])
    # Stratified folds: each class is spread evenly over the folds, in a random order.
    fold_of_class = jnp.arange(num_samples) % num_folds
    folds = fold_of_class[jnp.argsort(fold_order, axis=1)].reshape(-1)

    def fold_accuracy(fold, init):
        train_weight = (folds != fold).astype(inputs.dtype)
        params = _fit_classifier(inputs, labels, train_weight, init, sizes, num_steps, learning_rate)
        correct = (_logits(params, inputs, sizes) > 0) == (labels > 0.5)
        test_weight = 1 - train_weight
        return jnp.sum(test_weight * correct) / jnp.sum(test_weight)

    accuracies = jax.vmap(fold_accuracy)(jnp.arange(num_folds), _init_params(inits, sizes))
    return jnp.mean(accuracies)


def c2st(
    reference: Float[ArrayLike, "num_reference ..."],
    samples: Float[ArrayLike, "num_samples ..."],
    key: PRNGKeyArray,
    *,
    num_folds: int = 5,
    num_steps: int = 1000,
    learning_rate: float = 1e-2,
    hidden_width: int | None = None,
) -> float:
    """The C2ST accuracy of `samples` against `reference` (sbibm protocol).

    Both sets are z-scored with the reference's mean and standard deviation; an MLP with two
    hidden ReLU layers of `10 · dim` units is trained with full-batch Adam on each of `num_folds`
    stratified folds, and the score is the mean held-out accuracy. Compiled once per shape.

    **Arguments:**

    - `reference`: the reference samples, `(num, dim)`; `(num,)` is one-dimensional and trailing
      axes are flattened. Use `flatten_draws` to pick e.g. the globals out of named draws.
    - `samples`: the candidate samples, the same dimension. If the two sets differ in size, the
      larger is subsampled without replacement to the smaller, so that a guess scores 0.5.
    - `key`: the key for the subsample, the fold assignment and the classifier initialisation;
      a fixed key gives a fixed score.
    - `num_folds`: the number of cross-validation folds.
    - `num_steps`: full-batch Adam steps per fold.
    - `learning_rate`: Adam's learning rate.
    - `hidden_width`: units per hidden layer; default `10 · dim` (sbibm). The cost grows with its
      square: `hierdsl bench` caps it for high-dimensional joints on a CPU.

    **Returns:** the mean held-out accuracy, in [0, 1]; 0.5 is perfect.
    """
    reference = _as_matrix(reference, "reference")
    samples = _as_matrix(samples, "samples")
    if reference.shape[1] != samples.shape[1]:
        raise ValueError(
            f"c2st compares samples of one dimension, got reference dimension {reference.shape[1]} "
            f"and samples dimension {samples.shape[1]}; select the same variables from both."
        )
    num_samples = min(reference.shape[0], samples.shape[0])
    if num_samples < num_folds:
        raise ValueError(
            f"c2st needs at least `num_folds` = {num_folds} samples per set, got {num_samples}."
        )
    width = hidden_width or 10 * reference.shape[1]
    return float(_c2st_accuracy(reference, samples, key, num_folds, num_steps, learning_rate, width))


# ----------------------------------------------------------------------------- l-C2ST


@dataclass(frozen=True)
class LC2STResult:
    """The outcome of an l-C2ST at one observation.

    - `statistic`: T(x₀) = mean over θ ~ q(· | x₀) of (d(θ, x₀) − ½)², where d is the trained
      classifier's probability that (θ, x₀) came from the joint; 0 for a perfect estimator.
    - `p_value`: (1 + #{null statistics ≥ statistic}) / (1 + num_null), the permutation p-value.
    - `null_statistics`: the same statistic for each classifier trained on permuted labels.
    """

    statistic: float
    p_value: float
    null_statistics: Float[np.ndarray, " num_null"]


class LC2ST(eqx.Module):
    """Trained l-C2ST classifiers, amortised over the observation: `test` any x₀ without retraining.

    Holds one classifier trained on the true class labels (row 0 of `params`) and `num_null`
    trained on permuted labels, and the z-scoring of θ and x that their inputs use. Build with
    `fit_lc2st`.
    """

    params: Float[Array, "num_classifiers num_params"]
    theta_mean: Float[Array, " theta_dim"]
    theta_std: Float[Array, " theta_dim"]
    x_mean: Float[Array, " x_dim"]
    x_std: Float[Array, " x_dim"]
    sizes: tuple[int, ...] = eqx.field(static=True)

    def __check_init__(self):
        if self.sizes[0] != self.theta_mean.shape[0] + self.x_mean.shape[0]:
            raise ValueError(
                f"the classifiers take {self.sizes[0]} inputs, but θ and x have "
                f"{self.theta_mean.shape[0]} + {self.x_mean.shape[0]} dimensions."
            )

    def test(
        self,
        theta_q_at_x0: Float[ArrayLike, "num_q_samples ..."],
        x0: Float[ArrayLike, "..."],
    ) -> LC2STResult:
        """The l-C2ST statistic and p-value of the estimator at the observation `x0`.

        **Arguments:**

        - `theta_q_at_x0`: samples from q(θ | x₀), shaped like the calibration θ (one row each).
        - `x0`: the observation, shaped like one calibration x.

        **Returns:** an `LC2STResult`.
        """
        theta = _as_matrix(theta_q_at_x0, "theta_q_at_x0")
        x0 = _as_matrix(jnp.asarray(x0)[None], "x0")[0]
        if theta.shape[1] != self.theta_mean.shape[0] or x0.shape[0] != self.x_mean.shape[0]:
            raise ValueError(
                f"the classifiers were trained on θ of dimension {self.theta_mean.shape[0]} and x of "
                f"dimension {self.x_mean.shape[0]}, got θ of dimension {theta.shape[1]} and x₀ of "
                f"dimension {x0.shape[0]}."
            )
        statistics = np.asarray(_lc2st_statistics(self, theta, x0), dtype=np.float64)
        observed, null = statistics[0], statistics[1:]
        p_value = (1 + np.sum(null >= observed)) / (1 + null.size)
        return LC2STResult(float(observed), float(p_value), null)


@eqx.filter_jit
def _lc2st_statistics(
    classifiers: LC2ST, theta: Float[Array, "num_q_samples theta_dim"], x0: Float[Array, " x_dim"]
) -> Float[Array, " num_classifiers"]:
    theta = (theta - classifiers.theta_mean) / classifiers.theta_std
    x0 = (x0 - classifiers.x_mean) / classifiers.x_std
    inputs = jnp.concatenate([theta, jnp.broadcast_to(x0, (theta.shape[0], x0.shape[0]))], axis=1)

    def statistic(params):
        probabilities = jax.nn.sigmoid(_logits(params, inputs, classifiers.sizes))
        return jnp.mean((probabilities - 0.5) ** 2)

    return jax.vmap(statistic)(classifiers.params)


@eqx.filter_jit
def _fit_lc2st(
    theta_joint: Float[Array, "num_pairs theta_dim"],
    x_joint: Float[Array, "num_pairs x_dim"],
    theta_q: Float[Array, "num_pairs theta_dim"],
    key: PRNGKeyArray,
    num_null: int,
    width: int,
    num_steps: int,
    learning_rate: float,
) -> LC2ST:
    num_pairs, theta_dim = theta_joint.shape
    sizes = _layer_sizes(theta_dim + x_joint.shape[1], width)
    swap_uniforms, inits = _uniforms(key, [(num_null + 1, num_pairs), (num_null + 1, _num_params(sizes))])
    # Under H₀ the two θ of a pair are iid given xᵢ, so swapping them within any set of pairs
    # leaves the data's distribution unchanged: a within-pair label permutation is an exact null
    # that, unlike a global shuffle, keeps every xᵢ once in each class. Row 0 is the true labelling.
    swaps = (swap_uniforms < 0.5).at[0].set(False)[:, :, None]
    theta_mean, theta_std = _standardiser(theta_joint)
    x_mean, x_std = _standardiser(x_joint)
    theta_joint = (theta_joint - theta_mean) / theta_std
    theta_q = (theta_q - theta_mean) / theta_std
    x_joint = (x_joint - x_mean) / x_std
    labels = jnp.concatenate([jnp.ones(num_pairs), jnp.zeros(num_pairs)])
    train_weight = jnp.ones(2 * num_pairs)

    def fit(swap, init):
        theta_one = jnp.where(swap, theta_q, theta_joint)
        theta_zero = jnp.where(swap, theta_joint, theta_q)
        inputs = jnp.concatenate(
            [jnp.concatenate([theta_one, x_joint], axis=1), jnp.concatenate([theta_zero, x_joint], axis=1)]
        )
        return _fit_classifier(inputs, labels, train_weight, init, sizes, num_steps, learning_rate)

    params = jax.vmap(fit)(swaps, _init_params(inits, sizes))
    return LC2ST(params, theta_mean, theta_std, x_mean, x_std, sizes)


def fit_lc2st(
    theta_joint: Float[ArrayLike, "num_pairs ..."],
    x_joint: Float[ArrayLike, "num_pairs ..."],
    theta_q: Float[ArrayLike, "num_pairs ..."],
    key: PRNGKeyArray,
    *,
    num_null: int = 50,
    hidden_width: int | None = None,
    num_steps: int = 300,
    learning_rate: float = 1e-2,
) -> LC2ST:
    """Train the l-C2ST classifiers of an estimator q(θ | x) (Linhart et al. 2023, general form).

    A classifier d(θ, x) learns to tell class 1, (θᵢ, xᵢ) from the joint, from class 0, (θ'ᵢ, xᵢ)
    with θ'ᵢ ~ q(· | xᵢ); its optimum is p(θ | x) / (p(θ | x) + q(θ | x)), which is ½ everywhere
    exactly when q is the true posterior. `num_null` more classifiers learn the same task with the
    two θ of randomly chosen pairs swapped — the data under H₀: q = p — for the permutation null.
    θ and x are z-scored by the calibration set. All `num_null + 1` classifiers train at once
    (vmapped, full-batch Adam), compiled once per shape.

    **Arguments:**

    - `theta_joint`: parameters θᵢ drawn from the prior, `(num_pairs, theta_dim)` (or `(num_pairs,)`).
    - `x_joint`: the data xᵢ simulated from each θᵢ, `(num_pairs, x_dim)` (or `(num_pairs,)`).
    - `theta_q`: one draw θ'ᵢ ~ q(· | xᵢ) per pair, shaped like `theta_joint`.
    - `key`: the key for the permutations and the classifier initialisations.
    - `num_null`: the number of permutation classifiers; the smallest p-value is 1 / (num_null + 1).
    - `hidden_width`: units per hidden layer; default `10 · (theta_dim + x_dim)`, as sbi's LC2ST.
      Memory grows as `(num_null + 1) · hidden_width²`: lower it for high-dimensional θ and x.
    - `num_steps`: full-batch Adam steps per classifier.
    - `learning_rate`: Adam's learning rate.

    **Returns:** an `LC2ST`; call its `test(theta_q_at_x0, x0)` at each observation.
    """
    theta_joint = _as_matrix(theta_joint, "theta_joint")
    x_joint = _as_matrix(x_joint, "x_joint")
    theta_q = _as_matrix(theta_q, "theta_q")
    if theta_q.shape != theta_joint.shape or x_joint.shape[0] != theta_joint.shape[0]:
        raise ValueError(
            f"l-C2ST needs one x and one estimator draw per joint θ: got theta_joint {theta_joint.shape}, "
            f"x_joint {x_joint.shape} and theta_q {theta_q.shape} (flattened to rows)."
        )
    if num_null < 1:
        raise ValueError(f"`num_null` must be at least 1 to give a p-value, got {num_null}.")
    width = hidden_width or 10 * (theta_joint.shape[1] + x_joint.shape[1])
    return _fit_lc2st(theta_joint, x_joint, theta_q, key, num_null, width, num_steps, learning_rate)


def lc2st(
    theta_joint: Float[ArrayLike, "num_pairs ..."],
    x_joint: Float[ArrayLike, "num_pairs ..."],
    theta_q: Float[ArrayLike, "num_pairs ..."],
    theta_q_at_x0: Float[ArrayLike, "num_q_samples ..."],
    x0: Float[ArrayLike, "..."],
    key: PRNGKeyArray,
    *,
    num_null: int = 50,
    hidden_width: int | None = None,
    num_steps: int = 300,
    learning_rate: float = 1e-2,
) -> LC2STResult:
    """The l-C2ST of q(θ | x) at one observation: `fit_lc2st(...).test(theta_q_at_x0, x0)`.

    To test several observations, call `fit_lc2st` once and `test` each: the classifiers do not
    depend on x₀. The arguments are those of `fit_lc2st` and `LC2ST.test`.
    """
    classifiers = fit_lc2st(
        theta_joint,
        x_joint,
        theta_q,
        key,
        num_null=num_null,
        hidden_width=hidden_width,
        num_steps=num_steps,
        learning_rate=learning_rate,
    )
    return classifiers.test(theta_q_at_x0, x0)


# ----------------------------------------------------------------------------- SBC and coverage
#
# Rank statistics are host-side bookkeeping on sample arrays: NumPy in float64, nothing to compile.

COVERAGE_LEVELS = tuple(round(0.05 * index, 2) for index in range(1, 20))
"""The default credibility levels of `expected_coverage`: 0.05, 0.10, …, 0.95."""


def _check_truths_and_samples(
    truths: ArrayLike, samples: ArrayLike
) -> tuple[Float[np.ndarray, "num_truths dim"], Float[np.ndarray, "num_truths num_posterior_samples dim"]]:
    truths = np.asarray(truths, dtype=np.float64)
    samples = np.asarray(samples, dtype=np.float64)
    if truths.ndim == 1:
        truths = truths[:, None]
    if samples.ndim == 2:
        samples = samples[:, :, None]
    if truths.ndim != 2 or samples.ndim != 3 or samples.shape[::2] != truths.shape:
        raise ValueError(
            f"expected truths (num_truths, dim) and posterior samples (num_truths, num_posterior_samples, "
            f"dim), got {truths.shape} and {samples.shape}; flatten structured parameters first "
            f"(`flatten_draws`)."
        )
    if not (np.all(np.isfinite(truths)) and np.all(np.isfinite(samples))):
        raise ValueError("the truths or posterior samples hold NaN or infinite values.")
    return truths, samples


def sbc_ranks(
    truths: Float[ArrayLike, "num_truths dim"],
    samples: Float[ArrayLike, "num_truths num_posterior_samples dim"],
) -> Int[np.ndarray, "num_truths dim"]:
    """The SBC rank of each true parameter among its posterior samples (Talts et al. 2018).

    For a calibrated estimator, with θ⁽ⁿ⁾ from the prior, data simulated from it and the samples
    drawn from the estimated posterior given those data, every rank is uniform on {0, …, L}. Pass
    any scalar test function f as `truths = f(θ⁽ⁿ⁾)` and `samples = f(θ)` (e.g. a log density, or a
    distance to the posterior mean) to check the joint rather than the marginals.

    **Arguments:**

    - `truths`: the true parameters, `(num_truths, dim)` (or `(num_truths,)`).
    - `samples`: L posterior samples for each, `(num_truths, L, dim)` (or `(num_truths, L)`).

    **Returns:** the number of posterior samples below each truth, integers in [0, L].
    """
    truths, samples = _check_truths_and_samples(truths, samples)
    return np.sum(samples < truths[:, None, :], axis=1)


def _chi_square_survival(statistic: Float[np.ndarray, "..."], degrees_of_freedom: int) -> Float[np.ndarray, "..."]:
    """P(χ²_k ≥ statistic) for an integer k, in closed form.

    Q(k + 2, s) = Q(k, s) + e^(−s/2) (s/2)^(k/2) / Γ(k/2 + 1), from Q(2, s) = e^(−s/2) and
    Q(1, s) = erfc(√(s/2)): a sum of positive terms, each taken in log space, so the tail is accurate
    far below float32's range.
    """
    half = np.asarray(statistic, dtype=np.float64) / 2
    orders = np.arange(degrees_of_freedom % 2, degrees_of_freedom - 1, 2) / 2  # m/2 for the added terms
    log_gamma = np.array([math.lgamma(order + 1) for order in orders])
    with np.errstate(divide="ignore", invalid="ignore"):  # s = 0: log 0 = −inf, and 0 · −inf for m = 0
        log_power = np.where(orders == 0, 0.0, orders * np.log(half)[..., None])
    terms = np.exp(log_power - half[..., None] - log_gamma)
    base = np.vectorize(math.erfc)(np.sqrt(half)) if degrees_of_freedom % 2 else 0.0
    return np.minimum(1.0, base + np.sum(terms, axis=-1))


def sbc_uniformity(
    ranks: Int[ArrayLike, "num_truths dim"],
    num_posterior_samples: int,
    *,
    num_bins: int | None = None,
) -> Float[np.ndarray, " dim"]:
    """The p-value, per dimension, of a chi-square test that the SBC ranks are uniform.

    The ranks 0, …, L are grouped into `num_bins` bins of (as near as possible) equal width; the
    expected count of each bin is its exact share of the L + 1 possible ranks, so L + 1 need not
    be a multiple of `num_bins`. The statistic has `num_bins − 1` degrees of freedom. Combine the
    dimensions with `bonferroni`.

    **Arguments:**

    - `ranks`: SBC ranks from `sbc_ranks`, `(num_truths, dim)`.
    - `num_posterior_samples`: L, the number of posterior samples each rank was taken among.
    - `num_bins`: the number of bins; default `num_truths // 20` (about 20 expected per bin, as
      Talts et al. suggest), at least 2 and at most L + 1.

    **Returns:** the p-values, `(dim,)`; small values flag miscalibration.
    """
    ranks = np.asarray(ranks)
    if ranks.ndim == 1:
        ranks = ranks[:, None]
    num_truths = ranks.shape[0]
    bins, probabilities = _rank_bins(ranks, num_posterior_samples, num_bins, num_truths)
    observed = np.sum(bins[..., None] == np.arange(probabilities.size), axis=0)  # (dim, num_bins)
    expected = num_truths * probabilities
    statistic = np.sum((observed - expected) ** 2 / expected, axis=-1)
    return _chi_square_survival(statistic, probabilities.size - 1)


def _rank_bins(ranks: np.ndarray, num_posterior_samples: int, num_bins: int | None,
               num_independent: int) -> tuple[np.ndarray, np.ndarray]:
    """Each rank's bin and the bins' shares under uniformity (ranks 0..L split as evenly as
    possible), checking both arguments; `num_bins` defaults to `num_independent // 20`."""
    num_values = num_posterior_samples + 1
    if num_bins is None:
        num_bins = min(num_values, max(2, num_independent // 20))
    if not 2 <= num_bins <= num_values:
        raise ValueError(
            f"`num_bins` must lie between 2 and L + 1 = {num_values} (one bin per possible rank), "
            f"got {num_bins}."
        )
    if np.any((ranks < 0) | (ranks > num_posterior_samples)):
        raise ValueError(
            f"SBC ranks lie in [0, L] = [0, {num_posterior_samples}]; got ranks outside it — is "
            f"`num_posterior_samples` the L the ranks were taken among?"
        )
    probabilities = np.bincount(np.arange(num_values) * num_bins // num_values, minlength=num_bins) / num_values
    return ranks * num_bins // num_values, probabilities


def sbc_uniformity_clustered(
    ranks: Int[ArrayLike, "num_clusters cluster_size dim"],
    num_posterior_samples: int,
    *,
    num_bins: int | None = None,
) -> Float[np.ndarray, " dim"]:
    """The p-value, per dimension, that SBC ranks in correlated clusters are uniform.

    Ranks of one cluster (the sites of one simulated data set) share its globals, so they are
    correlated even for the exact posterior: when the truth of one site's local lies high among its
    draws, the shared mean it was drawn around tends to, and so do its neighbours'. The Pearson test
    of `sbc_uniformity` on the pooled ranks then rejects an exact posterior far more often than its
    level (measured: 61% at level 0.05 for 100 data sets of 8 strongly pooled sites). Clusters are
    independent, so this test is a cluster-robust Wald test instead: with `c_i` the bin counts of
    cluster `i` and `p` the uniform bin shares, the deviations `d_i = c_i − size · p` (last bin
    dropped: they sum to 0) have mean 0 under uniformity; their total `D = Σ d_i` and covariance
    estimate `V = Σ d_i d_iᵀ` give `Dᵀ V⁻¹ D`, asymptotically χ² with `num_bins − 1` degrees of
    freedom as the number of clusters grows. With clusters of one rank it is close to Pearson's.

    **Arguments:**

    - `ranks`: SBC ranks, `(num_clusters, cluster_size, dim)`.
    - `num_posterior_samples`: L, the number of posterior samples each rank was taken among.
    - `num_bins`: the number of bins; default `num_clusters // 20` (the covariance is estimated
      from the clusters, so their number, not the number of ranks, bounds the bins), at least 2
      and at most L + 1.

    **Returns:** the p-values, `(dim,)`.
    """
    ranks = np.asarray(ranks)
    if ranks.ndim == 2:
        ranks = ranks[..., None]
    if ranks.ndim != 3:
        raise ValueError(f"clustered ranks have shape (num_clusters, cluster_size, dim), got {ranks.shape}.")
    num_clusters, cluster_size, dim = ranks.shape
    bins, probabilities = _rank_bins(ranks, num_posterior_samples, num_bins, num_clusters)
    counts = np.sum(bins[..., None] == np.arange(probabilities.size), axis=1)  # (clusters, dim, bins)
    deviations = (counts - cluster_size * probabilities)[..., :-1].astype(np.float64)
    p_values = np.empty(dim)
    for j in range(dim):
        d = deviations[:, j, :]
        total = d.sum(axis=0)
        covariance = d.T @ d
        # A bin no cluster ever deviates in carries no evidence; the pseudo-inverse drops it.
        statistic = float(total @ np.linalg.pinv(covariance) @ total)
        degrees = max(1, int(np.linalg.matrix_rank(covariance)))
        p_values[j] = _chi_square_survival(np.asarray(statistic), degrees)
    return p_values


def bonferroni(p_values: Float[ArrayLike, " num_tests"]) -> float:
    """The Bonferroni-combined p-value of several tests: min(1, num_tests · min p).

    Rejecting when it is below a level α keeps the chance of any false rejection below α, however
    the tests depend on each other.
    """
    p_values = np.asarray(p_values, dtype=np.float64).reshape(-1)
    return float(min(1.0, p_values.size * p_values.min()))


@dataclass(frozen=True)
class SBCResult:
    """Simulation-based calibration of an estimator.

    - `ranks`: the SBC ranks, `(num_truths, dim)`, integers in [0, L].
    - `p_values`: the chi-square uniformity p-value of each dimension, `(dim,)`.
    - `combined_p_value`: their Bonferroni combination.
    - `passed`: whether `combined_p_value` is at least the level the test was run at.
    """

    ranks: Int[np.ndarray, "num_truths dim"]
    p_values: Float[np.ndarray, " dim"]
    combined_p_value: float
    passed: bool


def sbc(
    truths: Float[ArrayLike, "num_truths dim"],
    samples: Float[ArrayLike, "num_truths num_posterior_samples dim"],
    *,
    num_bins: int | None = None,
    level: float = 0.05,
) -> SBCResult:
    """SBC ranks, per-dimension uniformity p-values and a Bonferroni verdict at `level`.

    The arguments are those of `sbc_ranks` and `sbc_uniformity`; `level` is the family-wise
    significance level of the combined verdict: a calibrated estimator fails with probability at
    most `level`.
    """
    truths, samples = _check_truths_and_samples(truths, samples)
    ranks = sbc_ranks(truths, samples)
    p_values = sbc_uniformity(ranks, samples.shape[1], num_bins=num_bins)
    combined = bonferroni(p_values)
    return SBCResult(ranks, p_values, combined, combined >= level)


def expected_coverage(
    truths: Float[ArrayLike, "num_truths dim"],
    samples: Float[ArrayLike, "num_truths num_posterior_samples dim"],
    levels: Float[ArrayLike, " num_levels"] = COVERAGE_LEVELS,
) -> Float[np.ndarray, "num_levels dim"]:
    """The empirical coverage of central marginal credible intervals, per level and dimension.

    A truth lies inside the central α-interval of its L marginal posterior samples when its
    mid-rank (r + ½) / (L + 1) — r from `sbc_ranks` — lies within α/2 of ½; for a calibrated
    estimator the expected coverage is α up to 1 / (L + 1). Coverage below α means the posterior
    is over-confident (too narrow or biased), above α under-confident.

    **Arguments:**

    - `truths`: the true parameters, `(num_truths, dim)` (or `(num_truths,)`).
    - `samples`: L posterior samples for each, `(num_truths, L, dim)` (or `(num_truths, L)`).
    - `levels`: the credibility levels α in (0, 1); default 0.05, 0.10, …, 0.95.

    **Returns:** the fraction of truths covered, `(num_levels, dim)`.
    """
    truths, samples = _check_truths_and_samples(truths, samples)
    levels = np.asarray(levels, dtype=np.float64).reshape(-1)
    if np.any((levels <= 0) | (levels >= 1)):
        raise ValueError(f"credibility levels lie strictly between 0 and 1, got {levels}.")
    mid_rank = (sbc_ranks(truths, samples) + 0.5) / (samples.shape[1] + 1)
    inside = np.abs(mid_rank - 0.5)[None] <= levels[:, None, None] / 2  # (levels, truths, dim)
    return np.mean(inside, axis=1)
