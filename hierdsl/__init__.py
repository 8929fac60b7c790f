"""hierdsl: simulation-based inference for hierarchical models written in `.hsbi`."""

__version__ = "0.1.0"
