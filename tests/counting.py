"""A host function for tests that count simulator calls."""

from __future__ import annotations

import numpy as np


class CallCounter:
    """A host function that counts how often the simulator calls it (once per simulated site)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, value):
        self.calls += int(np.size(value))
        return np.asarray(value, dtype=np.float32)
