"""Tokeniser (IR → token layout; values ↔ tokens): structure, round trips, coordinates, splits."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hierdsl.compiler.ir import E, ModelIR, Support, Variable
from hierdsl.runtime.tokens import TokenLayout, target_mask


def variable(name, role, shape=(), coords=()):
    stochastic = role not in ("global_det", "site_det")
    return Variable(name, role, stochastic, E("lit", (), (0.0, "float")), shape, "float", Support("real"),
                    coords=coords)


def model(*variables):
    return ModelIR("m", (), "i", 4, tuple(variables))


def random_values(layout, num_sites, seed=0):
    rng = np.random.default_rng(seed)
    return {s.name: rng.normal(size=(num_sites, *s.shape) if s.per_site else s.shape).astype(np.float32)
            for s in layout.slots}


# Gaussian-linear-like with a deterministic node and a function-valued observation y(t).
CURVE = model(
    variable("sigma", "global"),
    variable("scale", "global_det"),
    variable("w", "global", (2,)),
    variable("t", "input", (3,)),
    variable("mu", "local"),
    variable("m", "site_det", (3,)),
    variable("y", "observation", (3, 2), coords=("t",)),
)


def test_layout_follows_ir_order_and_skips_deterministic_variables():
    layout = TokenLayout.from_ir(CURVE, max_sites=4)
    assert layout.labels == ("sigma", "w", "t", "mu", "y")
    assert layout.untokenised == ("scale", "m")
    assert (layout.num_global_tokens, layout.tokens_per_site) == (CURVE.global_tokens, CURVE.tokens_per_site) == (3, 10)
    assert layout.global_label.tolist() == [0, 1, 1]
    assert layout.global_position.tolist() == [0, 0, 1]
    assert layout.site_label.tolist() == [2, 2, 2, 3] + [4] * 6
    assert layout.site_position.tolist() == [0, 1, 2, 0, 0, 1, 2, 3, 4, 5]
    assert layout.site_role == ("input",) * 3 + ("local",) + ("observation",) * 6
    assert layout.site_has_coord.tolist() == [False] * 4 + [True] * 6
    assert layout.max_position == 6


def test_coordinates_are_read_from_the_same_site_inputs():
    layout = TokenLayout.from_ir(CURVE, max_sites=4)
    values = random_values(layout, 2)
    tokens = layout.encode(values, 2)
    assert tokens.site_coords.shape == (4, 10, 1)
    y_coords = tokens.site_coords[:2, 4:, 0].reshape(2, 3, 2)
    # y[k, j] sits at coordinate t[k], at its own site.
    np.testing.assert_array_equal(y_coords, np.repeat(values["t"][:, :, None], 2, axis=2))
    assert not np.any(tokens.site_coords[:, :4])
    assert not np.any(tokens.site_coords[2:])


def test_several_coordinate_inputs_stack_on_the_coordinate_axis():
    ir = model(variable("sigma", "global"), variable("lat", "input", (2,)), variable("lon", "input", (2,)),
               variable("y", "observation", (2,), coords=("lat", "lon")))
    layout = TokenLayout.from_ir(ir, max_sites=2)
    values = random_values(layout, 1)
    tokens = layout.encode(values, 1)
    np.testing.assert_array_equal(tokens.site_coords[0, 4:], np.stack([values["lat"][0], values["lon"][0]], axis=1))
    assert layout.site_coord_mask.tolist() == [[False, False]] * 4 + [[True, True]] * 2


def test_coordinates_must_come_from_a_matching_input():
    ir = model(variable("sigma", "global"), variable("mu", "local", (3,)),
               variable("y", "observation", (3,), coords=("mu",)))
    with pytest.raises(ValueError, match="must be an input"):
        TokenLayout.from_ir(ir, max_sites=2)


@st.composite
def models_and_values(draw):
    shapes = st.sampled_from([(), (1,), (3,), (2, 2)])
    global_vars = [variable(f"g{i}", "global", draw(shapes)) for i in range(draw(st.integers(0, 2)))]
    site_vars = [variable(f"l{i}", "local", draw(shapes)) for i in range(draw(st.integers(0, 2)))]
    site_vars += [variable(f"o{i}", "observation", draw(shapes)) for i in range(draw(st.integers(1, 2)))]
    if draw(st.booleans()):
        length = draw(st.integers(1, 3))
        site_vars += [variable("t", "input", (length,)),
                      variable("curve", "observation", (length, *draw(st.sampled_from([(), (2,)]))), coords=("t",))]
    else:
        site_vars += [variable(f"x{i}", "input", draw(shapes)) for i in range(draw(st.integers(0, 1)))]
    # Inputs must precede the variables that use them as coordinates; otherwise roles interleave.
    order = draw(st.permutations(range(len(site_vars))))
    site_vars = sorted((site_vars[i] for i in order), key=lambda v: v.name != "t")
    ir = model(*global_vars, variable("d", "global_det"), *site_vars)
    max_sites = draw(st.integers(1, 4))
    num_sites = draw(st.integers(0, max_sites))
    layout = TokenLayout.from_ir(ir, max_sites=max_sites)
    return layout, random_values(layout, num_sites, draw(st.integers(0, 2**16))), num_sites


@settings(max_examples=40, deadline=None)
@given(models_and_values())
def test_encode_decode_round_trip(case):
    layout, values, num_sites = case
    tokens = layout.encode(values, num_sites)
    assert tokens.global_values.shape == (layout.num_global_tokens,)
    assert tokens.site_values.shape == (layout.max_sites, layout.tokens_per_site)
    assert tokens.site_coords.shape == (layout.max_sites, layout.tokens_per_site, layout.coord_dims)
    np.testing.assert_array_equal(tokens.site_mask, np.arange(layout.max_sites) < num_sites)
    assert not np.any(tokens.site_values[num_sites:])
    decoded = layout.decode(tokens, num_sites)
    assert decoded.keys() == values.keys()
    for name, value in values.items():
        np.testing.assert_array_equal(decoded[name], value)


def test_encode_is_jittable_and_vmappable():
    layout = TokenLayout.from_ir(CURVE, max_sites=4)
    batch = [random_values(layout, 3, seed) for seed in range(5)]
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *batch)
    tokens = jax.jit(jax.vmap(partial(layout.encode, num_sites=3)))(stacked)
    assert tokens.site_values.shape == (5, 4, 10)
    for i, values in enumerate(batch):
        one = layout.encode(values, 3)
        np.testing.assert_array_equal(tokens.site_values[i], one.site_values)
        np.testing.assert_array_equal(tokens.site_coords[i], one.site_coords)
    decoded = jax.jit(jax.vmap(partial(layout.decode, num_sites=3)))(tokens)
    np.testing.assert_array_equal(decoded["y"], stacked["y"])


def test_encode_explains_bad_input():
    layout = TokenLayout.from_ir(CURVE, max_sites=4)
    values = random_values(layout, 2)
    with pytest.raises(ValueError, match=r"'mu' has shape \(3,\); expected \(2,\)"):
        layout.encode(dict(values, mu=np.zeros(3)), 2)
    with pytest.raises(KeyError, match="did you mean 'sigma'"):
        layout.encode(dict(values, sigmaa=1.0), 2)
    with pytest.raises(KeyError, match="no value for 'mu'"):
        layout.encode({k: v for k, v in values.items() if k != "mu"}, 2)
    with pytest.raises(ValueError, match="num_sites must be between 0 and max_sites=4"):
        layout.encode(random_values(layout, 5), 5)
    # Deterministic values from a simulator are accepted and ignored; absent variables are zero.
    tokens = layout.encode(dict(values, scale=1.0, m=np.zeros((2, 3))), 2, absent=("sigma", "mu"))
    assert tokens.global_values[0] == 0 and not np.any(tokens.site_values[:, 3])


def test_split_gathers_scatters_and_masks_targets():
    layout = TokenLayout.from_ir(CURVE, max_sites=4)
    split = layout.split(target=("sigma", "mu"))
    assert split.conditioning == ("w", "t", "y")
    assert split.num_targets == 1 + 4
    values = random_values(layout, 2)
    tokens = layout.encode(values, 2)
    x = split.gather(tokens.global_values, tokens.site_values)
    np.testing.assert_array_equal(x, [values["sigma"], *values["mu"], 0.0, 0.0])
    np.testing.assert_array_equal(target_mask(layout, split, tokens.site_mask), [1, 1, 1, 0, 0])
    decoded = split.decode(x, 2)
    assert decoded.keys() == {"sigma", "mu"}
    np.testing.assert_array_equal(decoded["mu"], values["mu"])
    moved = split.scatter(tokens, x + 1.0)
    np.testing.assert_array_equal(split.gather(moved.global_values, moved.site_values), x + 1.0)
    untouched = ~np.isin(np.arange(10), [3])
    np.testing.assert_array_equal(moved.site_values[:, untouched], tokens.site_values[:, untouched])
    np.testing.assert_array_equal(moved.global_values[1:], tokens.global_values[1:])


def test_split_can_leave_variables_out():
    layout = TokenLayout.from_ir(CURVE, max_sites=4)
    split = layout.split(target=("sigma", "w"), conditioning=("y", "t"))
    assert split.global_visible.tolist() == [True, True, True]
    assert split.site_visible.tolist() == [True] * 3 + [False] + [True] * 6
    assert split.site_target.sum() == 0 and split.num_targets == 3
    x = jnp.arange(3.0)
    np.testing.assert_array_equal(target_mask(layout, split, jnp.ones(4)), np.ones(3))
    assert split.decode(x, 2)["w"].tolist() == [1.0, 2.0]


def test_split_explains_bad_names():
    layout = TokenLayout.from_ir(CURVE, max_sites=4)
    with pytest.raises(KeyError, match="did you mean 'sigma'"):
        layout.split(target=("sigmaa",))
    with pytest.raises(ValueError, match="'mu' cannot be both target and conditioning"):
        layout.split(target=("mu",), conditioning=("mu", "y"))
    with pytest.raises(ValueError, match="at least one target"):
        layout.split(target=())
    other = TokenLayout.from_ir(CURVE, max_sites=3)
    with pytest.raises(ValueError, match="different layout"):
        target_mask(other, layout.split(target=("mu",)), jnp.ones(4))
