"""Python side of examples/drag.hsbi: a JAX-traceable drag-coefficient curve."""

import jax.numpy as jnp


def drag_curve(re, alpha):
    """Drag coefficient at 8 angles of attack for Reynolds number `re` and camber `alpha`."""
    angles = jnp.linspace(0.0, 0.35, 8)
    return 24.0 / (re + 1.0) + 0.05 + 2.0 * (angles - alpha) ** 2
