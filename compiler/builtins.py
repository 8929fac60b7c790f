"""Built-in names of the language: distributions and functions, with arity, shape and support rules.

Used by `check` to resolve names, check arity, infer shapes/dtypes by abstract evaluation, fold
constants (with NumPy, never JAX) and decide each prior's support.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .ir import Support

# Distributions: name -> (min arity, max arity, support kind, discrete?)
DISTRIBUTIONS: dict[str, tuple[int, int, str, bool]] = {
    "Normal": (2, 2, "real", False),
    "HalfNormal": (1, 1, "positive", False),
    "LogNormal": (2, 2, "positive", False),
    "Uniform": (2, 2, "interval", False),
    "TruncatedNormal": (4, 4, "interval", False),
    "Beta": (2, 2, "interval", False),
    "Gamma": (2, 2, "positive", False),
    "Exponential": (1, 1, "positive", False),
    "Cauchy": (2, 2, "real", False),
    "HalfCauchy": (1, 1, "positive", False),
    "StudentT": (3, 3, "real", False),
    "Laplace": (2, 2, "real", False),
    "Binomial": (2, 2, "nonnegative_integer", True),
    "Poisson": (1, 1, "nonnegative_integer", True),
    "Bernoulli": (1, 1, "boolean", True),
    "Categorical": (1, 1, "integer", True),
    "MvNormal": (2, 2, "real", False),
    "Dirichlet": (1, 1, "simplex", False),
    "SortedUniform": (3, 3, "interval", False),
    "Mixture": (2, 2, "mixture", False),
    "iid": (2, 2, "iid", False),
}

# Elementwise unary functions with their NumPy counterpart for constant folding.
_UNARY: dict[str, Callable] = {
    "exp": np.exp, "log": np.log, "log1p": np.log1p, "expm1": np.expm1, "sqrt": np.sqrt,
    "abs": np.abs, "sin": np.sin, "cos": np.cos, "tan": np.tan, "tanh": np.tanh,
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)), "logit": lambda x: np.log(x) - np.log1p(-x),
    "softplus": lambda x: np.logaddexp(0.0, x), "floor": np.floor, "ceil": np.ceil,
}

# Functions: name -> (min arity, max arity)
FUNCTIONS: dict[str, tuple[int, int]] = {
    **{name: (1, 1) for name in _UNARY},
    "min": (1, 2), "max": (1, 2), "clamp": (3, 3), "sum": (1, 1), "prod": (1, 1), "mean": (1, 1),
    "cumsum": (1, 1), "length": (1, 1), "zeros": (1, 2), "ones": (1, 2), "fill": (2, 3),
    "dot": (2, 2), "matmul": (2, 2), "transpose": (1, 1), "vcat": (1, 64), "hcat": (1, 64),
    "odesolve": (3, 3),
}

ODESOLVE_KEYWORDS = {"params", "t0", "solver", "rtol", "atol", "max_steps"}
ODE_SOLVERS = ("tsit5", "dopri5", "euler", "heun")

# Names that are values, not functions.
VALUES: dict[str, float] = {"pi": math.pi, "Inf": math.inf}


class ShapeError(Exception):
    """A statically decidable shape/type problem; `check` turns it into a diagnostic at a span."""


@dataclass(frozen=True)
class Abs:
    """An abstract value: shape and dtype always; the concrete value when known at compile time.

    `dist` marks a distribution value (then shape is the shape of one draw); `fn` a function value.
    `unknown` marks a value whose shape could not be decided because of an earlier error.
    """

    shape: tuple[int, ...] = ()
    dtype: str = "float"
    value: Optional[np.ndarray] = None
    dist: Optional[str] = None
    support: Optional[Support] = None
    fn: Optional[str] = None
    items: Optional[tuple["Abs", ...]] = None  # tuples
    unknown: bool = False

    @property
    def static(self) -> bool:
        return self.value is not None


UNKNOWN = Abs(unknown=True)


def broadcast(*shapes: tuple[int, ...]) -> tuple[int, ...]:
    try:
        return tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        raise ShapeError("shapes " + ", ".join(_fmt_shape(s) for s in shapes) + " do not broadcast") from None


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def fmt_shape(shape: tuple[int, ...]) -> str:
    return _fmt_shape(shape)


def promote(*dtypes: str) -> str:
    if "float" in dtypes:
        return "float"
    if "int" in dtypes:
        return "int"
    return "bool"


def dtype_of(array: np.ndarray) -> str:
    if array.dtype == np.bool_:
        return "bool"
    if np.issubdtype(array.dtype, np.integer):
        return "int"
    return "float"


def static(value, dtype: Optional[str] = None) -> Abs:
    array = np.asarray(value)
    if dtype == "float":
        array = array.astype(np.float64)
    return Abs(tuple(array.shape), dtype or dtype_of(array), array)


def _static_int(arg: Abs, what: str) -> int:
    if arg.value is None or arg.shape != ():
        raise ShapeError(f"{what} must be a whole number known when the model is compiled")
    value = float(arg.value)
    if not value.is_integer() or value < 0:
        raise ShapeError(f"{what} must be a non-negative whole number, got {value:g}")
    return int(value)


MAX_ELEMENTS = 1_000_000  # largest array built at compile time


def _sizes(args: list[Abs], name: str) -> tuple[int, ...]:
    dims = tuple(_static_int(a, f"the size given to `{name}`") for a in args)
    if math.prod(dims) > MAX_ELEMENTS:
        raise ShapeError(f"`{name}` would build over {MAX_ELEMENTS:,} elements when compiling")
    return dims


def _bounds(arg: Abs):
    if arg.value is None:
        return None
    flat = np.asarray(arg.value, dtype=np.float64)
    if flat.shape == ():
        return float(flat)
    if np.all(flat == flat.reshape(-1)[0]):
        return float(flat.reshape(-1)[0])
    return tuple(float(x) for x in flat.reshape(-1))


def distribution(name: str, args: list[Abs]) -> Abs:
    """Shape, dtype and support of one draw of a built-in distribution."""
    plain = args[1:] if name == "iid" else args[:1] if name == "Mixture" else args
    for a in plain:
        if a.dist is not None:
            raise ShapeError(f"`{name}` takes numbers, not a distribution")
    _, _, kind, discrete = DISTRIBUTIONS[name]
    dtype = "int" if discrete else "float"
    if name == "iid":
        inner, count = args
        if inner.dist is None:
            raise ShapeError("the first argument of `iid` must be a distribution, e.g. iid(Normal(0, 1), 5)")
        k = _static_int(count, "the number of draws of `iid`")
        return Abs((k, *inner.shape), inner.dtype, dist=name, support=inner.support)
    if name == "Mixture":
        weights, comps = args
        if comps.items is None or not comps.items or any(c.dist is None for c in comps.items):
            raise ShapeError("`Mixture` takes weights and a list of distributions: Mixture(w, [D1, D2])")
        if weights.shape != (len(comps.items),):
            raise ShapeError(
                f"`Mixture` has {len(comps.items)} components but weights of shape {_fmt_shape(weights.shape)}"
            )
        shape = broadcast(*(c.shape for c in comps.items))
        kinds = {c.support.kind for c in comps.items if c.support}
        support = comps.items[0].support if len(kinds) == 1 and kinds != {"interval"} else Support("real")
        return Abs(shape, promote(*(c.dtype for c in comps.items)), dist=name, support=support)
    if name == "SortedUniform":
        lo, hi, count = args
        if lo.shape != () or hi.shape != ():
            raise ShapeError("`SortedUniform(a, b, k)` takes scalar bounds")
        k = _static_int(count, "the number of draws of `SortedUniform`")
        return Abs((k,), "float", dist=name, support=Support("interval", _bounds(lo), _bounds(hi)))
    if name == "MvNormal":
        mu, cov = args
        if len(mu.shape) != 1:
            raise ShapeError(f"the mean of `MvNormal` must be a vector, got shape {_fmt_shape(mu.shape)}")
        k = mu.shape[0]
        if cov.shape != (k, k):
            raise ShapeError(
                f"the covariance of `MvNormal` must have shape {_fmt_shape((k, k))} to match its mean, "
                f"got {_fmt_shape(cov.shape)}"
            )
        return Abs((k,), "float", dist=name, support=Support("real"))
    if name == "Dirichlet":
        (alpha,) = args
        if len(alpha.shape) != 1:
            raise ShapeError("the concentration of `Dirichlet` must be a vector")
        return Abs(alpha.shape, "float", dist=name, support=Support("simplex"))
    if name == "Categorical":
        (p,) = args
        if len(p.shape) < 1:
            raise ShapeError("the probabilities of `Categorical` must be a vector")
        return Abs(p.shape[:-1], "int", dist=name, support=Support("integer"))
    if name == "Binomial":
        shape = broadcast(*(a.shape for a in args))
        return Abs(shape, "int", dist=name, support=Support("nonnegative_integer"))
    shape = broadcast(*(a.shape for a in args))
    if kind == "interval":
        if name == "Uniform":
            support = Support("interval", _bounds(args[0]), _bounds(args[1]))
        elif name == "TruncatedNormal":
            support = Support("interval", _bounds(args[2]), _bounds(args[3]))
        else:  # Beta
            support = Support("interval", 0.0, 1.0)
    else:
        support = Support(kind)
    return Abs(shape, dtype, dist=name, support=support)


def _fold(fn: Callable, *args: Abs) -> Optional[np.ndarray]:
    if all(a.value is not None for a in args):
        with np.errstate(all="ignore"):
            return np.asarray(fn(*(a.value for a in args)))
    return None


def function(name: str, args: list[Abs]) -> Abs:
    """Shape, dtype (and folded value when all arguments are static) of a built-in function call."""
    for a in args:
        if a.dist is not None:
            raise ShapeError(f"`{name}` takes numbers, not a distribution")
        if a.fn is not None:
            raise ShapeError(f"`{name}` takes numbers, not a function")
    if name in _UNARY:
        (x,) = args
        dtype = "int" if name in ("abs",) and x.dtype == "int" else "float"
        value = _fold(_UNARY[name], x)
        return Abs(x.shape, dtype, None if value is None else value.astype(np.float64 if dtype == "float" else value.dtype))
    if name in ("min", "max"):
        red = np.min if name == "min" else np.max
        if len(args) == 1:
            return Abs((), args[0].dtype, _fold(red, args[0]))
        ew = np.minimum if name == "min" else np.maximum
        return Abs(broadcast(args[0].shape, args[1].shape), promote(args[0].dtype, args[1].dtype), _fold(ew, *args))
    if name == "clamp":
        shape = broadcast(*(a.shape for a in args))
        return Abs(shape, promote(*(a.dtype for a in args)), _fold(np.clip, *args))
    if name in ("sum", "prod", "mean"):
        (x,) = args
        red = {"sum": np.sum, "prod": np.prod, "mean": np.mean}[name]
        dtype = "float" if name == "mean" else ("int" if x.dtype in ("int", "bool") else "float")
        return Abs((), dtype, _fold(red, x))
    if name == "cumsum":
        (x,) = args
        if len(x.shape) != 1:
            raise ShapeError(f"`cumsum` takes a vector, got shape {_fmt_shape(x.shape)}")
        return Abs(x.shape, x.dtype if x.dtype != "bool" else "int", _fold(np.cumsum, x))
    if name == "length":
        (x,) = args
        if x.items is not None:
            return static(len(x.items), "int")
        if len(x.shape) == 0:
            raise ShapeError("`length` of a scalar: it takes a vector")
        return static(x.shape[0], "int")
    if name in ("zeros", "ones"):
        dims = _sizes(args, name)
        fill = 0.0 if name == "zeros" else 1.0
        return static(np.full(dims, fill), "float")
    if name == "fill":
        value, *sizes = args
        if value.shape != ():
            raise ShapeError("`fill(value, n)` takes a scalar value")
        dims = _sizes(sizes, "fill")
        folded = None if value.value is None else np.full(dims, value.value)
        return Abs(dims, value.dtype, folded)
    if name == "dot":
        x, y = args
        if len(x.shape) != 1 or x.shape != y.shape:
            raise ShapeError(f"`dot` takes two vectors of equal length, got {_fmt_shape(x.shape)} and {_fmt_shape(y.shape)}")
        return Abs((), promote(x.dtype, y.dtype), _fold(np.dot, x, y))
    if name == "matmul":
        x, y = args
        if len(x.shape) not in (1, 2) or len(y.shape) not in (1, 2):
            raise ShapeError("`matmul` takes vectors or matrices")
        try:
            shape = np.matmul(np.zeros(x.shape), np.zeros(y.shape)).shape
        except ValueError:
            raise ShapeError(f"`matmul` of shapes {_fmt_shape(x.shape)} and {_fmt_shape(y.shape)}: inner sizes differ") from None
        return Abs(tuple(shape), promote(x.dtype, y.dtype), _fold(np.matmul, x, y))
    if name == "transpose":
        (x,) = args
        if len(x.shape) != 2:
            raise ShapeError(f"`transpose` takes a matrix, got shape {_fmt_shape(x.shape)}")
        return Abs(x.shape[::-1], x.dtype, _fold(np.transpose, x))
    if name in ("vcat", "hcat"):
        parts = [a.shape if a.shape else (1,) for a in args]
        if name == "vcat":
            if len({p[1:] for p in parts}) != 1:
                raise ShapeError("`vcat` needs pieces whose trailing shapes agree")
            shape = (sum(p[0] for p in parts), *parts[0][1:])
            folded = _fold(lambda *xs: np.concatenate([np.atleast_1d(x) for x in xs], axis=0), *args)
        else:
            if all(len(p) == 1 for p in parts):
                shape = (parts[0][0], len(parts)) if len({p[0] for p in parts}) == 1 else None
                if shape is None:
                    raise ShapeError("`hcat` needs columns of equal length")
                folded = _fold(lambda *xs: np.stack([np.atleast_1d(x) for x in xs], axis=1), *args)
            else:
                if len({p[0] for p in parts}) != 1 or any(len(p) != 2 for p in parts):
                    raise ShapeError("`hcat` needs pieces with equal numbers of rows")
                shape = (parts[0][0], sum(p[1] for p in parts))
                folded = _fold(lambda *xs: np.concatenate(xs, axis=1), *args)
        return Abs(shape, promote(*(a.dtype for a in args)), folded)
    raise ShapeError(f"no shape rule for `{name}`")  # pragma: no cover - table and rules agree
