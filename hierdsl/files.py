"""Atomic file writes: readers see the old content or the new, never half of it."""

from __future__ import annotations

import os
import tempfile
from typing import Union


def atomic_write(path: str, content: Union[str, bytes]) -> None:
    """Write `content` to `path` through a temporary file in the same folder and a rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content.encode("utf-8") if isinstance(content, str) else content)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
