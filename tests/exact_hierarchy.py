"""Exact posterior draws of a conjugate hierarchical model, for calibration tests.

μ ~ N(0, 5²), θⱼ ~ N(μ, τ²), yⱼ ~ N(θⱼ, σⱼ²) with τ known and σⱼ ~ U(5, 20): the Eight Schools
shape with τ fixed, so the joint posterior is Gaussian and sampled exactly. Small τ pools the sites
strongly, so the SBC ranks of one data set's sites are correlated.
"""

from __future__ import annotations

import numpy as np


def hierarchical_posterior(num_sets: int, num_sites: int, num_draws: int, rng: np.random.Generator, *,
                           tau: float = 1.0, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """True effects `(num_sets, num_sites)` from the prior and exact posterior draws of them given
    data simulated from them, `(num_sets, num_draws, num_sites)`, shifted by `shift`."""
    mu = rng.normal(0.0, 5.0, num_sets)
    theta = mu[:, None] + tau * rng.standard_normal((num_sets, num_sites))
    sigma = rng.uniform(5.0, 20.0, (num_sets, num_sites))
    y = theta + sigma * rng.standard_normal((num_sets, num_sites))
    # μ | y: each yⱼ ~ N(μ, σⱼ² + τ²); then θⱼ | μ, yⱼ is conjugate.
    marginal = sigma**2 + tau**2
    precision = 1 / 25 + np.sum(1 / marginal, axis=1)
    mean = np.sum(y / marginal, axis=1) / precision
    mu_draws = mean[:, None] + rng.standard_normal((num_sets, num_draws)) / np.sqrt(precision)[:, None]
    site_precision = 1 / tau**2 + 1 / sigma**2
    site_mean = (mu_draws[..., None] / tau**2 + (y / sigma**2)[:, None, :]) / site_precision[:, None, :]
    draws = site_mean + shift + rng.standard_normal(site_mean.shape) / np.sqrt(site_precision)[:, None, :]
    return theta, draws
