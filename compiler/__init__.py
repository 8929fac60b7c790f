"""The `.hsbi` compiler: text → AST → checked IR. Never imports JAX."""

from .ast import Program, Span
from .errors import Diagnostic, HsbiError
from .ir import E, ModelIR, Support, Variable

__all__ = ["Diagnostic", "E", "HsbiError", "ModelIR", "Program", "Span", "Support", "Variable"]
