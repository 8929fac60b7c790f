"""Tests for the flow stage (`runtime/flow.py`) and its training loop (`runtime/train.py`).

The analytic tests use the exact flow-matching vector field of a diagonal Gaussian target
N(mean, scale²) for the linear path with σ_min = 0: x_t = (1 - t) x0 + t x1 has marginal
N(t·mean, (1 - t)² + t² scale²) and velocity
v(t, x) = mean + (t scale² - (1 - t)) / ((1 - t)² + t² scale²) · (x - t·mean),
so the flow's samples and log density at t = 1 must be exactly those of N(mean, scale²).
"""

import collections
import time

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from scipy import stats

from hierdsl.runtime import flow, lf, metrics, train

# Python side effects run only while JAX traces, so these count traces, not calls.
TRACES: collections.Counter = collections.Counter()

MEAN = jnp.array([1.0, -2.0, 0.5, 3.0])
SCALE = jnp.array([0.5, 2.0, 1.3, 0.7])
GAUSSIAN = {"mean": MEAN, "scale": SCALE}


class GaussianField(eqx.Module):
    """The exact flow-matching vector field of N(context["mean"], context["scale"]²)."""

    def __call__(self, t, x, context):
        mean, scale = context["mean"], context["scale"]
        variance = (1 - t) ** 2 + t**2 * scale**2
        return mean + (t * scale**2 - (1 - t)) / variance * (x - t * mean)


class CountingField(eqx.Module):
    """Wraps a vector field and counts how often it is traced under `label`."""

    inner: eqx.Module
    label: str = eqx.field(static=True)

    def __call__(self, t, x, context):
        TRACES[self.label] += 1
        return self.inner(t, x, context)


def mlp_field(*args, **kwargs):
    """`MLPVectorField` initialised in one compiled call rather than op by op."""
    return eqx.filter_jit(flow.MLPVectorField)(*args, **kwargs)


def normal(seed, shape):
    """Test data from NumPy: no JAX random-number kernels to compile."""
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def gaussian_log_density(x, context=GAUSSIAN, mask=None):
    mean, scale = np.asarray(context["mean"]), np.asarray(context["scale"])
    terms = stats.norm.logpdf(np.asarray(x), mean, scale)
    return np.sum(terms if mask is None else terms * np.asarray(mask), axis=-1)


# One field and one shape for every analytic log-density call, so that they share compiled code.
ANALYTIC = CountingField(GaussianField(), "analytic")
NUM_POINTS = 256


def test_exact_log_prob_matches_gaussian_without_retracing():
    other = {"mean": -MEAN, "scale": 2 * SCALE}
    for context in [GAUSSIAN, other]:
        xs = context["mean"] + context["scale"] * normal(0, (NUM_POINTS, 4))
        log_probs = flow.batch_log_prob(ANALYTIC, xs, context, jnp.ones(4))
        expected = gaussian_log_density(xs, context)
        np.testing.assert_allclose(log_probs, expected, rtol=1e-4, atol=1e-3)
        if context is GAUSSIAN:
            traces = TRACES["analytic"]
    # A new context of the same shape reuses the compiled function.
    assert TRACES["analytic"] == traces > 0


def test_padding_does_not_change_log_prob():
    mask = jnp.array([1.0, 1.0, 0.0, 1.0])
    x = jnp.array([0.3, -1.0, 0.0, 2.5])
    # Half the points carry junk in the padded dimension.
    xs = jnp.tile(x, (NUM_POINTS, 1)).at[::2, 2].set(50.0)
    log_probs = flow.batch_log_prob(ANALYTIC, xs, GAUSSIAN, mask)
    np.testing.assert_allclose(log_probs, gaussian_log_density(x, mask=mask), atol=1e-3)


def test_hutchinson_log_prob_is_unbiased():
    mask = jnp.array([1.0, 1.0, 0.0, 1.0])
    x = jnp.array([0.3, -1.0, 0.0, 2.5])
    xs = jnp.tile(x, (NUM_POINTS, 1)).at[::2, 2].set(50.0)
    estimates = flow.batch_log_prob(
        ANALYTIC, xs, GAUSSIAN, mask, key=jr.key(1), divergence="hutchinson", probe="gaussian"
    )
    estimates = np.asarray(estimates)
    standard_error = estimates.std() / np.sqrt(NUM_POINTS)
    # The estimates vary with the probes; their mean agrees within 4 standard errors.
    assert estimates.std() > 0.1
    assert abs(estimates.mean() - gaussian_log_density(x, mask=mask)) < 4 * standard_error


def test_sampling_matches_gaussian_moments():
    samples = flow.sample(ANALYTIC, GAUSSIAN, jnp.ones(4), jr.key(3), 4000)
    assert samples.shape == (4000, 4)
    np.testing.assert_array_less(np.abs(samples.mean(0) - MEAN), 4 * SCALE / np.sqrt(4000))
    np.testing.assert_allclose(samples.std(0), SCALE, rtol=0.05)


def test_sampling_is_deterministic_and_keeps_padding_zero():
    mask = jnp.array([1.0, 1.0, 0.0, 1.0])
    # The field's velocity in the padded dimension is non-zero; the mask must stop it.
    samples = flow.sample(ANALYTIC, GAUSSIAN, mask, jr.key(4), 4000)
    assert np.all(np.asarray(samples[:, 2]) == 0.0)
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(samples.std(0)[real], SCALE[real], rtol=0.05)
    np.testing.assert_array_equal(samples, flow.sample(ANALYTIC, GAUSSIAN, mask, jr.key(4), 4000))


def test_fixed_step_solver():
    options = {"solver": diffrax.Heun(), "stepsize_controller": diffrax.ConstantStepSize()}
    samples = flow.sample(ANALYTIC, GAUSSIAN, jnp.ones(4), jr.key(5), 4000, num_steps=50, **options)
    np.testing.assert_allclose(samples.std(0), SCALE, rtol=0.05)
    with pytest.raises(ValueError, match="num_steps"):
        flow.sample(ANALYTIC, GAUSSIAN, jnp.ones(4), jr.key(5), 4000, **options)


NARROW = {"mean": MEAN, "scale": jnp.array([0.02, 0.05, 0.2, 1.0])}


def test_steps_crowded_near_the_data_resolve_narrow_targets():
    """16 even Heun steps widen a target 0.02 wide by 80%; t = 1 − (1 − k/16)² leaves 8%."""
    options = {"solver": diffrax.Heun(), "stepsize_controller": diffrax.ConstantStepSize(), "num_steps": 16}
    even = flow.sample(ANALYTIC, NARROW, jnp.ones(4), jr.key(5), 4000, **options)
    crowded = flow.sample(ANALYTIC, NARROW, jnp.ones(4), jr.key(5), 4000, time_power=2.0, **options)
    assert float(even.std(0)[0] / NARROW["scale"][0]) > 1.5
    np.testing.assert_allclose(crowded.std(0), NARROW["scale"], rtol=0.1)
    # The log density integrates backwards (t = 1 → 0) on the same crowded grid.
    xs = NARROW["mean"] + NARROW["scale"] * normal(0, (NUM_POINTS, 4))
    expected = gaussian_log_density(xs, NARROW)
    crowded_lp = flow.batch_log_prob(ANALYTIC, xs, NARROW, jnp.ones(4), time_power=2.0, **options)
    even_lp = flow.batch_log_prob(ANALYTIC, xs, NARROW, jnp.ones(4), **options)
    crowded_error = np.abs(np.asarray(crowded_lp) - expected).mean()
    assert crowded_error < 0.2 < np.abs(np.asarray(even_lp) - expected).mean()
    with pytest.raises(ValueError, match="time_power"):
        flow.sample(ANALYTIC, NARROW, jnp.ones(4), jr.key(5), 4, time_power=0.0, **options)


jitted_loss = eqx.filter_jit(flow.flow_matching_loss)


def _padded_batch():
    mask = jnp.tile(jnp.array([1.0, 1.0, 0.0, 1.0]), (32, 1))
    vf = mlp_field(4, 2, width_size=16, depth=2, key=jr.key(7))
    return vf, flow.FlowData(normal(6, (32, 4)) * mask, normal(8, (32, 2)), mask)


class JunkPaddingField(eqx.Module):
    """Adds a large velocity in the padded dimension 2."""

    inner: eqx.Module

    def __call__(self, t, x, context):
        return self.inner(t, x, context).at[2].add(100.0)


def test_padding_does_not_change_loss():
    vf, data = _padded_batch()
    junk_targets = eqx.tree_at(lambda d: d.x1, data, data.x1 + 100.0 * (1 - data.mask))
    loss = jitted_loss(vf, data, jr.key(9))
    assert jitted_loss(vf, junk_targets, jr.key(9)) == loss
    assert jitted_loss(JunkPaddingField(vf), data, jr.key(9)) == loss


def test_evaluate_loss_matches_batch_loss_whatever_the_chunking():
    vf, data = _padded_batch()
    # Chunks of 10 need padding to 40 examples; padded examples must not count.
    np.testing.assert_allclose(
        train.evaluate_loss(vf, data, jr.key(10), batch_size=10),
        jitted_loss(vf, data, jr.key(10)),
        rtol=1e-5,
    )


@pytest.mark.parametrize(
    "options",
    [{}, {"warmup_steps": 10}, {"total_steps": 100}, {"warmup_steps": 10, "total_steps": 100}],
)
def test_default_optimiser_updates_are_finite(options):
    params = {"weight": jnp.ones((3, 2)), "bias": jnp.zeros(2)}
    optimiser = train.default_optimiser(1e-2, **options)
    state = optimiser.init(params)
    for _ in range(12):
        grads = jax.tree.map(lambda leaf: 1e3 * jnp.ones_like(leaf), params)
        updates, state = optimiser.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(params))
    # Every schedule has moved the parameters within 12 steps.
    assert float(params["bias"][0]) < 0


def test_readable_errors():
    with pytest.raises(ValueError, match="needs a key"):
        flow.log_prob(GaussianField(), MEAN, GAUSSIAN, jnp.ones(4), divergence="hutchinson")
    with pytest.raises(ValueError, match="Unknown divergence"):
        flow.log_prob(GaussianField(), MEAN, GAUSSIAN, jnp.ones(4), divergence="trace")
    with pytest.raises(ValueError, match="one mask entry per target entry"):
        flow.FlowData(jnp.zeros((3, 2)), jnp.zeros((3, 1)), jnp.ones((3, 3)))
    with pytest.raises(ValueError, match="leading example axis"):
        flow.FlowData(jnp.zeros((3, 2)), {"obs": jnp.zeros((4, 1))}, jnp.ones((3, 2)))
    with pytest.raises(ValueError, match="context_size=3"):
        # Traced abstractly: the check is on static shapes and needs no compilation.
        jax.eval_shape(
            lambda: flow.MLPVectorField(2, 1, key=jr.key(0))(0.0, jnp.zeros(2), jnp.zeros(3))
        )


def test_sampling_compiles_once():
    vf = CountingField(mlp_field(2, 2, width_size=32, depth=2, key=jr.key(14)), "sample")
    timings = []
    for context in [jnp.array([0.0, 1.0]), jnp.array([2.0, -1.0])]:
        start = time.perf_counter()
        flow.sample(vf, context, jnp.ones(2), jr.key(15), 2000).block_until_ready()
        timings.append(time.perf_counter() - start)
        if len(timings) == 1:
            traces = TRACES["sample"]
    assert TRACES["sample"] == traces > 0
    print(f"sample(2000): first call {timings[0]:.2f} s, second call {timings[1]:.3f} s")


def _identity_data(context, sign):
    """Targets `sign · context`: sign = -1 validation data is unlike the sign = +1 training data."""
    return flow.FlowData(sign * context, context, jnp.ones_like(context))


def test_early_stopping_restores_best_weights():
    vf = CountingField(mlp_field(1, 1, width_size=32, depth=2, key=jr.key(17)), "train")
    validation_data = _identity_data(2.0 * normal(18, (128, 1)), -1.0)
    traces = []
    result = train.train(
        vf,
        _identity_data(2.0 * normal(19, (256, 1)), 1.0),
        jr.key(20),
        validation_data=validation_data,
        optimiser=train.default_optimiser(3e-3),
        batch_size=64,
        max_epochs=200,
        patience=5,
        on_epoch=lambda epoch, train_loss, val_loss: traces.append(TRACES["train"]),
    )
    num_epochs = len(result.train_losses)
    assert result.val_losses.shape == result.train_losses.shape == (num_epochs,)
    assert result.num_steps == num_epochs * (256 // 64)
    # Learning the training relation makes the opposite validation relation worse: stop early.
    assert num_epochs == result.best_epoch + 5 + 1 < 200
    assert result.val_losses[-1] > result.best_val_loss == result.val_losses.min()
    np.testing.assert_allclose(
        train.evaluate_loss(result.model, validation_data, result.validation_key, batch_size=64),
        result.best_val_loss,
        rtol=1e-5,
    )
    # The step and the validation loss are traced in the first epoch and never again.
    assert traces[0] > 0 and traces == [traces[0]] * num_epochs


def test_training_from_a_generator():
    def make_batch(key):
        return _identity_data(2.0 * jr.normal(key, (64, 1)), 1.0)

    # Same structure and validation shapes as above, so the validation loss may be compiled already.
    vf = CountingField(mlp_field(1, 1, width_size=32, depth=2, key=jr.key(21)), "train")
    traces = []
    result = train.train(
        vf,
        make_batch,
        jr.key(22),
        optimiser=optax.adam(3e-3),
        batch_size=64,
        steps_per_epoch=25,
        num_validation_batches=2,
        max_epochs=8,
        on_epoch=lambda epoch, train_loss, val_loss: traces.append(TRACES["train"]),
    )
    assert result.num_steps == 8 * 25
    assert result.best_val_loss < 0.5 * result.val_losses[0]
    assert traces == [traces[0]] * 8
    with pytest.raises(ValueError, match="steps_per_epoch"):
        train.train(vf, make_batch, jr.key(22))


def test_weight_averaging_is_the_moving_average_of_the_iterates():
    """With `ema_decay`, the returned model is the moving average of the optimiser's iterates
    (decay min(d, (1 + n) / (10 + n)) at step n), and the validation loss is that model's."""

    def make_batch(key):
        return _identity_data(2.0 * jr.normal(key, (32, 1)), 1.0)

    vf = mlp_field(1, 1, width_size=16, depth=1, key=jr.key(40))
    validation = _identity_data(normal(41, (64, 1)), 1.0)

    def run(steps, ema_decay=None):
        return train.train(vf, make_batch, jr.key(42), validation_data=validation, optimiser=optax.sgd(0.05),
                           steps_per_epoch=steps, max_epochs=1, ema_decay=ema_decay)

    num_steps, decay = 4, 0.5
    # The training trajectory does not depend on the averaging: iterate n is the last (and only
    # epoch's) model of a run of n steps.
    iterates = [run(n).model for n in range(1, num_steps + 1)]
    expected = eqx.filter(vf, eqx.is_inexact_array)
    for n, iterate in enumerate(iterates):
        d = min(decay, (1 + n) / (10 + n))
        expected = jax.tree.map(lambda a, p: d * a + (1 - d) * p, expected, eqx.filter(iterate, eqx.is_inexact_array))
    averaged = run(num_steps, decay)
    for got, want in zip(jax.tree.leaves(eqx.filter(averaged.model, eqx.is_inexact_array)),
                         jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(
        eqx.filter(iterates[-1], eqx.is_inexact_array))))
    np.testing.assert_allclose(
        train.evaluate_loss(averaged.model, validation, averaged.validation_key), averaged.best_val_loss, rtol=1e-5)
    with pytest.raises(ValueError, match="ema_decay"):
        run(1, 1.0)
    with pytest.raises(ValueError, match="ema_decay"):
        lf.TrainConfig(ema_decay=0.0)


@pytest.mark.slow
def test_c2st_separates_shifted_gaussians():
    reference = normal(23, (1000, 2))
    same = normal(24, (1000, 2))
    # The Bayes accuracy for unit Gaussians two standard deviations apart is Φ(1) ≈ 0.84.
    assert metrics.c2st(reference, same, jr.key(25)) < 0.55
    assert metrics.c2st(reference, same + jnp.array([2.0, 0.0]), jr.key(25)) > 0.8


@pytest.mark.slow
def test_conjugate_gaussian_posterior():
    """θ ~ N(0, I₂), x ~ N(θ, 0.5² I₂): the posterior is N(0.8 x, 0.2 I₂)."""
    num_simulations = 4000
    theta = normal(26, (num_simulations, 2))
    x = theta + 0.5 * normal(27, (num_simulations, 2))
    vf = mlp_field(2, 2, width_size=64, depth=3, key=jr.key(28))
    result = train.train(
        vf,
        flow.FlowData(theta, x, jnp.ones_like(theta)),
        jr.key(29),
        batch_size=128,
        max_epochs=400,
        patience=30,
    )
    print(f"trained {len(result.train_losses)} epochs, best {result.best_epoch}")
    for index, observation in enumerate([[0.0, 0.0], [1.0, -0.5], [2.0, 1.5]]):
        observation = jnp.array(observation)
        mean, std = 0.8 * observation, np.sqrt(0.2)
        reference = mean + std * normal(30 + index, (1000, 2))
        samples = flow.sample(result.model, observation, jnp.ones(2), jr.key(40 + index), 1000)
        accuracy = metrics.c2st(reference, samples, jr.key(50 + index))
        points = reference[:500]
        log_probs = flow.batch_log_prob(result.model, points, observation, jnp.ones(2))
        exact = stats.norm.logpdf(np.asarray(points), np.asarray(mean), std).sum(-1)
        error = abs(float(log_probs.mean()) - exact.mean())
        # One Rademacher probe per point: unbiased for the flow's own (exact-divergence) density.
        hutchinson = flow.batch_log_prob(
            result.model, points, observation, jnp.ones(2), key=jr.key(60 + index),
            divergence="hutchinson",
        )
        hutchinson_error = abs(float(hutchinson.mean()) - float(log_probs.mean()))
        print(
            f"x = {observation}: C2ST {float(accuracy):.3f}, mean log density error {error:.3f}, "
            f"Hutchinson vs exact divergence {hutchinson_error:.3f}"
        )
        assert accuracy < 0.6
        assert error < 0.15
        assert hutchinson_error < 0.05
