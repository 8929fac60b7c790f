"""`odesolve` of `.hsbi` (spec §7) lowered to one Diffrax solve (part of the IR → JAX stage).

`odesolve(rhs, u0, times; params, t0, solver, rtol, atol)` integrates du/dt = rhs(t, u, params)
from t0 and returns u at each of `times`, shape `(length(times), length(u0))`. The solve is
adaptive (a PID step-size controller with the given tolerances), differentiable (Diffrax's
checkpointed reverse mode) and vmappable (`times` may differ per site).

Failures do not raise inside `jit`: the solve runs with `throw=False`, and if it does not finish
(step-size collapse, more than `max_steps` steps) every returned value is NaN. Simulations are then
non-finite, and `check_simulations` reports them with the offending parameters after the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import diffrax
import jax
import jax.numpy as jnp

from .errors import RuntimeModelError

Array = jax.Array

# Explicit Runge–Kutta solvers for non-stiff problems, and an implicit one for stiff problems.
SOLVERS: dict[str, Callable[[], diffrax.AbstractSolver]] = {
    "tsit5": diffrax.Tsit5,
    "dopri5": diffrax.Dopri5,
    "dopri8": diffrax.Dopri8,
    "kvaerno5": diffrax.Kvaerno5,
}

# Enough for the benchmark's SIR (a few hundred steps) with ample margin; a solve needing more is
# almost always a parameter value far in the prior's tail, reported as NaN rather than waited on
# (under vmap every site runs until the slowest finishes).
DEFAULT_MAX_STEPS = 16_384


def odesolve(
    rhs: Callable[[Array, Array, Any], Array],
    u0: Any,
    times: Any,
    *,
    params: Any = None,
    t0: Any = 0.0,
    solver: str = "tsit5",
    rtol: Any = 1e-6,
    atol: Any = 1e-6,
    max_steps: int = DEFAULT_MAX_STEPS,
) -> Array:
    """Solve an ODE and save the state at `times` (shape `times.shape + u0.shape`).

    Arguments:
        rhs: `rhs(t, u, params) -> du/dt`, JAX-traceable.
        u0: the state at `t0`.
        times: increasing save times, all `>= t0`; the solve ends at the last one.
        params: passed to `rhs` unchanged (any pytree, e.g. a tuple of scalars).
        t0: the initial time.
        solver: one of `SOLVERS`.
        rtol, atol: tolerances of the adaptive step-size controller.
        max_steps: the step budget; a solve that needs more returns NaN.
    """
    if solver not in SOLVERS:
        raise RuntimeModelError(
            f"odesolve has no solver {solver!r}; choose one of {', '.join(repr(s) for s in SOLVERS)}"
        )
    y0 = jnp.asarray(u0, jnp.float32)
    ts = jnp.asarray(times, jnp.float32)
    if ts.ndim != 1 or ts.shape[0] == 0:
        raise RuntimeModelError(f"odesolve needs a non-empty vector of save times, got shape {ts.shape}")

    def vector_field(t, y, args):
        return jnp.asarray(rhs(t, y, args), jnp.float32).reshape(y.shape)

    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field),
        SOLVERS[solver](),
        t0=jnp.asarray(t0, jnp.float32),
        t1=ts[-1],
        dt0=None,
        y0=y0,
        args=params,
        saveat=diffrax.SaveAt(ts=ts),
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        max_steps=max_steps,
        throw=False,
    )
    return jnp.where(solution.result == diffrax.RESULTS.successful, solution.ys, jnp.nan)
