"""Runtime stage: training — fit a flow-matching vector field with Optax, with early stopping.

Input: an initial vector field (an Equinox module) and either in-memory `FlowData` (`x1`, `context`,
`mask`, each with a leading example axis) or a pure-JAX generator `make_batch(key) -> FlowData` of
fresh synthetic examples. Output: a `TrainResult` holding the vector field with the lowest
validation loss, the per-epoch loss history, the best epoch and the number of optimiser steps.

The optimiser step (batch gather or generation, loss, gradient, Optax update) is the body of a
`lax.scan` over the epoch's batches, so a whole epoch is one `eqx.filter_jit` region: compiled in
the first epoch and reused by every later one, with no per-step dispatch from Python. The epoch loop
runs in Python and reads the training and validation losses back once per epoch.
"""

from collections.abc import Callable
from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from .flow import FlowData, draw_noise, flow_matching_loss, squared_error_sums

_DEFAULT_SIGMA_MIN = 1e-4


def default_optimiser(
    learning_rate: float = 1e-3,
    *,
    weight_decay: float = 1e-4,
    clip_norm: float = 1.0,
    warmup_steps: int = 0,
    total_steps: int | None = None,
) -> optax.GradientTransformation:
    """AdamW after global-norm gradient clipping.

    **Arguments:**

    - `learning_rate`: the (peak) learning rate.
    - `weight_decay`: AdamW's decoupled weight decay.
    - `clip_norm`: the global gradient norm is clipped to this.
    - `warmup_steps`: linear warm-up from 0 to `learning_rate` over this many steps.
    - `total_steps`: if given, cosine decay to 0 by this step (counting the warm-up); otherwise
      the rate stays constant after the warm-up, which suits early stopping of unknown length.
    """
    if total_steps is not None:
        schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, total_steps)
    elif warmup_steps > 0:
        schedule = optax.join_schedules(
            [
                optax.linear_schedule(0.0, learning_rate, warmup_steps),
                optax.constant_schedule(learning_rate),
            ],
            [warmup_steps],
        )
    else:
        schedule = learning_rate
    return optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.adamw(schedule, weight_decay=weight_decay),
    )


@dataclass(frozen=True)
class TrainResult:
    """The outcome of `train`.

    **Fields:**

    - `model`: the vector field from the epoch with the lowest validation loss (its averaged
      weights, with `ema_decay`).
    - `train_losses`: mean training loss per epoch, shape `(num_epochs,)`.
    - `val_losses`: validation loss per epoch, shape `(num_epochs,)`.
    - `best_epoch`: the (0-based) epoch `model` comes from.
    - `num_steps`: the number of optimiser steps taken.
    - `validation_key`: the key of the validation noise, fixed across epochs so that validation
      losses are comparable; `evaluate_loss(model, validation_data, validation_key)` reproduces
      `val_losses[best_epoch]` (with the same `sigma_min`).
    """

    model: PyTree
    train_losses: Float[np.ndarray, " num_epochs"]
    val_losses: Float[np.ndarray, " num_epochs"]
    best_epoch: int
    num_steps: int
    validation_key: PRNGKeyArray

    @property
    def best_val_loss(self) -> float:
        return float(self.val_losses[self.best_epoch])


def _take(data: FlowData, indices: Int[Array, " n"]) -> FlowData:
    return jax.tree.map(lambda leaf: leaf[indices], data)


class _State(eqx.Module):
    """Everything an optimiser step updates."""

    model: PyTree
    opt_state: optax.OptState
    key: PRNGKeyArray
    # The exponential moving average of the model's weights (`ema_decay`), or None.
    average: PyTree
    num_steps: Int[Array, ""]
    ema_decay: float | None = eqx.field(static=True)

    def averaged_model(self) -> PyTree:
        """The model with the averaged weights, or the model itself without averaging."""
        if self.ema_decay is None:
            return self.model
        return eqx.combine(self.average, eqx.filter(self.model, eqx.is_inexact_array, inverse=True))


def _average(state: _State, model: PyTree) -> PyTree:
    """The moving average after one more step that ended at `model`. Its decay starts low and
    rises to `ema_decay` ((1 + n) / (10 + n) at step n), so that the initial weights are soon
    forgotten."""
    if state.ema_decay is None:
        return None
    n = state.num_steps.astype(jnp.float32)
    decay = jnp.minimum(state.ema_decay, (1.0 + n) / (10.0 + n))
    params = eqx.filter(model, eqx.is_inexact_array)
    return jax.tree.map(lambda a, p: decay * a + (1.0 - decay) * p, state.average, params)


def _step(
    state: _State,
    batch_fn: Callable[[PRNGKeyArray], FlowData],
    optimiser: optax.GradientTransformation,
    sigma_min: float,
) -> tuple[_State, Float[Array, ""]]:
    """One optimiser step: draw the batch, then loss, gradient and Optax update (and the weights'
    moving average, if kept)."""
    key, batch_key, loss_key = jr.split(state.key, 3)
    loss, grads = eqx.filter_value_and_grad(flow_matching_loss)(
        state.model, batch_fn(batch_key), loss_key, sigma_min=sigma_min
    )
    params = eqx.filter(state.model, eqx.is_inexact_array)
    updates, opt_state = optimiser.update(grads, state.opt_state, params)
    model = eqx.apply_updates(state.model, updates)
    return _State(model, opt_state, key, _average(state, model), state.num_steps + 1, state.ema_decay), loss


def _scan_steps(
    step: Callable[[_State, PyTree], tuple[_State, Float[Array, ""]]],
    state: _State,
    inputs: PyTree,
    num_steps: int,
) -> tuple[_State, Float[Array, ""]]:
    """Runs `step` over `inputs` and returns the final state and the mean loss."""
    # The model may hold non-array leaves (activation functions); only arrays can be carried.
    dynamic, static = eqx.partition(state, eqx.is_array)

    def body(dynamic, step_input):
        new_state, loss = step(eqx.combine(dynamic, static), step_input)
        return eqx.filter(new_state, eqx.is_array), loss

    dynamic, losses = jax.lax.scan(body, dynamic, inputs, length=num_steps)
    return eqx.combine(dynamic, static), jnp.mean(losses)


@eqx.filter_jit
def _data_epoch(
    state: _State,
    data: FlowData,
    optimiser: optax.GradientTransformation,
    sigma_min: float,
    num_batches: int,
    batch_size: int,
) -> tuple[_State, Float[Array, ""]]:
    """One pass over shuffled in-memory `data`; the last incomplete minibatch is dropped."""
    key, order_key = jr.split(state.key)
    order = jr.permutation(order_key, data.num_examples)[: num_batches * batch_size]

    def step(state, batch_indices):
        return _step(state, lambda _: _take(data, batch_indices), optimiser, sigma_min)

    return _scan_steps(
        step, eqx.tree_at(lambda s: s.key, state, key), order.reshape(num_batches, batch_size),
        num_batches,
    )


@eqx.filter_jit
def _generator_epoch(
    state: _State,
    make_batch: Callable[[PRNGKeyArray], FlowData],
    optimiser: optax.GradientTransformation,
    sigma_min: float,
    num_batches: int,
) -> tuple[_State, Float[Array, ""]]:
    """`num_batches` optimiser steps, each on a fresh batch from `make_batch`."""

    def step(state, _):
        return _step(state, make_batch, optimiser, sigma_min)

    return _scan_steps(step, state, None, num_batches)


class _Chunks(eqx.Module):
    """A data set and its fixed noise, reshaped to `(num_chunks, chunk_size, ...)`."""

    data: FlowData
    x0: Float[Array, "num_chunks chunk_size dim"]
    t: Float[Array, "num_chunks chunk_size"]


@eqx.filter_jit
def _chunk(data: FlowData, key: PRNGKeyArray, chunk_size: int) -> _Chunks:
    """Draws noise for every example, then pads to a multiple of `chunk_size` and reshapes.

    The padding examples repeat the first example, which keeps their inputs finite, and get a zero
    mask, which removes them from the loss.
    """
    x0, t = draw_noise(key, data)
    num_examples = data.num_examples
    chunk_size = min(chunk_size, num_examples)
    num_chunks = -(-num_examples // chunk_size)
    padding = num_chunks * chunk_size - num_examples

    def pad(leaf):
        padded = jnp.concatenate([leaf, jnp.repeat(leaf[:1], padding, axis=0)])
        return padded.reshape(num_chunks, chunk_size, *leaf.shape[1:])

    chunks = jax.tree.map(pad, _Chunks(data, x0, t))
    mask = jnp.concatenate([data.mask, jnp.zeros((padding, *data.mask.shape[1:]), data.mask.dtype)])
    return eqx.tree_at(lambda c: c.data.mask, chunks, mask.reshape(chunks.data.mask.shape))


@eqx.filter_jit
def _chunked_loss(vf: PyTree, chunks: _Chunks, sigma_min: float) -> Float[Array, ""]:
    """The masked mean squared error over all chunks."""

    def accumulate(totals, chunk):
        total, count = squared_error_sums(vf, chunk.data, chunk.x0, chunk.t, sigma_min=sigma_min)
        return (totals[0] + total, totals[1] + count), None

    zero = jnp.zeros((), chunks.x0.dtype)
    (total, count), _ = jax.lax.scan(accumulate, (zero, zero), chunks)
    return total / count


def evaluate_loss(
    vf: PyTree,
    data: FlowData,
    key: PRNGKeyArray,
    *,
    sigma_min: float = _DEFAULT_SIGMA_MIN,
    batch_size: int = 256,
) -> Float[Array, ""]:
    """The flow-matching loss over a whole data set, evaluated in chunks of `batch_size`.

    The noise is drawn for the whole set at once, so the result does not depend on `batch_size`
    and equals `flow_matching_loss(vf, data, key)` up to rounding.
    """
    return _chunked_loss(vf, _chunk(data, key, batch_size), sigma_min)


@eqx.filter_jit
def _split(data: FlowData, key: PRNGKeyArray, num_validation: int) -> tuple[FlowData, FlowData]:
    """Splits `data` at random into training and validation sets."""
    order = jr.permutation(key, data.num_examples)
    return _take(data, order[num_validation:]), _take(data, order[:num_validation])


@eqx.filter_jit
def _draw_batches(
    make_batch: Callable[[PRNGKeyArray], FlowData], key: PRNGKeyArray, num_batches: int
) -> FlowData:
    """Concatenates `num_batches` batches drawn from `make_batch`."""
    batches = jax.vmap(make_batch)(jr.split(key, num_batches))
    return jax.tree.map(lambda leaf: leaf.reshape(-1, *leaf.shape[2:]), batches)


def train(
    vf: PyTree,
    data: FlowData | Callable[[PRNGKeyArray], FlowData],
    key: PRNGKeyArray,
    *,
    validation_data: FlowData | None = None,
    validation_fraction: float = 0.1,
    optimiser: optax.GradientTransformation = default_optimiser(),
    batch_size: int = 256,
    steps_per_epoch: int | None = None,
    num_validation_batches: int = 4,
    max_epochs: int = 1000,
    patience: int = 20,
    sigma_min: float = _DEFAULT_SIGMA_MIN,
    ema_decay: float | None = None,
    on_epoch: Callable[[int, float, float], None] | None = None,
) -> TrainResult:
    """Trains a vector field by minimising the flow-matching loss, with early stopping.

    **Arguments:**

    - `vf`: the initial vector field, an Equinox module `vf(t, x, context) -> dx/dt`.
    - `data`: either in-memory `FlowData`, shuffled into minibatches of `batch_size` every epoch
      (the last incomplete batch is dropped), or a generator `make_batch(key) -> FlowData` of fresh
      examples, a pure JAX function that runs inside the compiled epoch.
    - `key`: the key for shuffling, the validation split, and the flow-matching noise.
    - `validation_data`: explicit validation examples (e.g. counted in a simulation budget).
      Without it, `validation_fraction` of in-memory data is held out, or a generator is drawn
      `num_validation_batches` times, once.
    - `validation_fraction`: the share of in-memory `data` held out when `validation_data` is None.
    - `optimiser`: an Optax optimiser; see `default_optimiser`.
    - `batch_size`: the minibatch size for in-memory data, and the validation chunk size.
    - `steps_per_epoch`: the steps per epoch for a generator (required then); for in-memory data an
      epoch is one pass over the training examples.
    - `num_validation_batches`: generator batches drawn as validation data when none is given.
    - `max_epochs`: the most epochs to train.
    - `patience`: stop once the validation loss has not improved for this many epochs.
    - `sigma_min`: the width of the conditional path at t = 1.
    - `ema_decay`: if given (e.g. 0.999), an exponential moving average of the weights is kept
      alongside the optimiser's; validation, early stopping and the returned model use the
      averaged weights.
    - `on_epoch`: called after every epoch as `on_epoch(epoch, train_loss, val_loss)`.

    **Returns:** a `TrainResult` whose `model` has the lowest validation loss seen.
    """
    if patience < 1:
        raise ValueError(f"patience must be at least 1 epoch, got {patience}.")
    if ema_decay is not None and not 0.0 < ema_decay < 1.0:
        raise ValueError(f"ema_decay must lie strictly between 0 and 1, got {ema_decay}.")
    split_key, validation_key, state_key = jr.split(key, 3)
    generator = not isinstance(data, FlowData)
    if generator:
        if steps_per_epoch is None:
            raise ValueError(
                "Training from a generator has no natural epoch: pass steps_per_epoch=..."
            )
        if validation_data is None:
            validation_data = _draw_batches(data, split_key, num_validation_batches)
        num_batches = steps_per_epoch
    else:
        data = jax.tree.map(jnp.asarray, data)
        if validation_data is None:
            num_validation = round(validation_fraction * data.num_examples)
            if not 0 < num_validation < data.num_examples:
                raise ValueError(
                    f"validation_fraction={validation_fraction} of {data.num_examples} examples "
                    f"leaves {num_validation} for validation; both the training and the "
                    "validation set need at least one example. Change validation_fraction or "
                    "pass validation_data=..."
                )
            data, validation_data = _split(data, split_key, num_validation)
        batch_size = min(batch_size, data.num_examples)
        num_batches = data.num_examples // batch_size
    validation_data = jax.tree.map(jnp.asarray, validation_data)
    # Fixed validation noise makes validation losses comparable from epoch to epoch.
    validation_chunks = _chunk(validation_data, validation_key, batch_size)

    params = eqx.filter(vf, eqx.is_inexact_array)
    state = _State(vf, optimiser.init(params), state_key, params if ema_decay is not None else None,
                   jnp.zeros((), jnp.int32), ema_decay)
    best_model = vf
    best_val_loss = np.inf
    best_epoch = 0
    train_losses, val_losses = [], []
    for epoch in range(max_epochs):
        if generator:
            state, train_loss = _generator_epoch(state, data, optimiser, sigma_min, num_batches)
        else:
            state, train_loss = _data_epoch(
                state, data, optimiser, sigma_min, num_batches, batch_size
            )
        model = state.averaged_model()
        val_loss = _chunked_loss(model, validation_chunks, sigma_min)
        # The only host synchronisation of the epoch.
        train_loss, val_loss = np.asarray(jnp.stack([train_loss, val_loss]))
        if not np.isfinite(train_loss):
            raise FloatingPointError(
                f"The training loss became {train_loss} in epoch {epoch}; lower the learning "
                "rate or the gradient clipping norm of the optimiser."
            )
        train_losses.append(float(train_loss))
        val_losses.append(float(val_loss))
        if on_epoch is not None:
            on_epoch(epoch, float(train_loss), float(val_loss))
        if val_loss < best_val_loss:
            # Arrays are immutable, so keeping a reference is a snapshot of the weights.
            best_model, best_val_loss, best_epoch = model, val_loss, epoch
        elif epoch - best_epoch >= patience:
            break

    return TrainResult(
        model=best_model,
        train_losses=np.asarray(train_losses),
        val_losses=np.asarray(val_losses),
        best_epoch=best_epoch,
        num_steps=len(train_losses) * num_batches,
        validation_key=validation_key,
    )
