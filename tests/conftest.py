"""Test-session settings.

Many tests build the same small networks on the same models, and on this project's CPUs compiling
them costs more than running them. JAX's persistent compilation cache, pointed at a fresh folder
for this session only (removed at exit), lets a test reuse what an earlier test compiled without
carrying anything from one run to the next. The `hierdsl` processes the tests start get the same
folder (`HIERDSL_JAX_CACHE`), so they neither fill the user's own cache nor compile from scratch.
"""

import atexit
import os
import shutil
import tempfile

import jax

_CACHE = tempfile.mkdtemp(prefix="hierdsl-test-jax-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _CACHE)
os.environ["HIERDSL_JAX_CACHE"] = _CACHE
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
