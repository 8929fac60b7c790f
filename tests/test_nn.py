"""TFMPE network (tokens → velocities): padding, exchangeability, blockwise = dense, coordinates."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hierdsl.compiler.ir import E, ModelIR, Support, Variable
from hierdsl.runtime.nn import TokenTransformer, TokenVectorField, target_mask
from hierdsl.runtime.tokens import TokenLayout


def variable(name, role, shape=(), coords=()):
    return Variable(name, role, True, E("lit", (), (0.0, "float")), shape, "float", Support("real"), coords=coords)


# Two globals, a local, and an observed curve y(t) at per-site times t.
IR = ModelIR("m", (), "i", 3, (
    variable("sigma", "global"),
    variable("w", "global", (2,)),
    variable("t", "input", (3,)),
    variable("mu", "local"),
    variable("y", "observation", (3,), coords=("t",)),
))
T_TOKENS, MU_TOKEN, Y_TOKENS = slice(0, 3), 3, slice(4, 7)


def values(num_sites, seed=0):
    rng = np.random.default_rng(seed)
    return {"sigma": rng.normal(), "w": rng.normal(size=2), "t": rng.uniform(0, 2, size=(num_sites, 3)),
            "mu": rng.normal(size=num_sites), "y": rng.normal(size=(num_sites, 3))}


@functools.cache
def network(max_sites, attention="blockwise", depth=1):
    # Same key ⇒ same weights for every max_sites and attention mode (parameter shapes do not depend
    # on them), which is what lets the tests compare variants.
    layout = TokenLayout.from_ir(IR, max_sites=max_sites)
    return TokenTransformer(layout, width=16, depth=depth, num_heads=2, attention=attention,
                            time_features=4, coordinate_features=4, key=jax.random.key(0))


@eqx.filter_jit
def forward(net, tokens, split, t=0.3):
    return net(jnp.asarray(t), tokens, split)


def run(net, data, num_sites, target=("sigma", "w", "mu"), conditioning=None):
    return forward(net, net.layout.encode(data, num_sites), net.layout.split(target, conditioning))


def test_padding_and_garbage_at_padded_sites_do_not_change_real_outputs():
    data = values(2)
    small_g, small_s = run(network(3), data, 2)
    net = network(4)
    tokens = net.layout.encode(data, 2)
    rng = np.random.default_rng(1)
    garbage = eqx.tree_at(lambda tk: (tk.site_values, tk.site_coords), tokens, (
        tokens.site_values.at[2:].set(rng.normal(size=(2, 7)) * 100),
        tokens.site_coords.at[2:].set(rng.normal(size=(2, 7, 1)) * 100)))
    large_g, large_s = forward(net, garbage, net.layout.split(("sigma", "w", "mu")))
    np.testing.assert_allclose(large_g, small_g, atol=1e-5)
    np.testing.assert_allclose(large_s[:2], small_s[:2], atol=1e-5)
    assert not np.any(large_s[2:])


def test_permuting_sites_permutes_site_outputs():
    net = network(4)
    data = values(3)
    permutation = np.array([2, 0, 1])
    permuted = {k: (v[permutation] if net.layout.slot(k).per_site else v) for k, v in data.items()}
    global_v, site_v = run(net, data, 3)
    permuted_g, permuted_s = run(net, permuted, 3)
    np.testing.assert_allclose(permuted_g, global_v, atol=1e-5)
    np.testing.assert_allclose(permuted_s[:3], site_v[permutation], atol=1e-5)


def test_blockwise_attention_equals_dense():
    # `w` and `t` left out: masking by variable as well as by padding.
    blockwise, dense = network(4), network(4, "dense")
    data = values(3)
    split = (("sigma", "mu"), ("y",))
    for got, want in zip(run(blockwise, data, 3, *split), run(dense, data, 3, *split)):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_functional_coordinates_reach_only_their_tokens():
    # With no blocks each output depends on its own token's embedding only.
    net = network(2, depth=0)
    data = values(2)
    moved = dict(data, t=data["t"].copy())
    moved["t"][0, 1] += 0.7
    everything = ("sigma", "w", "t", "mu", "y")
    before, after = run(net, data, 2, everything), run(net, moved, 2, everything)
    np.testing.assert_array_equal(after[0], before[0])
    changed = np.abs(np.asarray(after[1] - before[1])) > 1e-6
    expected = np.zeros((2, 7), bool)
    expected[0, T_TOKENS.start + 1] = True  # the input's own value
    expected[0, Y_TOKENS.start + 1] = True  # y[1] at that site: the coordinate changed, its value did not
    np.testing.assert_array_equal(changed, expected)


def test_model_without_coordinates_has_no_coordinate_embedding():
    ir = ModelIR("gl", (), "i", 3, (variable("sigma", "global"), variable("mu", "local"),
                                     variable("x", "observation")))
    layout = TokenLayout.from_ir(ir, max_sites=3)
    net = TokenTransformer(layout, width=16, depth=0, time_features=4, key=jax.random.key(0))
    assert net.coordinate_embedding is None
    global_v, site_v = forward(net, layout.encode({"sigma": 1.0, "mu": [0.0, 1.0], "x": [2.0, 3.0]}, 2),
                               layout.split(target=("sigma", "mu")))
    assert global_v.shape == (1,) and site_v.shape == (3, 2)


def test_vector_field_shape_padding_gradients_and_single_compilation():
    net = network(4)
    # Globals left out: padded sites' queries see no key at all, which must not give NaN gradients.
    split = net.layout.split(target=("mu",), conditioning=("y", "t"))
    field = TokenVectorField(net, split)
    context = net.layout.encode(values(2), 2, absent=split.target)
    assert split.num_targets == 4
    traces = []

    @eqx.filter_jit
    def velocity(field, t, x, context):
        traces.append(None)
        return field(t, x, context)

    x = jnp.linspace(-1.0, 1.0, split.num_targets)
    first = velocity(field, jnp.asarray(0.2), x, context)
    second = velocity(field, jnp.asarray(0.7), x + 1.0, net.layout.encode(values(2, seed=3), 2))
    assert len(traces) == 1
    assert first.shape == second.shape == (4,)
    mask = target_mask(net.layout, split, context.site_mask)
    np.testing.assert_array_equal(mask, [1, 1, 0, 0])
    assert not np.any(first[mask == 0]) and np.all(first[mask == 1] != 0)

    def loss(field):
        return jnp.sum(jax.vmap(field, in_axes=(0, 0, None))(jnp.array([0.1, 0.9]), jnp.stack([x, -x]), context) ** 2)

    grads = eqx.filter_jit(eqx.filter_grad(loss))(field)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(eqx.filter(grads, eqx.is_array)))


def test_configuration_errors_say_how_to_fix_them():
    layout = TokenLayout.from_ir(IR, max_sites=2)
    with pytest.raises(ValueError, match="not divisible by num_heads 3"):
        TokenTransformer(layout, width=16, num_heads=3, time_features=4, coordinate_features=4,
                         key=jax.random.key(0))
    with pytest.raises(ValueError, match="attention must be one of"):
        TokenTransformer(layout, width=16, attention="sparse", time_features=4, coordinate_features=4,
                         key=jax.random.key(0))
    other = TokenLayout.from_ir(IR, max_sites=3)
    with pytest.raises(ValueError, match="different layout"):
        TokenVectorField(network(4), other.split(target=("mu",)))
