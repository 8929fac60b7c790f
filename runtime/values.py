"""Static and traced values during lowering (shared by the IR → JAX stage's modules).

Lowering interprets the IR at trace time. Values known before tracing — literals, constants,
model arguments, ranges and anything computed only from them — are kept as NumPy arrays, so
that shapes (`zeros(n)`, `iid(D, k)`), ranges and static indices stay Python-level facts inside
`jax.jit`. Anything that touches a traced value becomes a JAX array. NumPy results are normalised
to JAX's default 32-bit dtypes so a folded value has the dtype the traced computation would give.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np

from .errors import RuntimeModelError

STATIC_TYPES = (np.ndarray, np.generic, bool, int, float)


def is_static(x: Any) -> bool:
    """Whether `x` is known before tracing (a NumPy array or Python number)."""
    return isinstance(x, STATIC_TYPES)


def static(x: Any) -> np.ndarray:
    """A static value as a NumPy array with JAX's default dtypes (float32, int32, bool)."""
    array = np.asarray(x)
    if array.dtype.kind == "f" and array.dtype != np.float32:
        return array.astype(np.float32)
    if array.dtype.kind in "iu" and array.dtype != np.int32:
        return array.astype(np.int32)
    return array


def xp_of(*xs: Any):
    """NumPy when every argument is static (fold now), otherwise `jax.numpy` (trace)."""
    return np if all(is_static(x) for x in xs) else jnp


def fold(fn: Callable[..., Any], *xs: Any) -> Any:
    """Apply `fn(xp, *xs)` with NumPy when all of `xs` are static, else with `jax.numpy`."""
    xp = xp_of(*xs)
    out = fn(xp, *xs)
    return static(out) if xp is np else out


def as_float(x: Any) -> Any:
    """`x` as float32, staying static (NumPy) when it is static."""
    if is_static(x):
        return np.asarray(x, dtype=np.float32)
    return jnp.asarray(x, dtype=jnp.float32)


def broadcast_to(x: Any, shape: tuple[int, ...]) -> Any:
    """Broadcast, staying static when `x` is static."""
    if is_static(x):
        return np.broadcast_to(np.asarray(x), shape)
    return jnp.broadcast_to(x, shape)


def static_int(x: Any, what: str) -> int:
    """A Python int from a value that must be known before tracing (a size, a count)."""
    if not is_static(x):
        raise RuntimeModelError(
            f"{what} must be known before the simulator runs (a literal, constant or model argument), "
            "but it depends on a parameter or random draw"
        )
    array = np.asarray(x)
    if array.shape != () or array != np.round(array):
        raise RuntimeModelError(f"{what} must be a whole number, got {array!r}")
    return int(array)
