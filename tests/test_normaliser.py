"""The token normaliser: per-token standardisation over real sites."""

import numpy as np
import jax.numpy as jnp

from hierdsl.runtime import lf
from hierdsl.runtime.tokens import Tokens


def _tokens(globals_, sites, mask):
    n, s, _ = sites.shape
    return Tokens(jnp.asarray(globals_, jnp.float32), jnp.asarray(sites, jnp.float32),
                  jnp.zeros((n, s, 0, 0), jnp.float32), jnp.asarray(mask, jnp.float32))


def test_light_tailed_tokens_get_their_mean_and_sd_and_padding_is_ignored():
    rng = np.random.default_rng(0)
    g = rng.normal(2.0, 3.0, (4000, 1))
    sites = rng.normal(-1.0, 0.5, (4000, 3, 2))
    mask = np.ones((4000, 3))
    mask[:, 2] = 0.0
    sites[:, 2] = 1e6  # garbage at padded sites must not count
    n = lf.Normaliser.fit(_tokens(g, sites, mask))
    np.testing.assert_allclose(n.global_mean, g.mean(0), rtol=1e-4)
    np.testing.assert_allclose(n.global_scale, g.std(0), rtol=1e-4)
    real = sites[:, :2].reshape(-1, 2)
    np.testing.assert_allclose(n.site_mean, real.mean(0), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(n.site_scale, real.std(0), rtol=1e-3)
    # Round trip.
    t = _tokens(g, sites, mask)
    back = n.inverse(n.forward(t))
    np.testing.assert_allclose(back.global_values, t.global_values, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(back.site_values[:, :2], t.site_values[:, :2], rtol=1e-5, atol=1e-5)
