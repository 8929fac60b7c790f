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


def _reference_forward(net, t, tokens, split):
    """The network's forward pass written out in NumPy, token by token, for one example."""
    p = jax.tree.map(np.asarray, net)
    layout = net.layout

    def affine(a, x):
        return x @ a.weight + a.bias

    def norm(n, x):
        return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + n.eps) * n.scale + n.offset

    angles = t * np.geomspace(1.0, 1000.0, net.time_features)
    time = affine(p.time_embedding, np.concatenate([np.sin(angles), np.cos(angles)]))
    rows, group = [], []  # one row per token; group -1 for globals, else the site index
    for g in range(layout.num_global_tokens):
        rows.append(affine(p.value_embedding, np.asarray(tokens.global_values)[g:g + 1])
                    + p.label_embedding[layout.global_label[g]] + p.position_embedding[layout.global_position[g]]
                    + p.type_embedding[int(split.global_target[g])] + time)
        group.append(-1)
    for s in range(layout.max_sites):
        for k in range(layout.tokens_per_site):
            rows.append(affine(p.value_embedding, np.asarray(tokens.site_values)[s, k:k + 1])
                        + p.label_embedding[layout.site_label[k]] + p.position_embedding[layout.site_position[k]]
                        + p.type_embedding[int(split.site_target[k])] + time)
            group.append(s)
    x = np.stack(rows)
    visible = np.concatenate([split.global_visible, np.concatenate(
        [split.site_visible & (np.asarray(tokens.site_mask)[s] > 0) for s in range(layout.max_sites)])])
    for block in p.blocks:
        a = block.attention
        h = norm(block.attention_norm, x)
        heads = a.num_heads
        q, k, v = (affine(proj, h).reshape(len(x), heads, -1) for proj in (a.query, a.key, a.value))
        out = np.zeros_like(q)
        for i in range(len(x)):
            allowed = [j for j in range(len(x)) if visible[j] and (group[i] < 0 or group[j] < 0 or group[i] == group[j])]
            for head in range(heads):
                logits = np.array([q[i, head] @ k[j, head] for j in allowed]) / np.sqrt(q.shape[-1])
                weights = np.exp(logits - logits.max())
                out[i, head] = (weights / weights.sum()) @ v[allowed, head]
        x = x + affine(a.output, out.reshape(len(x), -1))
        hidden = affine(block.mlp_in, norm(block.mlp_norm, x))
        x = x + affine(block.mlp_out, np.asarray(jax.nn.gelu(hidden)))
    velocity = affine(p.head, norm(p.final_norm, x))[:, 0]
    num_globals = layout.num_global_tokens
    return velocity[:num_globals], velocity[num_globals:].reshape(layout.max_sites, layout.tokens_per_site)


@pytest.mark.parametrize("attention", ["blockwise", "dense"])
def test_network_matches_a_token_by_token_reference(attention):
    # No functional coordinates here (the reference leaves them out): `y` is dropped from the model.
    ir = ModelIR("m", (), "i", 3, IR.variables[:4])
    layout = TokenLayout.from_ir(ir, max_sites=3)
    net = TokenTransformer(layout, width=8, depth=2, num_heads=2, attention=attention, time_features=4,
                           key=jax.random.key(3))
    data = {k: v for k, v in values(2, seed=4).items() if k != "y"}
    tokens, split = layout.encode(data, 2), layout.split(("sigma", "mu"), ("t",))
    global_v, site_v = forward(net, tokens, split, 0.6)
    want_g, want_s = _reference_forward(net, 0.6, tokens, split)
    np.testing.assert_allclose(global_v, np.where(split.global_target, want_g, 0.0), rtol=1e-4, atol=1e-5)
    real = (np.arange(3) < 2)[:, None] & split.site_target[None, :]
    np.testing.assert_allclose(site_v, np.where(real, want_s, 0.0), rtol=1e-4, atol=1e-5)
    assert np.abs(np.asarray(site_v)[real]).min() > 0  # the comparison is not of zeros


def test_auto_attention_is_dense_up_to_the_token_threshold_and_blockwise_beyond():
    from hierdsl.runtime import lf

    # 3 global tokens and 7 per site: 45 tokens at 6 sites, 52 at 7, around the threshold of 48.
    for max_sites, expected in ((6, "dense"), (7, "blockwise")):
        layout = TokenLayout.from_ir(IR, max_sites=max_sites)
        tokens = layout.num_global_tokens + max_sites * layout.tokens_per_site
        assert (tokens <= lf.DENSE_ATTENTION_MAX_TOKENS) == (expected == "dense"), tokens
        net = lf.NetworkConfig(width=16, depth=1, num_heads=2).build(layout, jax.random.key(0))
        assert net.attention == expected
        assert lf.NetworkConfig(width=16, depth=1, num_heads=2, attention="dense").build(
            layout, jax.random.key(0)).attention == "dense"


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
