"""The hierdsl runtime: IR → JAX simulators, token layout, networks, training, posteriors."""
