"""JAX's persistent compilation cache for hierdsl's programs.

Much of a small run's time on a CPU is XLA compiling the training epochs, the synthetic-pool maker
and the samplers. They are the same programs from one run of a model to the next, so with the cache
on, a second `hierdsl train`, `infer` or `check` of the same model and settings loads them instead
of compiling again. It is off unless asked for: `HIERDSL_JAX_CACHE=on` (the default folder) or
`HIERDSL_JAX_CACHE=/some/folder` for the CLI, `hierdsl.enable_compilation_cache()` from Python.
Off by default because JAX's CPU cache misbehaves on some machines: with JAX 0.10 on several Intel
CPUs every cached program is rejected on loading, with an error message each time (jax-ml/jax#38445),
and older jaxlib on macOS could crash loading a large one.

The default folder is `$XDG_CACHE_HOME/hierdsl/jax` (`~/.cache/hierdsl/jax`; `%LOCALAPPDATA%\\hierdsl\\jax`
on Windows). A cache folder that JAX was already given (`JAX_COMPILATION_CACHE_DIR`, or
`jax.config.update("jax_compilation_cache_dir", ...)` before) is left as it is. Entries are keyed by
the program, the JAX and jaxlib versions and the backend, so another version's entries are not
used; deleting the folder is always safe.
"""

from __future__ import annotations

import os
from typing import Optional

ENV_VAR = "HIERDSL_JAX_CACHE"
_OFF = ("off", "0", "no", "none", "false")
_ON = ("on", "1", "yes", "true")
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


def _setting() -> str:
    return os.environ.get(ENV_VAR, "").strip()


def enable_compilation_cache(path: Optional[str] = None) -> Optional[str]:
    """Keep compiled programs in a folder, so later runs (and later processes) reuse them.

    **Arguments:**

    - `path`: the folder. None: the one `HIERDSL_JAX_CACHE` names, else `default_cache_dir()`.

    **Returns:** the folder in use, or None where the cache stays off: `HIERDSL_JAX_CACHE` says
    `off` (and no `path` was given), or the folder cannot be created or written (the run goes on
    compiling as usual). A folder JAX was already given is kept and returned.
    """
    import jax

    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    if path is None:
        setting = _setting()
        if setting.lower() in _OFF and setting:
            return None
        path = default_cache_dir() if not setting or setting.lower() in _ON else setting
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


def cache_from_environment() -> Optional[str]:
    """What the CLI does: the cache only where `HIERDSL_JAX_CACHE` asks for it (`on`, or a folder),
    and JAX's own setting (`JAX_COMPILATION_CACHE_DIR`) as it is. Returns the folder in use, or None."""
    import jax

    setting = _setting()
    if jax.config.jax_compilation_cache_dir or (setting and setting.lower() not in _OFF):
        return enable_compilation_cache()
    return None
