"""The built-in functions of `.hsbi` (spec §7), as used by the IR → JAX stage.

Each entry takes the evaluated positional and keyword arguments of a `call` node. Elementwise
functions broadcast like NumPy (Julia's `f.(x)` means the same as `f(x)`). When every argument is
static the function is folded with NumPy (see `values`), so `zeros(2 * n)` or `length(v)` stay
usable as sizes inside `jax.jit`. Semantics follow Julia where NumPy differs:

- `min(a, b, …)`/`max(a, b, …)` are elementwise; with one argument they reduce (Julia's `minimum`).
- `sum`, `prod`, `mean` reduce over everything, or over `dims` (1-based) keeping that axis (Julia).
- `cumsum` runs along `dims` (default 1, the first axis).
- `length` is the number of elements; `zeros(n…)`, `ones(n…)`, `fill(v, n…)` take sizes.
- `transpose` of a vector is a 1×n row matrix; `dot` is the sum of elementwise products.
- `vcat` stacks along the first axis (scalars count as length-1 vectors); `hcat` along the second
  (vectors become columns, scalars 1×1 matrices).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .errors import RuntimeModelError
from .values import fold, is_static, static, static_int, xp_of

Builtin = Callable[[Sequence[Any], Mapping[str, Any]], Any]


def _sigmoid(xp, x):
    return jax.nn.sigmoid(x) if xp is jnp else 1.0 / (1.0 + np.exp(-np.asarray(x, np.float32)))


# Elementwise functions of one argument, each written once for NumPy and JAX via `xp`.
_UNARY: dict[str, Callable[[Any, Any], Any]] = {
    "exp": lambda xp, x: xp.exp(x),
    "log": lambda xp, x: xp.log(x),
    "log1p": lambda xp, x: xp.log1p(x),
    "expm1": lambda xp, x: xp.expm1(x),
    "sqrt": lambda xp, x: xp.sqrt(x),
    "abs": lambda xp, x: xp.abs(x),
    "sin": lambda xp, x: xp.sin(x),
    "cos": lambda xp, x: xp.cos(x),
    "tan": lambda xp, x: xp.tan(x),
    "tanh": lambda xp, x: xp.tanh(x),
    "sigmoid": _sigmoid,
    "logit": lambda xp, x: xp.log(x) - xp.log1p(-x),
    "softplus": lambda xp, x: xp.logaddexp(x, 0.0),
    "floor": lambda xp, x: xp.floor(x),
    "ceil": lambda xp, x: xp.ceil(x),
}


def _arity(name: str, args: Sequence[Any], counts: tuple[int, ...]) -> None:
    if len(args) not in counts:
        expected = " or ".join(str(c) for c in counts)
        raise RuntimeModelError(f"{name} takes {expected} argument(s), got {len(args)}")


def _no_keywords(name: str, kwargs: Mapping[str, Any], allowed: tuple[str, ...] = ()) -> None:
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise RuntimeModelError(f"{name} has no keyword argument(s) {', '.join(unknown)}")


def _unary(name: str) -> Builtin:
    fn = _UNARY[name]

    def call(args, kwargs):
        _arity(name, args, (1,))
        _no_keywords(name, kwargs)
        return fold(fn, args[0])

    return call


def _extremum(name: str, pairwise: str, reduce: str) -> Builtin:
    def call(args, kwargs):
        _no_keywords(name, kwargs)
        if not args:
            raise RuntimeModelError(f"{name} needs at least one argument")
        if len(args) == 1:
            return fold(lambda xp, x: getattr(xp, reduce)(x), args[0])
        out = args[0]
        for other in args[1:]:
            out = fold(lambda xp, a, b: getattr(xp, pairwise)(a, b), out, other)
        return out

    return call


def _axis(name: str, kwargs: Mapping[str, Any]) -> int | None:
    if "dims" not in kwargs:
        return None
    return static_int(kwargs["dims"], f"`dims` of {name}") - 1


def _reduction(name: str, method: str) -> Builtin:
    def call(args, kwargs):
        _arity(name, args, (1,))
        _no_keywords(name, kwargs, ("dims",))
        axis = _axis(name, kwargs)
        return fold(lambda xp, x: getattr(xp, method)(x, axis=axis, keepdims=axis is not None), args[0])

    return call


def _cumsum(args, kwargs):
    _arity("cumsum", args, (1,))
    _no_keywords("cumsum", kwargs, ("dims",))
    axis = _axis("cumsum", kwargs) or 0
    return fold(lambda xp, x: xp.cumsum(x, axis=axis), args[0])


def _clamp(args, kwargs):
    _arity("clamp", args, (3,))
    _no_keywords("clamp", kwargs)
    return fold(lambda xp, x, lo, hi: xp.minimum(xp.maximum(x, lo), hi), *args)


def _length(args, kwargs):
    _arity("length", args, (1,))
    _no_keywords("length", kwargs)
    value = args[0]
    if isinstance(value, (tuple, list)):
        return static(len(value))
    return static(math.prod(np.shape(value)))


def _sizes(name: str, args: Sequence[Any]) -> tuple[int, ...]:
    return tuple(static_int(a, f"the size given to {name}") for a in args)


def _zeros(args, kwargs):
    _no_keywords("zeros", kwargs)
    return np.zeros(_sizes("zeros", args), np.float32)


def _ones(args, kwargs):
    _no_keywords("ones", kwargs)
    return np.ones(_sizes("ones", args), np.float32)


def _fill(args, kwargs):
    _no_keywords("fill", kwargs)
    if not args:
        raise RuntimeModelError("fill(value, n…) needs a value")
    shape = _sizes("fill", args[1:])
    value = args[0]
    return static(np.full(shape, value)) if is_static(value) else jnp.full(shape, value)


def _dot(args, kwargs):
    _arity("dot", args, (2,))
    _no_keywords("dot", kwargs)
    return fold(lambda xp, a, b: xp.sum(xp.multiply(a, b)), *args)


def _matmul(args, kwargs):
    _arity("matmul", args, (2,))
    _no_keywords("matmul", kwargs)
    return fold(lambda xp, a, b: xp.matmul(a, b), *args)


def _transpose(args, kwargs):
    _arity("transpose", args, (1,))
    _no_keywords("transpose", kwargs)
    value = args[0]
    if np.ndim(value) == 1:
        return fold(lambda xp, v: xp.reshape(v, (1, -1)), value)
    if np.ndim(value) != 2:
        raise RuntimeModelError(f"transpose needs a vector or a matrix, got shape {np.shape(value)}")
    return fold(lambda xp, m: xp.transpose(m), value)


def _vcat(args, kwargs):
    _no_keywords("vcat", kwargs)
    xp = xp_of(*args)
    parts = [xp.reshape(a, (1,)) if np.ndim(a) == 0 else a for a in args]
    if any(np.ndim(p) == 2 for p in parts):
        parts = [xp.reshape(p, (-1, 1)) if np.ndim(p) == 1 else p for p in parts]
    out = xp.concatenate(parts, axis=0)
    return static(out) if xp is np else out


def _hcat(args, kwargs):
    _no_keywords("hcat", kwargs)
    xp = xp_of(*args)
    parts = [xp.reshape(a, (1, 1)) if np.ndim(a) == 0 else xp.reshape(a, (-1, 1)) if np.ndim(a) == 1 else a for a in args]
    out = xp.concatenate(parts, axis=1)
    return static(out) if xp is np else out


def _constant(name: str, value: float) -> Builtin:
    def call(args, kwargs):
        _arity(name, args, (0,))
        _no_keywords(name, kwargs)
        return np.float32(value)

    return call


BUILTINS: dict[str, Builtin] = {
    **{name: _unary(name) for name in _UNARY},
    "min": _extremum("min", "minimum", "min"),
    "max": _extremum("max", "maximum", "max"),
    "clamp": _clamp,
    "sum": _reduction("sum", "sum"),
    "prod": _reduction("prod", "prod"),
    "mean": _reduction("mean", "mean"),
    "cumsum": _cumsum,
    "length": _length,
    "zeros": _zeros,
    "ones": _ones,
    "fill": _fill,
    "dot": _dot,
    "matmul": _matmul,
    "transpose": _transpose,
    "vcat": _vcat,
    "hcat": _hcat,
    # The checker folds these names to literals; kept so an unfolded call still works.
    "pi": _constant("pi", math.pi),
    "π": _constant("π", math.pi),
    "Inf": _constant("Inf", math.inf),
}
