"""hierdsl: simulation-based inference for hierarchical models written in `.hsbi`.

Start with `hierdsl.compile("model.hsbi")`; build models in Python with `hierdsl.builder`.
"""

__version__ = "0.1.0"

from hierdsl.compiler.errors import HsbiError
from hierdsl.model import Model, compile

__all__ = ["HsbiError", "Model", "compile", "__version__"]
