"""The token normaliser: per-token standardisation over real sites."""

import numpy as np
import jax.numpy as jnp
import pytest

from hierdsl.runtime import lf
from hierdsl.runtime.tokens import TokenLayout, Tokens, target_mask


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


def test_heavy_tailed_tokens_are_centred_robustly_and_squashed():
    """A half-Cauchy scale mixture (Eight Schools' school effects) is squashed with its median and
    robust sd; Gaussian and skewed-count tokens (SIR's early-day prevalences) stay affine."""
    rng = np.random.default_rng(1)
    n = 2000
    tau = np.abs(5.0 * rng.standard_cauchy(n))
    effect = rng.normal(0.0, 1.0, n) * tau
    counts = rng.binomial(1000, rng.lognormal(np.log(2e-3), 1.0, n).clip(0, 1))
    g = np.stack([rng.normal(size=n), effect], axis=1)
    sites = np.stack([rng.normal(3.0, 2.0, n), counts.astype(float), effect + 10 * rng.normal(size=n)], axis=1)[:, None]
    tokens = _tokens(g, sites, np.ones((n, 1)))
    norm = lf.Normaliser.fit(tokens)
    np.testing.assert_array_equal(norm.global_squash, [0.0, 1.0])
    np.testing.assert_array_equal(norm.site_squash, [0.0, 0.0, 1.0])
    q1, median, q3 = np.quantile(effect, [0.25, 0.5, 0.75])
    np.testing.assert_allclose(norm.global_mean[1], median, rtol=1e-5)
    np.testing.assert_allclose(norm.global_scale[1], (q3 - q1) / 1.349, rtol=1e-5)
    np.testing.assert_allclose(norm.global_scale[0], g[:, 0].std(), rtol=1e-4)  # affine tokens as before
    z = norm.forward(tokens)
    # The bulk keeps unit-order spread; the tails grow only logarithmically.
    assert 0.5 < np.std(np.asarray(z.global_values[:, 1])) < 3 and np.max(np.abs(z.global_values[:, 1])) < 15
    back = norm.inverse(z)
    np.testing.assert_allclose(back.global_values, tokens.global_values, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(back.site_values, tokens.site_values, rtol=1e-4, atol=1e-3)


def test_target_log_jacobian_is_the_inverse_maps_log_determinant():
    rng = np.random.default_rng(2)
    n = 2000
    heavy = rng.standard_cauchy((n, 1))
    g = np.concatenate([heavy, rng.normal(size=(n, 1))], axis=1)
    sites = np.concatenate([rng.standard_cauchy((n, 3, 1)), rng.normal(size=(n, 3, 1))], axis=2)
    mask = np.ones((n, 3))
    norm = lf.Normaliser.fit(_tokens(g, sites, mask))
    assert float(norm.global_squash[0]) == 1.0 and float(norm.site_squash[0]) == 1.0
    layout = _layout()
    split = layout.split(target=("a", "b", "c"), conditioning=("d",))
    _assert_log_jacobian_matches(norm, layout, split, [1.7, -0.4])


def _assert_log_jacobian_matches(norm, layout, split, global_values):
    """`target_log_jacobian` equals log |det| of `inverse`'s Jacobian over the real targets, at one
    example of three sites (the third padding)."""
    import jax

    site_mask = jnp.asarray([1.0, 1.0, 0.0])
    one = Tokens(jnp.asarray(global_values), jnp.asarray([[0.3, 2.0], [-2.5, 0.1], [0.0, 0.0]]),
                 jnp.zeros((3, 2, 0)), site_mask)

    def inverse_targets(x):
        return split.gather(*_values(norm.inverse(split.scatter(one, x))))

    x = split.gather(one.global_values, one.site_values)
    jacobian = jax.jacfwd(inverse_targets)(x)
    real = np.asarray(target_mask(layout, split, site_mask)) > 0
    _, expected = np.linalg.slogdet(np.asarray(jacobian)[np.ix_(real, real)])
    np.testing.assert_allclose(norm.target_log_jacobian(split, one), expected, rtol=1e-5)


def _values(tokens):
    return tokens.global_values, tokens.site_values


def _layout():
    """Globals a (target) and b (target); per site c (target) and d (conditioning), 3 sites."""
    import hierdsl

    model = hierdsl.compile("""
model Four(n::Int = 3)
    a ~ Normal(0.0, 1.0)
    b ~ Normal(0.0, 1.0)
    sites i in 1:n
        c ~ Normal(a, 1.0)
        observe d ~ Normal(c, 1.0)
    end
end
""")
    return TokenLayout.from_ir(model.ir, max_sites=3)


def _location_scale_sims(n=20000, seed=3):
    """A global g (a log scale), per site a local m and an observation x = 2 m + exp(g) ε."""
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(n, 1))
    m = rng.normal(size=(n, 1, 1))
    x = 2.0 * m + np.exp(g)[:, :, None] * rng.normal(size=(n, 1, 1))
    return g, np.concatenate([m, x], axis=2), np.ones((n, 1))


def test_linear_preconditioning_whitens_a_location_scale_likelihood():
    g, sites, mask = _location_scale_sims()
    tokens = _tokens(g, sites, mask)
    norm = lf.Normaliser.fit(tokens, observed=(1,), precondition="linear")
    z = np.asarray(norm.forward(tokens).site_values[:, 0, 1])
    # Standard normal at every noise scale (the noise sd spans a factor of about e^4 here).
    for part in (g[:, 0] < -1.0, np.abs(g[:, 0]) < 0.5, g[:, 0] > 1.0):
        assert abs(z[part].mean()) < 0.05 and abs(z[part].std() - 1.0) < 0.05
    back = norm.inverse(norm.forward(tokens))
    np.testing.assert_allclose(back.site_values, tokens.site_values, rtol=1e-4, atol=1e-4)
    # The conditioning tokens, and everything the posterior sees, are the plain standardisation.
    np.testing.assert_allclose(norm.forward(tokens).site_values[:, 0, 0], lf.Normaliser.fit(tokens).forward(tokens).site_values[:, 0, 0], atol=1e-6)
    np.testing.assert_allclose(norm.without_preconditioning().forward(tokens).site_values, lf.Normaliser.fit(tokens).forward(tokens).site_values, atol=1e-6)


# A small network preconditioner, so that the tests fit it in a second or two.
SMALL = lf.PreconditionerConfig(width=32, depth=2, steps=1500)


def _nonlinear_sims(n=20000, seed=5):
    """A global g (a log scale), per site a local m and an observation x = 3 tanh(2 m) + exp(g) ε:
    a location far from linear in m."""
    rng = np.random.default_rng(seed)
    g = 0.7 * rng.normal(size=(n, 1))
    m = rng.normal(size=(n, 1, 1))
    x = 3.0 * np.tanh(2.0 * m) + np.exp(g)[:, :, None] * rng.normal(size=(n, 1, 1))
    return g, np.concatenate([m, x], axis=2), np.ones((n, 1))


def _worst_whitening(z, g, m):
    """The largest |mean| and |sd - 1| of z over a grid of cells in (g, m)."""
    worst_mean = worst_sd = 0.0
    for g_part in (g < -0.5, np.abs(g) < 0.3, g > 0.5):
        for m_part in (m < -1.0, np.abs(m) < 0.15, (m > 0.4) & (m < 0.8), m > 1.0):
            cell = z[g_part & m_part]
            worst_mean, worst_sd = max(worst_mean, abs(cell.mean())), max(worst_sd, abs(cell.std() - 1.0))
    return worst_mean, worst_sd


def test_network_preconditioning_whitens_a_nonlinear_location_scale_likelihood():
    import jax

    g, sites, mask = _nonlinear_sims()
    tokens = _tokens(g, sites, mask)
    norm = lf.Normaliser.fit(tokens, observed=(1,), key=jax.random.key(0), config=SMALL)
    assert norm.observed == (1,) and norm.observed_net is not None
    z = np.asarray(norm.forward(tokens).site_values[:, 0, 1])
    worst_mean, worst_sd = _worst_whitening(z, g[:, 0], sites[:, 0, 0])
    assert worst_mean < 0.2 and worst_sd < 0.2, (worst_mean, worst_sd)
    # The linear fit cannot follow tanh: it leaves some cells far from standard normal.
    linear = lf.Normaliser.fit(tokens, observed=(1,), precondition="linear")
    z_linear = np.asarray(linear.forward(tokens).site_values[:, 0, 1])
    assert max(_worst_whitening(z_linear, g[:, 0], sites[:, 0, 0])) > 0.5
    back = norm.inverse(norm.forward(tokens))
    np.testing.assert_allclose(back.site_values, tokens.site_values, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(norm.without_preconditioning().forward(tokens).site_values,
                               lf.Normaliser.fit(tokens).forward(tokens).site_values, atol=1e-6)


def test_network_preconditioner_is_reproducible_from_its_key():
    import jax

    g, sites, mask = _nonlinear_sims(n=2000)
    tokens = _tokens(g, sites, mask)
    fits = [lf.Normaliser.fit(tokens, observed=(1,), key=jax.random.key(k), config=SMALL) for k in (1, 1, 2)]
    z = [np.asarray(f.forward(tokens).site_values) for f in fits]
    np.testing.assert_array_equal(z[0], z[1])
    assert not np.array_equal(z[0], z[2])


def test_unknown_preconditioning_kind_is_refused():
    import pytest

    g, sites, mask = _location_scale_sims(n=200)
    with pytest.raises(ValueError, match="'network' or 'linear'"):
        lf.Normaliser.fit(_tokens(g, sites, mask), observed=(1,), precondition="cubic")
    with pytest.raises(ValueError, match="precondition must be one of"):
        lf.LF(precondition="cubic")
    assert lf.LF(precondition=True).precondition == "network" and lf.LF(precondition=False).precondition is None


@pytest.mark.parametrize("kind", ["linear", "network"])
def test_posterior_normaliser_drops_the_preconditioning(kind):
    g, sites, mask = _location_scale_sims(n=2000)
    norm = lf.Normaliser.fit(_tokens(g, sites, mask), observed=(1,), precondition=kind, config=SMALL)
    assert norm.observed == (1,)
    plain = lf.posterior_normaliser(norm, _layout(), ())
    assert plain.observed == () and plain.observed_net is None and plain.observed_loc is None


@pytest.mark.parametrize("kind", ["linear", "network"])
def test_target_log_jacobian_counts_the_preconditioning(kind):
    rng = np.random.default_rng(4)
    n = 2000
    g = rng.normal(size=(n, 2))
    c = rng.normal(size=(n, 3, 1))
    d = c + np.exp(g[:, :1])[:, :, None] * rng.normal(size=(n, 3, 1))
    norm = lf.Normaliser.fit(_tokens(g, np.concatenate([c, d], axis=2), np.ones((n, 3))), observed=(1,),
                             precondition=kind, config=SMALL)
    layout = _layout()
    split = layout.split(target=("d",))  # the surrogate's view: the observation is the target
    _assert_log_jacobian_matches(norm, layout, split, [1.2, -0.4])


def _located_tokens(n=20000, seed=5):
    """Globals a ~ N(0, 1), b ~ LogNormal(0, 0.5); per site a local c ~ N(a, 1) and its datum
    d = c + b ε / 10: given a, b and d, c has a location and a scale that change with them."""
    rng = np.random.default_rng(seed)
    a, log_b = rng.normal(size=(n, 1)), 0.5 * rng.normal(size=(n, 1))
    c = a[:, :, None] + rng.normal(size=(n, 3, 1))
    d = c + 0.1 * np.exp(log_b)[:, :, None] * rng.normal(size=(n, 3, 1))
    return _tokens(np.concatenate([a, log_b], axis=1), np.concatenate([c, d], axis=2), np.ones((n, 3)))


def test_posterior_preconditioner_gives_each_sites_locals_as_residuals_given_globals_and_data():
    """`LF.posterior_precondition`: the local c (token 0) is regressed on the globals and its
    site's datum d (token 1); its residuals are standardised, the map inverts, and the
    log-Jacobian the posterior's density uses is the (triangular) inverse map's log-determinant."""
    import jax

    layout = _layout()
    assert lf.posterior_precondition_tokens(layout) == ((0,), (1,))
    tokens = _located_tokens()
    norm = lf.posterior_normaliser(lf.Normaliser.fit(tokens), layout, ())
    standard = norm.forward(tokens)
    pre = lf.fit_posterior_preconditioner(standard, layout, jax.random.key(0), SMALL)
    assert pre.targets == (0,) and pre.features == (1,)
    full = lf.posterior_normaliser(lf.Normaliser.fit(tokens), layout, (), pre)
    z = np.asarray(lf.precondition_tokens(full, standard, chunk=7000).site_values)
    np.testing.assert_allclose(z, np.asarray(full.forward(tokens).site_values), atol=1e-5)
    # Standard normal residuals in every cell of the global b, whose value sets c's scale given d
    # (0.1 b against c's spread of sqrt(2) over the prior).
    residual, b = z[..., 0], np.asarray(tokens.global_values[:, 1:])
    for cell in np.array_split(np.argsort(b[:, 0]), 4):
        assert abs(residual[cell].mean()) < 0.1 and abs(residual[cell].std() - 1.0) < 0.15, residual[cell].std()
    np.testing.assert_array_equal(z[..., 1], np.asarray(standard.site_values[..., 1]))  # the data pass through
    # The reported residual scale: given a and d, c's sd is s / sqrt(1 + s^2) with s = 0.1 b; at
    # the median b (1) and in units of c's prior spread (sqrt 2), 0.0704.
    assert abs(pre.residual_scale(standard) - 0.1 / np.sqrt(1.01) / np.sqrt(2.0)) < 0.01
    # It reads at most `max_sites` sites, the first ones (here 5 of the first two data sets' 6).
    first = np.concatenate([np.asarray(standard.global_values[:2, None, :]).repeat(3, axis=1),
                            np.asarray(standard.site_values[:2, :, 1:2])], axis=-1).reshape(6, -1)[:5]
    expected = np.median(np.exp(np.asarray(pre.net(first.astype(np.float32))[1])))
    assert pre.residual_scale(standard, max_sites=5) == pytest.approx(expected, rel=1e-6)
    np.testing.assert_allclose(full.inverse(full.forward(tokens)).site_values, tokens.site_values, atol=1e-4)
    split = layout.split(target=("a", "b", "c"), conditioning=("d",))
    _assert_log_jacobian_matches(full, layout, split, [0.8, -0.3])


def test_posterior_preconditioner_needs_locals():
    import hierdsl
    import jax

    model = hierdsl.compile("""
model NoLocals(n::Int = 2)
    a ~ Normal(0.0, 1.0)
    sites i in 1:n
        observe d ~ Normal(a, 1.0)
    end
end
""")
    layout = TokenLayout.from_ir(model.ir, max_sites=2)
    assert lf.posterior_precondition_tokens(layout) == ((), (0,))
    rng = np.random.default_rng(0)
    tokens = _tokens(rng.normal(size=(50, 1)), rng.normal(size=(50, 2, 1)), np.ones((50, 2)))
    assert lf.fit_posterior_preconditioner(tokens, layout, jax.random.key(0), SMALL) is None


GLOBALS_SMALL = lf.PreconditionerConfig(width=32, depth=2, steps=1500, batch_size=64)


def test_globals_preconditioner_gives_the_globals_as_residuals_given_all_sites_data():
    """`LF.globals_precondition`: in `_located_tokens` the global a has the conjugate posterior
    N(sum d / (k + 1.01), 1 / (1 + k / 1.01)) given k sites' data d (c ~ N(a, 1), d = c + 0.1 b ε
    with b near 1), and b none worth the name. The fitted location (within 0.2 posterior sds, rms)
    and scale (within 10%) follow a's at every site count, the map inverts with the locals'
    preconditioner, and the log-Jacobian of the posterior's density is the triangular map's."""
    import jax

    layout = _layout()
    tokens = _located_tokens(n=6000)
    base = lf.posterior_normaliser(lf.Normaliser.fit(tokens), layout, ())
    standard = base.forward(tokens)
    pre = lf.fit_globals_preconditioner(standard, layout, jax.random.key(0), GLOBALS_SMALL)
    assert pre.features == (1,)  # d: the sites' data, never their locals
    a, d = np.asarray(tokens.global_values[:, 0]), np.asarray(tokens.site_values[..., 1])
    a_mean, a_scale = float(base.global_mean[0]), float(base.global_scale[0])
    for k in (1, 3):
        mask = np.zeros((500, 3), np.float32)
        mask[:, :k] = 1.0
        some = lf.Tokens(standard.global_values[:500], standard.site_values[:500] * mask[..., None],
                         standard.site_coords[:500], jnp.asarray(mask))
        loc, log_scale = pre(some.site_values, some.site_mask)
        exact_loc = (d[:500, :k].sum(1) / (k + 1.01) - a_mean) / a_scale
        exact_scale = 1.0 / np.sqrt(1.0 + k / 1.01) / a_scale
        error = np.sqrt(np.mean((np.asarray(loc[:, 0]) - exact_loc) ** 2))
        assert error < 0.2 * exact_scale, (k, error / exact_scale)
        assert abs(np.median(np.exp(log_scale[:, 0])) / exact_scale - 1.0) < 0.1, (k, np.exp(log_scale[:, 0]).mean())
        assert abs(np.median(np.exp(log_scale[:, 1])) - 1.0) < 0.1  # b: the prior's
        residual = np.asarray(pre.precondition(some).global_values[:, 0])
        assert abs(residual.mean()) < 0.15 and abs(residual.std() - 1.0) < 0.15
    assert pre.residual_scale(standard) == pytest.approx(
        np.median(np.exp(np.asarray(pre(standard.site_values, standard.site_mask)[1]))), rel=1e-6)
    # With the locals' preconditioner as well: the globals' residuals are taken after the locals'
    # (which read the standardised globals), and undone before them.
    locals_pre = lf.fit_posterior_preconditioner(standard, layout, jax.random.key(1), SMALL)
    full = lf.posterior_normaliser(lf.Normaliser.fit(tokens), layout, (), locals_pre, pre)
    z = full.forward(tokens)
    np.testing.assert_allclose(z.global_values, pre.precondition(lf.precondition_tokens(
        lf.posterior_normaliser(lf.Normaliser.fit(tokens), layout, (), locals_pre), standard)).global_values, atol=1e-5)
    back = full.inverse(z)
    np.testing.assert_allclose(back.global_values, tokens.global_values, atol=1e-4)
    np.testing.assert_allclose(back.site_values, tokens.site_values, atol=1e-4)
    split = layout.split(target=("a", "b", "c"), conditioning=("d",))
    _assert_log_jacobian_matches(full, layout, split, [0.8, -0.3])
    _assert_log_jacobian_matches(lf.posterior_normaliser(lf.Normaliser.fit(tokens), layout, (), None, pre), layout,
                                 split, [-1.1, 0.4])
    assert lf.posterior_normaliser(full, layout, ()).globals_net is None  # `without_preconditioning` drops it


def test_globals_preconditioner_needs_globals_and_site_data():
    import hierdsl
    import jax

    model = hierdsl.compile("""
model NoGlobals(n::Int = 2)
    sites i in 1:n
        c ~ Normal(0.0, 1.0)
        observe d ~ Normal(c, 1.0)
    end
end
""")
    layout = TokenLayout.from_ir(model.ir, max_sites=2)
    rng = np.random.default_rng(0)
    tokens = _tokens(np.zeros((50, 0)), rng.normal(size=(50, 2, 2)), np.ones((50, 2)))
    assert lf.fit_globals_preconditioner(tokens, layout, jax.random.key(0), GLOBALS_SMALL) is None


def test_a_later_round_applies_the_first_rounds_posterior_preconditioner():
    """Sequential rounds warm-start the posterior network, so a later round keeps the
    preconditioner its tokens were trained in (`refine_lf` passes it to `posterior_stage`)."""
    import jax

    layout = _layout()
    tokens = _located_tokens(n=2000)
    norm = lf.Normaliser.fit(tokens)
    standard = lf.posterior_normaliser(norm, layout, ()).forward(tokens)
    pre = lf.fit_posterior_preconditioner(standard, layout, jax.random.key(0), SMALL)
    seconds = {}
    out, kept = lf._posterior_preconditioning(standard, 100, norm, layout, (), lf.LF(posterior_precondition=True), pre,
                                              jax.random.key(1), seconds, lf._NoProgress())
    assert kept is pre and seconds == {}  # applied, not refitted
    np.testing.assert_allclose(out.site_values, lf.posterior_normaliser(norm, layout, (), pre).forward(tokens).site_values,
                               atol=1e-5)
    off, none = lf._posterior_preconditioning(standard, 100, norm, layout, (), lf.LF(), pre, jax.random.key(1),
                                              seconds, lf._NoProgress())
    assert none is None and off is standard
    # The globals' likewise (`posterior_stage` hands it to the round's training batches).
    globals_pre = lf.fit_globals_preconditioner(standard, layout, jax.random.key(0), GLOBALS_SMALL)
    on = lf.LF(globals_precondition=True)
    assert lf._globals_preconditioning(standard, layout, on, globals_pre, jax.random.key(1), seconds,
                                       lf._NoProgress()) is globals_pre and seconds == {}
    assert lf._globals_preconditioning(standard, layout, lf.LF(), globals_pre, jax.random.key(1), seconds,
                                       lf._NoProgress()) is None
