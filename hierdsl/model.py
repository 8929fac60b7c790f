"""Public API, compile step: `.hsbi` path or source (or a builder's AST) → `Model`.

A `Model` holds the checked IR, the warnings and the Python callables bound to its externs; the
runtime (simulation, inference) is built from it on demand.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Union

from hierdsl.compiler import ast
from hierdsl.compiler.check import check
from hierdsl.compiler.errors import Diagnostic, HsbiError, error
from hierdsl.compiler.ir import ModelIR
from hierdsl.compiler.load import Loaded, load

PathOrSource = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class Model:
    """A compiled hierarchical model: its IR plus what the runtime needs to run it."""

    ir: ModelIR
    warnings: tuple[Diagnostic, ...] = ()
    functions: Mapping[str, Callable] = field(default_factory=dict)
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)
    definitions: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)
    path: Optional[str] = None
    _cache: dict = field(default_factory=dict, compare=False, repr=False)  # the lowered model

    @property
    def name(self) -> str:
        return self.ir.name

    @property
    def hash(self) -> str:
        return self.ir.hash

    def lowered(self):
        """The model lowered to JAX (`hierdsl.runtime.lower.LoweredModel`), built once."""
        if "lowered" not in self._cache:
            from hierdsl.runtime.lower import LoweredModel

            self._cache["lowered"] = LoweredModel(self.ir, dict(self.functions))
        return self._cache["lowered"]

    def simulate(self, key, n_sites: Optional[int] = None, params: Optional[Mapping[str, Any]] = None) -> dict:
        """Simulate a data set: globals at their shape, per-site values with a leading site axis.

        `params` fixes some globals (at their shape) or locals/inputs (with a site axis); the rest is
        drawn from the prior. Compiled once per site count.
        """
        import jax

        n_sites = int(n_sites or self.ir.num_sites)
        lowered = self.lowered()
        fn = lowered.compiled_once(("simulate", n_sites), lambda: jax.jit(lambda k, p: lowered.simulate(k, n_sites, p)))
        return fn(key, dict(params or {}))

    def structure(self) -> str:
        """The global/site structure as a text table (what `hierdsl compile` prints)."""
        from hierdsl.report import structure_table

        return structure_table(self)


def _looks_like_path(text: str) -> bool:
    return "\n" not in text and (text.endswith(".hsbi") or os.path.exists(text))


def compile(
    path_or_source: PathOrSource,
    *,
    functions: Optional[Mapping[str, Callable]] = None,
    model: Optional[str] = None,
    args: Optional[Mapping[str, Any]] = None,
    import_targets: bool = False,
) -> Model:
    """Compile a `.hsbi` file (a path) or source text into a `Model`.

    Args:
        path_or_source: a path to a `.hsbi` file, or the model text itself.
        functions: Python callables for the file's `extern` declarations, by name.
        model: which model to compile when the file defines several.
        args: values for model arguments, overriding their defaults (e.g. `{"n_sites": 10}`).
        import_targets: import `extern … = "module:attr"` targets that `functions` does not
            supply. Off by default: a model file must not run Python unless the user opts in.

    Raises:
        HsbiError: for any problem in the model text, with every error rendered at its source.
    """
    text = os.fspath(path_or_source)
    if _looks_like_path(text):
        loaded = load(text)
        path = text
    else:
        loaded = load(source=text)
        path = None
    return _finish(loaded, functions, model, args, import_targets, path)


def compile_program(program: ast.Program, *, functions=None, model=None, args=None) -> Model:
    """Compile an AST built in Python (the builder API goes through here)."""
    return _finish(Loaded(program, {}), functions, model, args, False, None)


def _finish(loaded: Loaded, functions, model, args, import_targets, path) -> Model:
    result = check(loaded.program, loaded.sources, model=model, args=args)
    bound = _bind_externs(result.ir, dict(functions or {}), import_targets, path, loaded.sources)
    return Model(result.ir, result.warnings, bound, loaded.sources, result.definitions, path)


def _bind_externs(ir: ModelIR, functions: dict, import_targets: bool, path, sources) -> dict:
    names = {x.name for x in ir.externs}
    unknown = sorted(set(functions) - names)
    if unknown:
        raise HsbiError([error(
            f"`functions` supplies {', '.join(f'`{n}`' for n in unknown)}, which the model does not declare",
            label="declare it with `extern function name(args)::Type`, or remove it",
        )], sources)
    if not import_targets:
        return functions
    import importlib
    import sys

    bound = dict(functions)
    base = os.path.dirname(os.path.abspath(path)) if path else os.getcwd()
    for ext in ir.externs:
        if ext.name in bound or ext.target is None:
            continue
        module_name, _, attr = ext.target.partition(":")
        if base not in sys.path:
            sys.path.insert(0, base)
        try:
            module = importlib.import_module(module_name)
            bound[ext.name] = getattr(module, attr)
        except (ImportError, AttributeError) as exc:
            raise HsbiError([error(
                f"cannot import extern `{ext.name}` from \"{ext.target}\": {exc}",
                label=f"make `{module_name}` importable (looked beside the model file and on sys.path)",
            )], sources) from None
    return bound
