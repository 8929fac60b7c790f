"""How the posterior network's training examples pick their site counts."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hierdsl
from hierdsl.checkpoint import _strategy_from_json, _strategy_json
from hierdsl.runtime import lf
from hierdsl.runtime.tokens import TokenLayout, Tokens

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")
MAX_SITES = 8


def _generator(fraction, min_sites=1, batch=8000):
    model = hierdsl.compile(os.path.join(EXAMPLES, "gaussian_linear.hsbi"), args={"n_sites": MAX_SITES})
    lowered = model.lowered()
    layout = TokenLayout.from_ir(model.ir, max_sites=MAX_SITES)
    split = lf.posterior_split(layout, lowered)
    pool = 50
    rng = np.random.default_rng(0)
    tokens = Tokens(jnp.asarray(rng.normal(size=(pool, layout.num_global_tokens)), jnp.float32),
                    jnp.asarray(rng.normal(size=(pool, MAX_SITES, layout.tokens_per_site)), jnp.float32),
                    jnp.zeros((pool, MAX_SITES, layout.tokens_per_site, 0), jnp.float32),
                    jnp.ones((pool, MAX_SITES), jnp.float32))
    return lf.SiteSubsets(tokens, layout, split, batch, min_sites, fraction)


def _counts(generator):
    data = generator(jax.random.key(0))
    # Each example's real sites are a prefix; count them from the context's site mask.
    mask = np.asarray(data.context.site_mask)
    assert np.all(np.diff(mask, axis=1) <= 0)
    return mask.sum(1).astype(int)


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_a_share_of_examples_keeps_all_sites_and_the_rest_are_uniform(fraction):
    counts = _counts(_generator(fraction, min_sites=2))
    n = len(counts)
    assert counts.min() >= 2 and counts.max() == MAX_SITES
    expected_full = fraction + (1 - fraction) / (MAX_SITES - 1)
    share_full = np.mean(counts == MAX_SITES)
    # Binomial sd of a share over 8,000 draws is at most 0.0056.
    assert abs(share_full - expected_full) < 0.02, (share_full, expected_full)
    if fraction < 1:
        others = np.bincount(counts[counts < MAX_SITES], minlength=MAX_SITES)[2:MAX_SITES]
        per_count = (1 - fraction) / (MAX_SITES - 1) * n
        np.testing.assert_allclose(others, per_count, rtol=0.15)


def test_the_fraction_is_checked_and_kept_in_the_estimator_file():
    with pytest.raises(ValueError, match="all_sites_fraction"):
        lf.LF(all_sites_fraction=1.5)
    with pytest.raises(ValueError, match="all_sites_fraction"):
        lf.Direct(all_sites_fraction=-0.1)
    strategy = lf.LF(all_sites_fraction=0.25)
    assert _strategy_from_json(_strategy_json(strategy)) == strategy
    assert lf.LF().all_sites_fraction == lf.ALL_SITES_FRACTION == 0.5
    # A file written before the setting existed was trained with uniformly drawn site counts.
    old = _strategy_json(lf.Direct())
    del old["all_sites_fraction"]
    assert _strategy_from_json(old) == dataclasses.replace(lf.Direct(), all_sites_fraction=0.0)


def test_the_sampler_spacing_is_kept_in_the_estimator_file():
    strategy = lf.LF(sampler=lf.SamplerConfig(num_steps=8, time_power=3.0))
    assert _strategy_from_json(_strategy_json(strategy)) == strategy
    assert lf.SamplerConfig().time_power == 2.0
    with pytest.raises(ValueError, match="time_power"):
        lf.SamplerConfig(time_power=0.0)
    with pytest.raises(ValueError, match="solver"):
        lf.SamplerConfig(solver="rk4")
    # A file written before the setting existed synthesised its data with evenly spaced steps.
    old = _strategy_json(lf.LF())
    del old["sampler"]["time_power"]
    assert _strategy_from_json(old).sampler == lf.SamplerConfig(time_power=1.0)
