"""JAX's persistent compilation cache for hierdsl's programs.

Most of a small run's time on a CPU is XLA compiling the training epochs, the synthetic-pool maker
and the samplers. They are the same programs from one run of a model to the next, so the CLI keeps
them in JAX's persistent compilation cache and a second `hierdsl train`, `infer` or `check` of the
same model and settings loads them instead of compiling again. Python users opt in with
`hierdsl.enable_compilation_cache()`.

Where: `HIERDSL_JAX_CACHE` if set (a folder; `off`, `0`, `no` or `none` switch the cache off),
else `$XDG_CACHE_HOME/hierdsl/jax` (`~/.cache/hierdsl/jax`; `%LOCALAPPDATA%\\hierdsl\\jax` on
Windows). A cache folder that JAX was already given (`JAX_COMPILATION_CACHE_DIR`, or
`jax.config.update("jax_compilation_cache_dir", ...)` before) is left as it is. Entries are keyed by
the program, the JAX and jaxlib versions and the machine, so a stale entry is never used; deleting
the folder is always safe.
"""

from __future__ import annotations

import os
from typing import Optional

ENV_VAR = "HIERDSL_JAX_CACHE"
_OFF = ("off", "0", "no", "none", "false")
# Programs that compile faster than this are not kept. JAX's own default, 1 s, keeps only the
# training epochs, the pool and the samplers (2-10 s each here); 0.2 s also keeps the set-up's
# many small programs (network initialisation, the normaliser): a small `hierdsl infer` on this
# 2-core CPU took 88 s the second time with 1 s and 76 s with 0.3 s, against 98 s without a cache.
MIN_COMPILE_SECONDS = 0.2


def default_cache_dir() -> str:
    """`$XDG_CACHE_HOME/hierdsl/jax`, `~/.cache/hierdsl/jax` without it (`%LOCALAPPDATA%` on Windows)."""
    if os.name == "nt" and os.environ.get("LOCALAPPDATA"):
        base = os.environ["LOCALAPPDATA"]
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "hierdsl", "jax")


def enable_compilation_cache(path: Optional[str] = None) -> Optional[str]:
    """Keep compiled programs in a folder, so later runs (and later processes) reuse them.

    **Arguments:**

    - `path`: the folder. None: `HIERDSL_JAX_CACHE`, else `default_cache_dir()`.

    **Returns:** the folder in use, or None where the cache stays off: `HIERDSL_JAX_CACHE` says
    `off` (and no `path` was given), or the folder cannot be created or written (the run goes on
    compiling as usual). A folder JAX was already given is kept and returned.
    """
    import jax

    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    if path is None:
        setting = os.environ.get(ENV_VAR, "").strip()
        if setting.lower() in _OFF and setting:
            return None
        path = setting or default_cache_dir()
    path = os.path.abspath(os.path.expanduser(path))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None
    if not os.access(path, os.W_OK | os.X_OK):
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return path
