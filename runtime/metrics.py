"""Runtime stage: diagnostics — the classifier two-sample test (C2ST).

Input: reference samples (e.g. from an exact or NUTS posterior) and candidate samples (e.g. from a
trained flow). Output: the cross-validated accuracy of a classifier telling them apart; 0.5 means
indistinguishable, 1.0 disjoint.

The protocol follows sbibm: both sample sets are z-scored with the reference's mean and standard
deviation; the classifier is an MLP with two hidden ReLU layers of `10 · dim` units trained with
Adam; the score is the mean held-out accuracy over 5 stratified folds. All folds train at once
(vmapped), full-batch, for a fixed number of steps, inside one compiled function.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
from jaxtyping import Array, Float, PRNGKeyArray


def _init_layer(key: PRNGKeyArray, in_size: int, out_size: int) -> dict[str, Array]:
    bound = 1 / math.sqrt(in_size)
    return {
        "weight": jr.uniform(key, (in_size, out_size), minval=-bound, maxval=bound),
        "bias": jnp.zeros(out_size),
    }


def _logits(params: list[dict[str, Array]], x: Float[Array, "n dim"]) -> Float[Array, " n"]:
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["weight"] + layer["bias"])
    return (x @ params[-1]["weight"] + params[-1]["bias"])[:, 0]


@eqx.filter_jit
def c2st(
    reference: Float[Array, "num_samples dim"],
    samples: Float[Array, "num_samples dim"],
    key: PRNGKeyArray,
    *,
    num_folds: int = 5,
    num_steps: int = 1000,
    learning_rate: float = 1e-2,
) -> Float[Array, ""]:
    """The C2ST accuracy of `samples` against `reference`.

    **Arguments:**

    - `reference`: the reference samples; their mean and standard deviation z-score both sets.
    - `samples`: the candidate samples, as many as the reference.
    - `key`: the key for the fold assignment and the classifier initialisation.
    - `num_folds`: the number of cross-validation folds.
    - `num_steps`: full-batch Adam steps per fold.
    - `learning_rate`: Adam's learning rate.

    **Returns:** the mean held-out accuracy over the folds, a scalar in [0, 1].
    """
    if reference.shape != samples.shape:
        raise ValueError(
            f"c2st needs two sample sets of equal shape (the accuracy of a guess is then 0.5), "
            f"got {reference.shape} and {samples.shape}; subsample the larger set."
        )
    num_samples, dim = reference.shape
    mean = jnp.mean(reference, axis=0)
    std = jnp.std(reference, axis=0)
    inputs = (jnp.concatenate([reference, samples]) - mean) / std
    labels = jnp.concatenate([jnp.zeros(num_samples), jnp.ones(num_samples)])

    fold_key, init_key = jr.split(key)
    # Stratified folds: each class is spread evenly over the folds.
    fold_of_class = jnp.arange(num_samples) % num_folds
    folds = jnp.concatenate(
        [jr.permutation(k, fold_of_class) for k in jr.split(fold_key, 2)]
    )

    width = 10 * dim
    sizes = [dim, width, width, 1]
    optimiser = optax.adam(learning_rate)

    def fold_accuracy(fold, fold_init_key):
        train_weight = (folds != fold).astype(inputs.dtype)
        layer_keys = jr.split(fold_init_key, len(sizes) - 1)
        shapes = zip(layer_keys, sizes[:-1], sizes[1:], strict=True)
        params = [_init_layer(layer_key, n_in, n_out) for layer_key, n_in, n_out in shapes]

        def loss(params):
            losses = optax.sigmoid_binary_cross_entropy(_logits(params, inputs), labels)
            return jnp.sum(train_weight * losses) / jnp.sum(train_weight)

        def step(carry, _):
            params, opt_state = carry
            grads = jax.grad(loss)(params)
            updates, opt_state = optimiser.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        (params, _), _ = jax.lax.scan(
            step, (params, optimiser.init(params)), None, length=num_steps
        )
        correct = (_logits(params, inputs) > 0) == (labels > 0.5)
        test_weight = 1 - train_weight
        return jnp.sum(test_weight * correct) / jnp.sum(test_weight)

    accuracies = jax.vmap(fold_accuracy)(jnp.arange(num_folds), jr.split(init_key, num_folds))
    return jnp.mean(accuracies)
