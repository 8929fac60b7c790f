"""Backend stage: the checked IR → pure JAX functions (priors, site simulator, log prior, bijectors).

Input: a `ModelIR` (from `check` or the builder API) and Python callables for its externs.
Output: a `LoweredModel`, whose methods are pure functions of arrays and explicit PRNG keys —
jittable, vmappable and differentiable. Nothing is jitted here: callers jit once at their own
boundary (`jax.jit(model.simulate, static_argnums=1)`), so nothing retraces per call.

The IR's expression trees are interpreted at trace time (`_Interpreter`), so the traced program
contains only the arithmetic, draws and solves of the model. Conventions, with the why:

- Randomness: each variable gets its own key, `fold_in(key, position of the variable in the IR)`,
  and within it the n-th random request (a draw, a call of a user function) folds in n. Keys are
  therefore fixed by the model's structure: a fixed key gives identical samples, and adding a draw
  to one function does not change the draws of unrelated variables.
- Static values (literals, constants, model arguments, ranges, and whatever is computed from them
  alone) are folded with NumPy at trace time; sizes (`zeros(n)`, `iid(D, k)`) must be static.
- `if`/`?:` evaluate every branch and select elementwise (`jnp.where`); a static condition picks
  its branch at trace time.
- Simulated values are float32, discrete ones integer-valued, so that a failed simulation (e.g. a
  NaN from `odesolve`) stays NaN instead of wrapping to an integer; `check_simulations` reports
  NaN or infinite values with the offending parameters. Nothing is ever dropped silently.
- A model's per-site variables split into two phases: `sample_site_params` (inputs, locals and the
  deterministic values not depending on any observation) and `simulate_site` (observations and
  the values that depend on them). `simulate_site` is the single-site simulator: one call per site,
  so callers can count simulator calls (`simulate` makes `num_sites` of them, through `vmap`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from hierdsl.compiler.ir import E, ExternIR, FunctionIR, ModelIR, Variable

from .bijectors import bijector_for
from .builtins import BUILTINS
from .distributions import DISTRIBUTIONS, IID, Distribution, make_distribution
from .errors import NonFiniteSimulationError, RuntimeModelError
from .ode import DEFAULT_MAX_STEPS, odesolve
from .values import fold, is_static, static, static_int, xp_of

Array = jax.Array
Params = dict[str, Any]

_JAX_TRACER_ERRORS = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerArrayConversionError,
    jax.errors.TracerBoolConversionError,
    jax.errors.TracerIntegerConversionError,
)

_DTYPES = {"float": np.float32, "int": np.int32, "bool": np.bool_}


# ----------------------------------------------------------------------------- keys


class _Keys:
    """A deterministic stream of PRNG keys: the n-th request folds n into the base key.

    `key=None` is a context without randomness (log densities, bijectors); a draw there is an error
    naming `where`.
    """

    def __init__(self, key: Array | None, where: str):
        self._key = key
        self._where = where
        self._count = 0

    def next(self) -> Array:
        if self._key is None:
            raise RuntimeModelError(
                f"{self._where} draws random numbers, but it is evaluated where no randomness is "
                "available (a prior's arguments, a deterministic value used by a prior, or an ODE "
                "right-hand side); move the randomness into a model variable"
            )
        key = jax.random.fold_in(self._key, self._count)
        self._count += 1
        return key

    def child(self, where: str) -> _Keys:
        """The stream for a called function: one fresh key from this one."""
        return _Keys(None if self._key is None else self.next(), where)


# ----------------------------------------------------------------------------- externs


def _bind_externs(ir: ModelIR, functions: Mapping[str, Callable]) -> dict[str, Callable]:
    """Extern id → callable on evaluated arguments, checked now so a missing binding fails early."""
    used = _used_externs(ir)
    bound = {}
    for extern in ir.externs:
        if extern.id not in used:
            continue
        fn = functions.get(extern.name, functions.get(extern.id))
        if fn is None:
            kind = "extern host function" if extern.host else "extern function"
            passed = ", ".join(sorted(functions)) or "none"
            raise RuntimeModelError(
                f"{kind} `{extern.name}` has no Python binding (bindings passed: {passed}); pass it as "
                f"hierdsl.compile(..., functions={{{extern.name!r}: your_callable}})"
            )
        bound[extern.id] = _host_call(extern, fn) if extern.host else _traced_call(extern, fn)
    return bound


def _used_externs(ir: ModelIR) -> set[str]:
    used: set[str] = set()

    def walk(e: E) -> None:
        if e.tag == "xcall":
            used.add(e.data[0])
        for a in e.args:
            walk(a)

    for v in ir.variables:
        walk(v.expr)
    for f in ir.functions:
        walk(f.body)
    return used


def _check_result_shape(extern: ExternIR, shape: tuple[int, ...]) -> None:
    if extern.returns is not None and tuple(shape) != tuple(extern.returns):
        raise RuntimeModelError(
            f"extern function `{extern.name}` returned shape {tuple(shape)}, but it is declared to "
            f"return shape {tuple(extern.returns)}"
        )


def _traced_call(extern: ExternIR, fn: Callable) -> Callable:
    def call(*args):
        try:
            out = fn(*args)
        except _JAX_TRACER_ERRORS as err:
            reason = str(err).strip().splitlines()[0]
            raise RuntimeModelError(
                f"extern function `{extern.name}` is not JAX-traceable: it needs concrete values "
                f"({reason}). Declare it `extern host function {extern.name}(…)` to run it on the "
                "host through a callback, or rewrite it with jax.numpy"
            ) from None
        out = jnp.asarray(out)
        _check_result_shape(extern, out.shape)
        return out

    return call


def _host_call(extern: ExternIR, fn: Callable) -> Callable:
    if extern.returns is None:
        raise RuntimeModelError(
            f"extern host function `{extern.name}` needs a return annotation (e.g. `::Vector{{64}}`) so "
            "its result shape is known before it runs"
        )
    result = jax.ShapeDtypeStruct(tuple(extern.returns), jnp.float32)

    def on_host(*args):
        out = np.asarray(fn(*args), dtype=np.float32)
        _check_result_shape(extern, out.shape)
        return out

    def call(*args):
        args = [jnp.asarray(a, jnp.float32) for a in args]
        # One host call per site under vmap: arbitrary Python callables need not handle batches.
        return jax.pure_callback(on_host, result, *args, vmap_method="sequential")

    return call


# ----------------------------------------------------------------------------- interpreter


class _UserFunction:
    """A user function as a value (`fnref`), e.g. the right-hand side given to `odesolve`."""

    def __init__(self, interpreter: _Interpreter, function: FunctionIR):
        self.interpreter = interpreter
        self.function = function

    def __call__(self, *args: Any) -> Any:
        keys = _Keys(None, f"function `{self.function.name}` (passed as a value)")
        return self.interpreter.call_function(self.function, args, keys)


def _power(xp, a, b):
    # NumPy refuses integers to negative integer powers; Julia gives a float for 2^-1.0 only, but
    # folding a negative static integer power as float is the useful reading here.
    if xp is np and np.asarray(b).dtype.kind in "iu" and np.any(np.asarray(b) < 0):
        a = np.asarray(a, np.float32)
    return xp.power(a, b)


_BINARY: dict[str, Callable[[Any, Any, Any], Any]] = {
    "add": lambda xp, a, b: xp.add(a, b),
    "sub": lambda xp, a, b: xp.subtract(a, b),
    "mul": lambda xp, a, b: xp.multiply(a, b),
    "div": lambda xp, a, b: xp.true_divide(a, b),
    "pow": _power,
    "lt": lambda xp, a, b: xp.less(a, b),
    "le": lambda xp, a, b: xp.less_equal(a, b),
    "gt": lambda xp, a, b: xp.greater(a, b),
    "ge": lambda xp, a, b: xp.greater_equal(a, b),
    "eq": lambda xp, a, b: xp.equal(a, b),
    "ne": lambda xp, a, b: xp.not_equal(a, b),
    "and": lambda xp, a, b: xp.logical_and(a, b),
    "or": lambda xp, a, b: xp.logical_or(a, b),
}

_UNARY_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "neg": lambda xp, a: xp.negative(a),
    "pos": lambda xp, a: a,
    "not": lambda xp, a: xp.logical_not(a),
}


def _select(cond: Any, a: Any, b: Any) -> Any:
    """Elementwise choice; a static condition chooses at trace time."""
    if is_static(cond) and np.ndim(cond) == 0:
        return a if bool(cond) else b
    return jax.tree.map(lambda x, y: fold(lambda xp, c, p, q: xp.where(c, p, q), cond, x, y), a, b)


class _Interpreter:
    """Evaluates IR expressions to JAX (or, when static, NumPy) values at trace time."""

    def __init__(self, ir: ModelIR, externs: Mapping[str, Callable]):
        self.ir = ir
        self.functions = {f.id: f for f in ir.functions}
        self.constants = {c.id: _literal(c.value, c.dtype) for c in ir.constants}
        self.externs = dict(externs)
        self._dispatch: dict[str, Callable[[E, dict, _Keys], Any]] = {
            "lit": lambda e, env, keys: _literal(*e.data),
            "var": self._var,
            "const": lambda e, env, keys: self.constants[e.data[0]],
            "select": lambda e, env, keys: _select(*(self.eval(a, env, keys) for a in e.args)),
            "range": self._range,
            "vector": self._vector,
            "matrix": self._matrix,
            "tuple": lambda e, env, keys: tuple(self.eval(a, env, keys) for a in e.args),
            "index": self._index,
            "call": self._call,
            "ucall": self._ucall,
            "xcall": self._xcall,
            "fnref": lambda e, env, keys: _UserFunction(self, self.functions[e.data[0]]),
            "if": self._if,
            "block": self._block,
        }
        for tag, op in _BINARY.items():
            self._dispatch[tag] = self._binary_op(op)
        for tag, op in _UNARY_OPS.items():
            self._dispatch[tag] = self._unary_op(op)

    # -- entry points -----------------------------------------------------------
    def eval(self, e: E, env: dict[str, Any], keys: _Keys) -> Any:
        handler = self._dispatch.get(e.tag)
        if handler is None:
            where = "a statement outside a block" if e.tag in ("let", "draw", "kw", "colon", "slice") else "an unknown tag"
            raise RuntimeModelError(f"cannot evaluate IR node `{e.tag}`: {where} (an IR from a newer hierdsl?)")
        return handler(e, env, keys)

    def call_function(self, function: FunctionIR, args: tuple[Any, ...], keys: _Keys) -> Any:
        if len(args) != len(function.params):
            raise RuntimeModelError(
                f"function `{function.name}` takes {len(function.params)} argument(s), got {len(args)}"
            )
        env = dict(zip(function.params, args))
        return self.eval(function.body, env, keys.child(f"function `{function.name}`"))

    # -- handlers ---------------------------------------------------------------
    def _var(self, e: E, env: dict[str, Any], keys: _Keys) -> Any:
        name = e.data[0]
        if name not in env:
            raise RuntimeModelError(f"`{name}` is not available here (it is not a parameter, input or earlier value)")
        return env[name]

    def _binary_op(self, op):
        def handler(e, env, keys):
            a, b = (self.eval(x, env, keys) for x in e.args)
            return fold(op, a, b)

        return handler

    def _unary_op(self, op):
        def handler(e, env, keys):
            return fold(op, self.eval(e.args[0], env, keys))

        return handler

    def _range(self, e, env, keys):
        start, step, stop = (self.eval(a, env, keys) for a in e.args)
        if not all(is_static(x) for x in (start, step, stop)):
            raise RuntimeModelError("a range's start, step and stop must be known before the simulator runs")
        start, step, stop = (np.asarray(x) for x in (start, step, stop))
        integral = all(x.dtype.kind in "iub" for x in (start, step, stop))
        # Julia's length of an inclusive range, with slack for floating-point steps.
        count = max(int(np.floor((stop - start) / step + (0 if integral else 1e-6))) + 1, 0)
        values = start + step * np.arange(count)
        return static(values.astype(np.int32 if integral else np.float32))

    def _vector(self, e, env, keys):
        items = [self.eval(a, env, keys) for a in e.args]
        if items and any(isinstance(x, Distribution) for x in items):
            if not all(isinstance(x, Distribution) for x in items):
                raise RuntimeModelError("a vector cannot mix distributions and values")
            return items
        if any(isinstance(x, (tuple, list)) for x in items):
            raise RuntimeModelError("a vector's items must be numbers or arrays, not tuples")
        xp = xp_of(*items)
        out = xp.stack([xp.asarray(x) for x in items]) if items else np.zeros((0,), np.float32)
        return static(out) if xp is np else out

    def _matrix(self, e, env, keys):
        rows, cols = e.data
        items = [self.eval(a, env, keys) for a in e.args]
        if any(np.ndim(x) != 0 for x in items) or len(items) != rows * cols:
            raise RuntimeModelError(f"a {rows}×{cols} matrix literal needs {rows * cols} scalar entries")
        xp = xp_of(*items)
        out = xp.reshape(xp.stack([xp.asarray(x) for x in items]), (rows, cols))
        return static(out) if xp is np else out

    def _index(self, e, env, keys):
        value = self.eval(e.args[0], env, keys)
        indices = [self._index_item(i, env, keys) for i in e.args[1:]]
        if isinstance(value, (tuple, list)):
            if len(indices) != 1 or not is_static(indices[0]) or np.ndim(indices[0]) != 0:
                raise RuntimeModelError("a tuple is indexed by one fixed position, e.g. p[1]")
            return value[int(indices[0])]
        if len(indices) > np.ndim(value):
            raise RuntimeModelError(f"{len(indices)} indices given for a value of shape {np.shape(value)}")
        if is_static(value) and all(is_static(i) or isinstance(i, slice) for i in indices):
            return static(np.asarray(value)[tuple(indices)])
        return jnp.asarray(value)[tuple(indices)]

    def _index_item(self, e: E, env, keys) -> Any:
        """A 0-based NumPy-style index from a 1-based IR index."""
        if e.tag == "colon":
            return slice(None)
        if e.tag == "slice":
            start, step, stop = e.data
            end = stop - 2 if step < 0 else stop
            return slice(start - 1, None if end < 0 else end, step)
        index = self.eval(e, env, keys)
        if is_static(index):
            return static(np.asarray(index).astype(np.int32) - 1)
        # Indices drawn as float (e.g. a Categorical category) are whole numbers: truncate.
        return jnp.asarray(index).astype(jnp.int32) - 1

    def _call(self, e, env, keys):
        name = e.data[0]
        args = [self.eval(a, env, keys) for a in e.args if a.tag != "kw"]
        kwargs = {a.data[0]: self.eval(a.args[0], env, keys) for a in e.args if a.tag == "kw"}
        if name in DISTRIBUTIONS:
            if kwargs:
                raise RuntimeModelError(f"{name} takes no keyword arguments")
            return make_distribution(name, args)
        if name == "odesolve":
            return self._odesolve(args, kwargs)
        if name in BUILTINS:
            return BUILTINS[name](args, kwargs)
        raise RuntimeModelError(f"unknown built-in `{name}`")

    def _odesolve(self, args, kwargs):
        if len(args) != 3 or not isinstance(args[0], _UserFunction):
            raise RuntimeModelError("odesolve takes (rhs, u0, times), with rhs the name of a function")
        rhs: _UserFunction = args[0]
        allowed = {"params", "t0", "solver", "rtol", "atol", "max_steps"}
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise RuntimeModelError(f"odesolve has no keyword argument(s) {', '.join(unknown)}")
        options = {k: kwargs[k] for k in ("params", "t0") if k in kwargs}
        for tolerance in ("rtol", "atol"):
            if tolerance in kwargs:
                value = kwargs[tolerance]
                options[tolerance] = float(value) if is_static(value) else value
        if "solver" in kwargs:
            if not isinstance(kwargs["solver"], str):
                raise RuntimeModelError('odesolve\'s solver is a string, e.g. solver = "tsit5"')
            options["solver"] = kwargs["solver"]
        max_steps = static_int(kwargs.get("max_steps", DEFAULT_MAX_STEPS), "odesolve's max_steps")
        num_params = len(rhs.function.params)
        if num_params not in (2, 3):
            raise RuntimeModelError(
                f"odesolve's right-hand side `{rhs.function.name}` must take (t, u) or (t, u, p), "
                f"it takes {num_params} argument(s)"
            )

        def vector_field(t, u, p):
            return rhs(t, u, p) if num_params == 3 else rhs(t, u)

        return odesolve(vector_field, args[1], args[2], max_steps=max_steps, **options)

    def _ucall(self, e, env, keys):
        function = self.functions[e.data[0]]
        args = tuple(self.eval(a, env, keys) for a in e.args)
        return self.call_function(function, args, keys)

    def _xcall(self, e, env, keys):
        args = [self.eval(a, env, keys) for a in e.args]
        return self.externs[e.data[0]](*args)

    def _if(self, e, env, keys):
        # Evaluate every branch (spec §5), then select from the last condition backwards.
        conditions = [self.eval(c, env, keys) for c in e.args[:-1:2]]
        branches = [self.eval(b, env, keys) for b in e.args[1::2]] + [self.eval(e.args[-1], env, keys)]
        out = branches[-1]
        for cond, branch in zip(reversed(conditions), reversed(branches[:-1])):
            out = _select(cond, branch, out)
        return out

    def _block(self, e, env, keys):
        scope = dict(env)
        for statement in e.args[:-1]:
            if statement.tag == "let":
                _bind(scope, statement.data, self.eval(statement.args[0], scope, keys))
            elif statement.tag == "draw":
                dist = self.eval(statement.args[0], scope, keys)
                name = statement.data[0]
                if not isinstance(dist, Distribution):
                    raise RuntimeModelError(f"`{name} ~ …` needs a distribution on the right-hand side")
                scope[name] = dist.sample(keys.next())
            else:
                raise RuntimeModelError(f"unexpected statement `{statement.tag}` in a block")
        return self.eval(e.args[-1], scope, keys)


def _literal(value: Any, dtype: str) -> Any:
    if dtype == "str":
        return value
    if dtype not in _DTYPES:
        raise RuntimeModelError(f"unknown literal dtype {dtype!r}")
    return np.asarray(value, dtype=_DTYPES[dtype])


def _bind(scope: dict[str, Any], names: tuple[str, ...], value: Any) -> None:
    if len(names) == 1:
        scope[names[0]] = value
        return
    # Destructuring: a tuple by its items, an array along its first axis.
    length = len(value) if isinstance(value, (tuple, list)) else (np.shape(value) or (None,))[0]
    if length != len(names):
        raise RuntimeModelError(
            f"cannot unpack {length if length is not None else 'a scalar'} value(s) into "
            f"{len(names)} names ({', '.join(names)})"
        )
    for i, name in enumerate(names):
        scope[name] = value[i]


# ----------------------------------------------------------------------------- the model


class LoweredModel:
    """One model lowered to pure JAX functions.

    Arguments:
        ir: the checked model.
        functions: Python callables for the model's externs, by extern name. An `extern function`
            is called on JAX arrays while tracing; an `extern host function` on NumPy arrays on
            the host, through `jax.pure_callback`.

    Value dictionaries map IR variable names to arrays. Globals are at their IR shape; per-site
    values are at their IR shape for one site and gain a leading site axis from `simulate`, and in
    the `params` of `log_prior` and the bijectors.
    """

    def __init__(self, ir: ModelIR, functions: Mapping[str, Callable] | None = None):
        self.ir = ir
        self._interpreter = _Interpreter(ir, _bind_externs(ir, functions or {}))
        self._args = {name: _literal(value, _dtype_of(value)) for name, value in ir.args}
        self._position = {v.name: i for i, v in enumerate(ir.variables)}
        self._global_vars = tuple(v for v in ir.variables if not v.per_site)
        site_vars = [v for v in ir.variables if v.per_site]
        after_observations: set[str] = set()
        for v in site_vars:
            if v.role == "observation" or any(d in after_observations for d in v.deps):
                after_observations.add(v.name)
        for v in site_vars:
            if v.name in after_observations and v.role in ("local", "input"):
                raise RuntimeModelError(
                    f"{v.role} `{v.name}` depends on an observation; parameters and inputs must be "
                    "determined before a site's observations are simulated"
                )
        self._site_param_vars = tuple(v for v in site_vars if v.name not in after_observations)
        self._site_sim_vars = tuple(v for v in site_vars if v.name in after_observations)
        # The site values a local's prior reads (transitively), in order: all the site log prior needs.
        needed = {v.name for v in ir.locals}
        for v in reversed(self._site_param_vars):
            if v.name in needed:
                needed.update(v.deps)
        self._site_prior_vars = tuple(v for v in self._site_param_vars if v.name in needed)
        # Jitted functions built on this model, by purpose (`compiled_once`): training stages,
        # rounds, estimators and benchmark cells of one model reuse them instead of re-tracing.
        self.compiled: dict = {}

    def compiled_once(self, key, build: Callable[[], Callable]) -> Callable:
        """The function `build()` made the first time `key` is asked for on this model."""
        if key not in self.compiled:
            self.compiled[key] = build()
        return self.compiled[key]

    # -- names ------------------------------------------------------------------
    @property
    def parameter_names(self) -> tuple[str, ...]:
        """The inferred parameters: globals, then locals."""
        return tuple(v.name for v in self.ir.globals + self.ir.locals)

    @property
    def prior_inputs(self) -> tuple[str, ...]:
        """The inputs that locals' priors read; `log_prior` and the bijectors need their values."""
        return tuple(v.name for v in self._site_prior_vars if v.role == "input")

    # -- simulation -------------------------------------------------------------
    def sample_globals(self, key: Array, given: Mapping[str, Any] | None = None) -> Params:
        """Draw the globals from their priors, with the global deterministic values.

        `given` fixes some globals instead of drawing them.
        """
        return self._run(self._global_vars, key, dict(self._args), _only(given, ("global",), self.ir))

    def sample_site_params(self, key: Array, globals: Mapping[str, Any], given: Mapping[str, Any] | None = None) -> Params:
        """One site's inputs, locals and deterministic values that come before its observations.

        `given` fixes some inputs or locals (for one site) instead of drawing them.
        """
        env = self._global_env(globals)
        return self._run(self._site_param_vars, key, env, _only(given, ("local", "input"), self.ir))

    def simulate_site(self, key: Array, globals: Mapping[str, Any], site_params: Mapping[str, Any]) -> Params:
        """The single-site simulator: one site's observations (and values depending on them)."""
        env = self._global_env(globals)
        for v in self._site_param_vars:
            if v.name in site_params:
                env[v.name] = site_params[v.name]
            elif v.stochastic:
                raise RuntimeModelError(f"simulate_site needs the site's {v.role} `{v.name}` in site_params")
            else:
                env[v.name] = self._evaluate(v, None, env)
        return self._run(self._site_sim_vars, key, env, {})

    def sample_site(self, key: Array, globals: Mapping[str, Any], given: Mapping[str, Any] | None = None) -> Params:
        """`sample_site_params` then `simulate_site`: everything of one site."""
        key_params, key_simulate = jax.random.split(key)
        site_params = self.sample_site_params(key_params, globals, given)
        return {**site_params, **self.simulate_site(key_simulate, globals, site_params)}

    def simulate(self, key: Array, num_sites: int, params: Mapping[str, Any] | None = None) -> Params:
        """Simulate the whole model: globals at their shape, per-site values with a site axis.

        Arguments:
            key: a PRNG key.
            num_sites: the number of sites (static).
            params: optional fixed values: globals at their shape, locals and inputs with a leading
                site axis of length `num_sites`; the rest is drawn. Deterministic values and
                observations are always computed.
        """
        params = dict(params or {})
        key_globals, key_sites = jax.random.split(key)
        globals = self.sample_globals(key_globals, params)
        site_given = _only(params, ("local", "input"), self.ir)
        for name, value in site_given.items():
            if np.shape(value)[:1] != (num_sites,):
                raise RuntimeModelError(
                    f"per-site value `{name}` has shape {np.shape(value)}; it needs a leading site axis "
                    f"of length num_sites = {num_sites}"
                )
        keys = jax.random.split(key_sites, num_sites)
        sites = jax.vmap(self.sample_site, in_axes=(0, None, 0))(keys, globals, site_given)
        return {**globals, **sites}

    # -- densities and bijectors -------------------------------------------------
    def log_prior(self, params: Mapping[str, Any]) -> Array:
        """Sum of the globals' log priors and, over sites, of the locals' log priors.

        `params` holds the globals, the locals with a site axis, and the `prior_inputs` (if any)
        with a site axis.
        """
        globals, total = self._prior_pass(self._global_vars, dict(self._args), params, "log_prob")
        return _add_log_density(total, self._over_sites(globals, params, "log_prob")[1])

    def global_log_prior(self, globals: Mapping[str, Any]) -> Array:
        """The globals' log prior."""
        return self._prior_pass(self._global_vars, dict(self._args), globals, "log_prob")[1]

    def site_log_prior(self, globals: Mapping[str, Any], site_params: Mapping[str, Any]) -> Array:
        """One site's locals' log prior given the globals (no site axis)."""
        return self._prior_pass(self._site_prior_vars, self._global_env(globals), site_params, "log_prob")[1]

    @property
    def unconstrained_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of each parameter in unconstrained space (per site for locals).

        Equal to the IR shape except for simplex parameters (one element fewer on the last axis).
        """
        return {v.name: _unconstrained_shape(v) for v in self.ir.globals + self.ir.locals}

    def to_unconstrained(self, params: Mapping[str, Any]) -> Params:
        """Map constrained parameters (globals, locals with a site axis) to unconstrained space.

        `prior_inputs` in `params` are read for the locals' bounds and passed through unchanged.
        """
        globals, _ = self._prior_pass(self._global_vars, dict(self._args), params, "inverse")
        z_globals = {v.name: globals[v.name] for v in self.ir.globals}
        site, _ = self._over_sites(_values(params, self._global_vars), params, "inverse")
        return {**z_globals, **site}

    def to_constrained(self, z: Mapping[str, Any]) -> tuple[Params, Array]:
        """Map unconstrained parameters back; returns them and the log |det| of the Jacobian.

        The log-Jacobian is a scalar summed over all parameters and sites, so that
        log p(z) = log_prior(params) + log_det.
        """
        globals, log_det = self._prior_pass(self._global_vars, dict(self._args), z, "forward")
        site, site_log_det = self._over_sites(globals, z, "forward")
        return {**{v.name: globals[v.name] for v in self.ir.globals}, **site}, log_det + site_log_det

    def globals_to_constrained(self, z_globals: Mapping[str, Any]) -> tuple[Params, Array]:
        """The globals part of `to_constrained` (with the global deterministic values)."""
        return self._prior_pass(self._global_vars, dict(self._args), z_globals, "forward")

    def site_to_constrained(self, globals: Mapping[str, Any], z_site: Mapping[str, Any]) -> tuple[Params, Array]:
        """One site's part of `to_constrained` given constrained globals (no site axis)."""
        values, log_det = self._prior_pass(self._site_prior_vars, self._global_env(globals), z_site, "forward")
        return {name: values[name] for name in z_site if name in values}, log_det

    # -- internals --------------------------------------------------------------
    def _global_env(self, globals: Mapping[str, Any]) -> dict[str, Any]:
        """Model arguments and globals, computing global deterministic values the caller left out."""
        env = dict(self._args)
        for v in self._global_vars:
            if v.name in globals:
                env[v.name] = globals[v.name]
            elif v.role == "global":
                raise RuntimeModelError(f"the global parameter `{v.name}` is missing from the globals given")
            else:
                env[v.name] = self._evaluate(v, None, env)
        return env

    def _run(self, variables: Iterable[Variable], key: Array | None, env: dict[str, Any], given: Mapping[str, Any]) -> Params:
        out = {}
        for v in variables:
            value = given[v.name] if v.name in given else self._evaluate(v, key, env)
            env[v.name] = value
            out[v.name] = value
        return out

    def _evaluate(self, v: Variable, key: Array | None, env: dict[str, Any]) -> Any:
        """One variable's value: a draw from its distribution, or its expression's value."""
        var_key = None if key is None else jax.random.fold_in(key, self._position[v.name])
        keys = _Keys(var_key, f"`{v.name}`")
        if v.stochastic:
            value = self._prior(v, env, keys).sample(keys.next())
        else:
            value = self._interpreter.eval(v.expr, env, keys)
        return _conform(value, v)

    def _prior(self, v: Variable, env: dict[str, Any], keys: _Keys | None = None) -> Distribution:
        """The distribution of a stochastic variable, shaped like the variable."""
        dist = self._interpreter.eval(v.expr, env, keys or _Keys(None, f"the prior of `{v.name}`"))
        if not isinstance(dist, Distribution):
            raise RuntimeModelError(f"`{v.name} ~ …` needs a distribution on the right-hand side")
        if dist.shape == tuple(v.shape):
            return dist
        extra = len(v.shape) - len(dist.shape)
        if extra > 0 and tuple(v.shape[extra:]) == dist.shape:
            # `x::Vector{3} ~ Normal(0, 1)`: independent draws filling the declared shape.
            return IID(dist, tuple(v.shape[:extra]))
        raise RuntimeModelError(
            f"`{v.name}` has shape {tuple(v.shape)} in the IR, but its distribution draws shape {dist.shape}"
        )

    def _prior_pass(self, variables: Iterable[Variable], env: dict[str, Any], values: Mapping[str, Any], mode: str) -> tuple[Params, Array]:
        """Walk variables in order, evaluating each prior given the values before it.

        mode "log_prob": `values` are constrained; returns them and the sum of log priors.
        mode "forward": `values` are unconstrained; returns constrained values and the log-Jacobian.
        mode "inverse": `values` are constrained; returns unconstrained values.
        Deterministic values are recomputed; inputs are read from `values` and passed through.
        """
        out: Params = {}
        total = jnp.zeros((), jnp.float32)
        for v in variables:
            if v.role in ("global", "local"):
                if v.name not in values:
                    raise RuntimeModelError(f"parameter `{v.name}` is missing")
                dist = self._prior(v, env)
                given = values[v.name]
                if mode == "log_prob":
                    value = given
                    total = _add_log_density(total, jnp.sum(dist.log_prob(jnp.asarray(given, jnp.float32))))
                    out[v.name] = given
                elif mode == "forward":
                    value, log_det = bijector_for(dist, v.name).forward(given)
                    total = total + log_det
                    out[v.name] = value
                else:
                    value = given
                    out[v.name] = bijector_for(dist, v.name).inverse(given)
            elif v.role == "input":
                if v.name not in values:
                    raise RuntimeModelError(
                        f"the prior of a local parameter reads the input `{v.name}`: pass its values too"
                    )
                value = out[v.name] = values[v.name]
            else:
                value = out[v.name] = self._evaluate(v, None, env)
            env[v.name] = value
        return out, total

    def _over_sites(self, globals: Mapping[str, Any], values: Mapping[str, Any], mode: str) -> tuple[Params, Array]:
        """`_prior_pass` over the site phase, vmapped over the site axis of `values`."""
        names = [v.name for v in self._site_prior_vars if v.role in ("local", "input")]
        if not names:
            return {}, jnp.zeros((), jnp.float32)
        site_values = {name: values[name] for name in names if name in values}
        global_env = self._global_env(globals)

        def one_site(site):
            out, total = self._prior_pass(self._site_prior_vars, dict(global_env), site, mode)
            return {name: out[name] for name in names if name in out}, total

        out, totals = jax.vmap(one_site)(site_values)
        if mode == "log_prob":
            return out, jnp.where(jnp.any(totals == -jnp.inf), -jnp.inf, jnp.sum(totals))
        return out, jnp.sum(totals)


def _add_log_density(total: Array, term: Array) -> Array:
    """total + term, staying −inf once a parameter is outside its support.

    Later priors may then be evaluated at invalid arguments (a negative scale) and give NaN; the
    density is still zero.
    """
    return jnp.where(total == -jnp.inf, -jnp.inf, total + term)


def _only(values: Mapping[str, Any] | None, roles: tuple[str, ...], ir: ModelIR) -> dict[str, Any]:
    if not values:
        return {}
    names = {v.name for v in ir.by_role(*roles)}
    return {k: v for k, v in values.items() if k in names}


def _values(values: Mapping[str, Any], variables: Iterable[Variable]) -> dict[str, Any]:
    return {v.name: values[v.name] for v in variables if v.name in values}


def _dtype_of(value: Any) -> str:
    kind = np.asarray(value).dtype.kind
    return "bool" if kind == "b" else "int" if kind in "iu" else "float"


def _unconstrained_shape(v: Variable) -> tuple[int, ...]:
    if v.support.kind == "simplex":
        return tuple(v.shape[:-1]) + (v.shape[-1] - 1,)
    return tuple(v.shape)


def _conform(value: Any, v: Variable) -> Any:
    """Check a value against the IR's shape, broadcasting a scalar-like value to it."""
    if isinstance(value, tuple):
        return value
    if isinstance(value, (list, Distribution, _UserFunction, str)):
        raise RuntimeModelError(f"`{v.name}` evaluates to a {type(value).__name__}, not a number or array")
    shape = np.shape(value)
    if shape == tuple(v.shape):
        return value
    try:
        fits = np.broadcast_shapes(shape, tuple(v.shape)) == tuple(v.shape)
    except ValueError:
        fits = False
    if not fits:
        raise RuntimeModelError(
            f"`{v.name}` evaluates to shape {shape}, but the compiler inferred shape {tuple(v.shape)}"
        )
    return np.broadcast_to(value, v.shape) if is_static(value) else jnp.broadcast_to(value, v.shape)


# ----------------------------------------------------------------------------- NaN detection


def check_simulations(sims: Mapping[str, Any], params: Mapping[str, Any] | None = None) -> None:
    """Raise if any simulation in a batch holds NaN or infinite values (host-side, after the batch).

    Arguments:
        sims: simulated values sharing a leading batch axis (e.g. `simulate`'s per-site values, or a
            batch of single-site simulations).
        params: the parameters the batch was simulated from; arrays with the same leading axis are
            indexed per simulation, others (e.g. globals shared by all sites) shown whole.

    Raises:
        NonFiniteSimulationError: with the count of non-finite simulations and the first offending
            parameter values.
    """
    arrays = {name: np.asarray(value) for name, value in sims.items()}
    floats = {name: a for name, a in arrays.items() if a.dtype.kind in "fc" and a.ndim >= 1}
    if not floats:
        return
    batch = {a.shape[0] for a in floats.values()}
    if len(batch) != 1:
        raise RuntimeModelError(
            f"check_simulations needs a common leading batch axis, got shapes "
            f"{ {n: a.shape for n, a in floats.items()} }"
        )
    (total,) = batch
    bad = np.zeros(total, bool)
    culprits = []
    for name, a in floats.items():
        row_bad = ~np.isfinite(a.reshape(total, -1)).all(axis=1)
        if row_bad.any():
            culprits.append(name)
        bad |= row_bad
    if not bad.any():
        return
    indices = np.flatnonzero(bad)
    first = int(indices[0])
    first_params = {}
    for name, value in (params or {}).items():
        a = np.asarray(value)
        first_params[name] = a[first] if a.ndim >= 1 and a.shape[0] == total else a
    shown = ", ".join(f"{k} = {np.array2string(np.asarray(v), precision=4, threshold=10)}" for k, v in first_params.items())
    raise NonFiniteSimulationError(
        f"{len(indices)} of {total} simulations produced NaN or infinite values (in {', '.join(culprits)}); "
        f"the first is simulation {first}" + (f", with {shown}" if shown else "") + ". "
        "This usually means parameters far in the prior's tail (e.g. an ODE solve that did not finish); "
        "narrow the prior or make the simulator robust there. Non-finite simulations are never dropped silently.",
        count=len(indices),
        total=total,
        indices=indices,
        first_params=first_params,
    )
