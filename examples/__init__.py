"""The bundled example models and data, installed as `hierdsl.examples`.

They are ordinary files (`.hsbi` models, `.csv` data); this package marker only lets every kind of
install carry them, so that `hierdsl bench` finds its task models outside a source checkout.
"""
