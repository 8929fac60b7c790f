"""Tests for the diagnostics stage (`runtime/metrics.py`): C2ST, l-C2ST, SBC and expected coverage.

The calibration tests use two models with exact posteriors:

- the conjugate Gaussian θ ~ N(0, 1), x | θ ~ N(θ, 1), whose posterior is N(x / 2, 1 / 2);
- the Gaussian Linear benchmark task (σ ~ HalfNormal(1), μᵢ ~ N(0, 1), xᵢ ~ N(μᵢ, σ)), sampled
  exactly by `hierdsl.reference`.

An over-confident estimator keeps each posterior's sample mean and halves its spread. Every
classifier-based test reuses one shape per metric, so each compiles once.
"""

import jax.random as jr
import numpy as np
import pytest
from scipy import stats

from exact_hierarchy import hierarchical_posterior
from hierdsl.reference import sample_gaussian_linear
from hierdsl.runtime import metrics

LEVELS = np.asarray(metrics.COVERAGE_LEVELS)


def conjugate_posterior(x: np.ndarray, num: int, rng: np.random.Generator, shift: float = 0.0) -> np.ndarray:
    """`num` draws of N(x / 2 + shift, 1 / 2) for each x: shape `(*x.shape, num)`."""
    x = np.asarray(x, dtype=np.float64)
    return (x / 2 + shift)[..., None] + np.sqrt(0.5) * rng.standard_normal((*x.shape, num))


def shrink(samples: np.ndarray, factor: float) -> np.ndarray:
    """Scale each posterior's spread about its sample mean (samples `(num_truths, L, dim)`)."""
    mean = samples.mean(axis=1, keepdims=True)
    return mean + factor * (samples - mean)


# ----------------------------------------------------------------------------- C2ST


def test_c2st_same_and_different_distributions():
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((500, 2))
    same = rng.standard_normal((500, 2))
    # Unit Gaussians 5 apart: the Bayes accuracy is Φ(2.5) ≈ 0.994.
    shifted = same + np.array([5.0, 0.0])
    same_score = metrics.c2st(reference, same, jr.key(1))
    shifted_score = metrics.c2st(reference, shifted, jr.key(1))
    print(f"C2ST same {same_score:.3f}, shifted {shifted_score:.3f}")
    assert isinstance(same_score, float)
    assert same_score < 0.56
    assert shifted_score > 0.95
    assert metrics.c2st(reference, same, jr.key(1)) == same_score


def test_c2st_accepts_vectors_and_unequal_sizes():
    rng = np.random.default_rng(2)
    score = metrics.c2st(rng.standard_normal(300), 3 + rng.standard_normal(200), jr.key(3), num_steps=200)
    # Unit Gaussians 3 apart: the Bayes accuracy is Φ(1.5) ≈ 0.93.
    assert 0.85 < score <= 1.0
    with pytest.raises(ValueError, match="dimension"):
        metrics.c2st(np.zeros((10, 2)), np.zeros((10, 3)), jr.key(0))
    with pytest.raises(ValueError, match="NaN"):
        metrics.c2st(np.full((10, 2), np.nan), np.zeros((10, 2)), jr.key(0))


def test_flatten_draws_selects_and_orders_variables():
    draws = {"mu": np.arange(12.0).reshape(2, 3, 2), "sigma": np.array([7.0, 8.0])}
    assert metrics.flatten_draws(draws, ["sigma"]).shape == (2, 1)
    joint = metrics.flatten_draws(draws, ["sigma", "mu"])
    np.testing.assert_array_equal(joint[0], [7.0, 0, 1, 2, 3, 4, 5])
    with pytest.raises(KeyError, match="tau"):
        metrics.flatten_draws(draws, ["tau"])


# ----------------------------------------------------------------------------- l-C2ST

NUM_PAIRS, NUM_Q_SAMPLES, NUM_NULL, NUM_STEPS = 300, 300, 20, 200


def calibration_set(seed: int, shift: float = 0.0):
    """Joint draws of the conjugate model and one draw of q(θ | xᵢ) = N(xᵢ / 2 + shift, ½) each."""
    rng = np.random.default_rng(seed)
    theta = rng.standard_normal(NUM_PAIRS)
    x = theta + rng.standard_normal(NUM_PAIRS)
    return theta, x, conjugate_posterior(x, 1, rng, shift)[:, 0]


@pytest.mark.slow
def test_lc2st_p_values_are_uniform_for_the_exact_posterior():
    p_values, statistics = [], []
    for repetition in range(20):
        theta, x, theta_q = calibration_set(100 + repetition)
        rng = np.random.default_rng(200 + repetition)
        x0 = np.sqrt(2.0) * rng.standard_normal()  # a draw from the evidence N(0, 2)
        result = metrics.lc2st(
            theta, x, theta_q, conjugate_posterior(x0, NUM_Q_SAMPLES, rng), x0, jr.key(repetition),
            num_null=NUM_NULL, num_steps=NUM_STEPS,
        )
        assert result.null_statistics.shape == (NUM_NULL,)
        p_values.append(result.p_value)
        statistics.append(result.statistic)
    p_values = np.asarray(p_values)
    rejection_rate = np.mean(p_values <= 0.05)
    print(f"l-C2ST under H0: p-values {np.round(np.sort(p_values), 2)}, rejection rate {rejection_rate:.2f}, "
          f"mean statistic {np.mean(statistics):.4f}")
    # The permutation null is exact: each rejection has probability 1 / (NUM_NULL + 1) ≈ 0.048.
    assert rejection_rate <= 0.2
    assert 0.25 < p_values.mean() < 0.75  # a uniform mean of 20 has standard deviation 0.065


def test_lc2st_rejects_a_shifted_posterior_at_every_observation():
    theta, x, theta_q = calibration_set(300, shift=1.0)
    classifiers = metrics.fit_lc2st(theta, x, theta_q, jr.key(301), num_null=NUM_NULL, num_steps=NUM_STEPS)
    rng = np.random.default_rng(302)
    results = [
        classifiers.test(conjugate_posterior(x0, NUM_Q_SAMPLES, rng, shift=1.0), x0)
        for x0 in (-2.0, -1.0, 0.0, 1.0, 2.0)
    ]
    print("l-C2ST, q shifted by 1: " + ", ".join(f"T {r.statistic:.3f} p {r.p_value:.3f}" for r in results))
    assert sum(result.p_value < 0.05 for result in results) >= 4
    with pytest.raises(ValueError, match="dimension"):
        classifiers.test(np.zeros((NUM_Q_SAMPLES, 2)), 0.0)


# ----------------------------------------------------------------------------- SBC and coverage


def test_sbc_ranks_count_samples_below_the_truth():
    truths = np.array([[0.5, 10.0], [-1.0, 0.0]])
    samples = np.array([[[0.0, 1.0], [1.0, 2.0], [0.2, 3.0]], [[0.0, 0.0], [1.0, 1.0], [2.0, -1.0]]])
    np.testing.assert_array_equal(metrics.sbc_ranks(truths, samples), [[2, 3], [0, 1]])
    assert metrics.sbc_ranks(truths[:, 0], samples[:, :, 0]).shape == (2, 1)


def test_sbc_uniformity_matches_the_chi_square_distribution():
    # L + 1 = 7 possible ranks in 3 bins of 3, 2 and 2 ranks: exactly proportional counts give χ² = 0.
    assert float(metrics.sbc_uniformity(np.arange(7)[:, None], 6, num_bins=3)[0]) == pytest.approx(1.0)
    rng = np.random.default_rng(4)
    ranks = rng.integers(0, 100, size=(400, 3))
    ranks[:, 2] = np.minimum(ranks[:, 2], 80)  # a pile-up in the top bins
    p_values = np.asarray(metrics.sbc_uniformity(ranks, 99, num_bins=20))
    counts = np.stack([np.bincount(ranks[:, dim] // 5, minlength=20) for dim in range(3)])
    expected = stats.chisquare(counts, axis=1).pvalue
    np.testing.assert_allclose(p_values, expected, rtol=1e-10)
    assert p_values[2] < 1e-10
    assert metrics.bonferroni(p_values) == pytest.approx(min(1.0, 3 * p_values.min()))
    with pytest.raises(ValueError, match="num_posterior_samples"):
        metrics.sbc_uniformity(ranks, 50)


def hierarchical_ranks(num_sets: int, num_sites: int, num_draws: int, rng: np.random.Generator,
                       **options) -> np.ndarray:
    """SBC ranks `(num_sets, num_sites)` of the sites' effects under the exact posterior of
    `exact_hierarchy.hierarchical_posterior`."""
    theta, draws = hierarchical_posterior(num_sets, num_sites, num_draws, rng, **options)
    return np.sum(draws < theta[:, None, :], axis=1)


def test_clustered_sbc_holds_its_level_where_pooled_ranks_do_not():
    """The sites of one data set share its globals: pooled Pearson rejects the exact posterior most
    of the time, the cluster-robust test at about its level, and both reject a shifted one."""
    rng = np.random.default_rng(11)
    repeats, level = 60, 0.05
    pooled, clustered, shifted = [], [], []
    for _ in range(repeats):
        ranks = hierarchical_ranks(100, 8, 50, rng)
        pooled.append(metrics.sbc_uniformity(ranks.reshape(-1, 1), 50, num_bins=40)[0])
        clustered.append(metrics.sbc_uniformity_clustered(ranks[..., None], 50, num_bins=5)[0])
        shifted.append(metrics.sbc_uniformity_clustered(hierarchical_ranks(100, 8, 50, rng, shift=1.5), 50)[0])
    pooled, clustered, shifted = (np.mean(np.asarray(p) < level) for p in (pooled, clustered, shifted))
    print(f"rejection rate at {level}: pooled {pooled:.2f}, clustered {clustered:.2f}, shifted by 1.5: {shifted:.2f}")
    # 60 repeats: a rate of 0.05 exceeds 0.15 with probability < 0.5%.
    assert pooled > 0.4 and clustered <= 0.15 and shifted > 0.8


def test_clustered_sbc_with_one_rank_per_cluster_is_close_to_pearson():
    rng = np.random.default_rng(12)
    ranks = rng.integers(0, 100, size=(400, 1, 2))
    ranks[:, 0, 1] = np.minimum(ranks[:, 0, 1], 80)
    clustered = metrics.sbc_uniformity_clustered(ranks, 99, num_bins=20)
    pearson = np.asarray(metrics.sbc_uniformity(ranks[:, 0], 99, num_bins=20))
    assert clustered.shape == (2,)
    assert abs(clustered[0] - pearson[0]) < 0.15 and clustered[1] < 1e-10 and pearson[1] < 1e-10
    with pytest.raises(ValueError, match="num_posterior_samples"):
        metrics.sbc_uniformity_clustered(ranks, 50)


def gaussian_linear_sbc(num_truths: int, num_sites: int, num_posterior_samples: int, seed: int):
    """True (σ, μ₁, …) from the prior and exact posterior samples given data simulated from them."""
    rng = np.random.default_rng(seed)
    truths, samples = [], []
    for index in range(num_truths):
        sigma = abs(rng.standard_normal())
        mu = rng.standard_normal(num_sites)
        x = mu + sigma * rng.standard_normal(num_sites)
        draws = sample_gaussian_linear(x, num_posterior_samples, seed=seed * 100_000 + index)
        truths.append(np.concatenate([[sigma], mu]))
        samples.append(np.column_stack([draws["sigma"], draws["mu"]]))
    return np.asarray(truths), np.asarray(samples)


def test_sbc_and_coverage_on_the_gaussian_linear_task():
    truths, samples = gaussian_linear_sbc(num_truths=400, num_sites=3, num_posterior_samples=99, seed=5)
    # At level 0.01 the exact posterior fails with probability at most 1 %, whatever the seed.
    exact = metrics.sbc(truths, samples, level=0.01)
    exact_coverage = np.asarray(metrics.expected_coverage(truths, samples))
    over = metrics.sbc(truths, shrink(samples, 0.5))
    over_coverage = np.asarray(metrics.expected_coverage(truths, shrink(samples, 0.5)))
    print(f"Gaussian Linear SBC p-values (σ, μ₁, μ₂, μ₃): exact {np.asarray(exact.p_values)}, "
          f"combined {exact.combined_p_value:.3f}; sd × 0.5 {np.asarray(over.p_values)}")
    print(f"coverage error of the exact posterior: max {np.abs(exact_coverage - LEVELS[:, None]).max():.3f}; "
          f"sd × 0.5 at α = 0.5: {over_coverage[9]}")
    assert exact.ranks.shape == (400, 4)
    assert exact.passed
    assert not over.passed and over.combined_p_value < 1e-6
    # 400 truths: the coverage standard error is at most 0.025.
    np.testing.assert_allclose(exact_coverage, np.broadcast_to(LEVELS[:, None], (19, 4)), atol=0.1)
    # Halving a Gaussian's spread covers P(|Z| ≤ z_α / 2): 0.26 instead of 0.5 at α = 0.5.
    assert np.all(over_coverage[1:] < LEVELS[1:, None])
    assert np.all(over_coverage[9] < 0.4)


def test_expected_coverage_of_the_conjugate_posterior():
    rng = np.random.default_rng(6)
    theta = rng.standard_normal(2000)
    x = theta + rng.standard_normal(2000)
    samples = conjugate_posterior(x, 199, rng)
    coverage = np.asarray(metrics.expected_coverage(theta, samples))
    over = np.asarray(metrics.expected_coverage(theta, shrink(samples[:, :, None], 0.5)))
    under = np.asarray(metrics.expected_coverage(theta, shrink(samples[:, :, None], 2.0)))
    print(f"conjugate coverage error: max {np.abs(coverage[:, 0] - LEVELS).max():.3f}")
    assert coverage.shape == (19, 1)
    # 2000 truths: the coverage standard error is at most 0.011.
    np.testing.assert_allclose(coverage[:, 0], LEVELS, atol=0.05)
    assert np.all(over[:, 0] < LEVELS) and np.all(under[:, 0] > LEVELS)
    assert metrics.sbc(theta, samples).passed
    with pytest.raises(ValueError, match="between 0 and 1"):
        metrics.expected_coverage(theta, samples, levels=[0.5, 1.0])
