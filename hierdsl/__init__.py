"""hierdsl: simulation-based inference for hierarchical models written in `.hsbi`.

Start with `hierdsl.compile("model.hsbi")`; build models in Python with `hierdsl.builder`.
"""

__version__ = "0.1.0"

from hierdsl.compiler.errors import HsbiError
from hierdsl.model import Model, compile

__all__ = ["HsbiError", "Model", "compile", "enable_compilation_cache", "fit", "load", "read_data", "__version__"]


def __getattr__(name):
    # The inference API pulls in JAX; import it on first use so `hierdsl compile` stays quick.
    if name == "fit":
        from hierdsl.inference import fit

        return fit
    if name == "load":
        from hierdsl.checkpoint import load

        return load
    if name == "enable_compilation_cache":
        from hierdsl.cache import enable_compilation_cache

        return enable_compilation_cache
    if name == "read_data":
        from hierdsl.data import read_data

        return read_data
    raise AttributeError(f"module 'hierdsl' has no attribute {name!r}")
