"""The LF surrogate ensemble: members trained apart, synthetic sites shared between them."""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hierdsl
from hierdsl.checkpoint import load
from hierdsl.runtime import lf
from hierdsl.runtime.tokens import TokenLayout
from tiny import TINY_LF, TINY_NET

MODEL = """
model Plain(n::Int = 4)
    m ~ Normal(0.0, 1.0)
    sites i in 1:n
        u ~ Normal(0.0, 1.0)
        observe x ~ Normal(u + m, 1.0)
    end
end
"""


def _constant_velocity(network, velocity: float):
    """The network with its head's weights zeroed: every target token's velocity is `velocity`."""
    network = eqx.tree_at(lambda n: n.head.weight, network, jnp.zeros_like(network.head.weight))
    return eqx.tree_at(lambda n: n.head.bias, network, jnp.full_like(network.head.bias, velocity))


def test_every_synthetic_data_set_mixes_the_members_at_shuffled_positions():
    """Two members whose draws are told apart by construction (standardised x near -40 or +40):
    each 4-site data set gets two sites from each, and a member's sites sit at every position."""
    model = hierdsl.compile(MODEL)
    lowered = model.lowered()
    layout1 = TokenLayout.from_ir(lowered.ir, max_sites=1)
    split1 = lf.surrogate_split(layout1, lowered)
    sims = lf.simulate_single_sites(lowered, jax.random.key(0), 64, lf.SimulationCounter())
    normaliser = lf.Normaliser.fit(lf.encode_batch(layout1, lf.flow_values_batch(lowered, sims, jax.random.key(1)), 1))
    base = TINY_NET.build(layout1, jax.random.key(2))
    members = (_constant_velocity(base, -40.0), _constant_velocity(base, 40.0))
    pool = lf.synthetic_pool(lowered, members, split1, normaliser, jax.random.key(3), 200, 4,
                             lf.SamplerConfig(num_steps=4))
    x = np.asarray(pool.site_values[:, :, TokenLayout.from_ir(lowered.ir, max_sites=4).slot("x").tokens][..., 0])
    assert np.all(np.abs(np.abs(x) - 40.0) < 6.0)  # each draw is one member's
    first = x < 0
    assert np.all(first.sum(axis=1) == 2)  # half the sites of every data set from each member
    share = first.mean(axis=0)  # per site position, over 200 data sets
    assert np.all(np.abs(share - 0.5) < 0.15)
    # The same network alone, and as a one-member tuple, give the same pool.
    alone = lf.synthetic_pool(lowered, members[0], split1, normaliser, jax.random.key(3), 8, 4, lf.SamplerConfig(num_steps=4))
    single = lf.synthetic_pool(lowered, members[:1], split1, normaliser, jax.random.key(3), 8, 4, lf.SamplerConfig(num_steps=4))
    np.testing.assert_array_equal(alone.site_values, single.site_values)


def test_an_ensemble_trains_distinct_members_and_survives_save_and_load(tmp_path):
    model = hierdsl.compile(MODEL)
    strategy = dataclasses.replace(TINY_LF, surrogates=3)
    estimator = hierdsl.fit(model, budget=120, key=jax.random.key(4), strategy=strategy)
    members = estimator.trained.surrogate
    assert len(members) == 3
    assert list(estimator.trained.stages) == ["surrogate", "surrogate_2", "surrogate_3", "posterior"]
    weights = [np.asarray(m.head.weight) for m in members]
    assert not np.allclose(weights[0], weights[1]) and not np.allclose(weights[1], weights[2])
    assert estimator.simulator_calls == 120  # the members share the simulations
    path = str(tmp_path / "ensemble.hsbe")
    estimator.save(path)
    again = load(path, model)
    assert again.strategy.surrogates == 3 and len(again.trained.surrogate) == 3
    data = {"x": np.array([0.5, -0.2, 1.0])}
    a = estimator.condition(data).sample(20, key=jax.random.key(5))
    b = again.condition(data).sample(20, key=jax.random.key(5))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    with pytest.raises(ValueError, match="ensemble size"):
        lf.LF(surrogates=0)
