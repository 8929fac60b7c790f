"""Errors raised by the runtime stages (IR → JAX functions, and running them).

The compiler reports problems in the source with spans (`hierdsl.compiler.HsbiError`); these are
the problems that only show when a model is lowered or run: an extern without a Python binding, a
callable that JAX cannot trace, a value whose runtime shape disagrees with the IR, a batch of
simulations with NaN or infinite values. Each message says what went wrong, why, and how to fix it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class RuntimeModelError(Exception):
    """A model could not be lowered or run."""


class NonFiniteSimulationError(RuntimeModelError):
    """Some simulations in a batch produced NaN or infinite values.

    Attributes:
        count: how many simulations in the batch are non-finite.
        total: how many simulations the batch holds.
        indices: the batch indices of the offending simulations.
        first_params: the parameter values of the first offending simulation.
    """

    def __init__(self, message: str, count: int, total: int, indices: Any, first_params: Mapping[str, Any]):
        super().__init__(message)
        self.count = count
        self.total = total
        self.indices = indices
        self.first_params = dict(first_params)
