"""Golden files: each example's IR dump and each bad program's exact rendered error.

Regenerate them all with one command (then review the diff):

    python tests/golden_cases.py
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GOLDEN = os.path.join(HERE, "golden")
BAD = os.path.join(GOLDEN, "bad")
IR_DIR = os.path.join(GOLDEN, "ir")
EXAMPLES = os.path.join(ROOT, "examples")

# Example files that hold only a module (used by other examples), not a model.
LIBRARY_EXAMPLES = {"epidemics.hsbi"}


def example_files() -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(EXAMPLES, "*.hsbi"))
                  if os.path.basename(p) not in LIBRARY_EXAMPLES)


def bad_files() -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(BAD, "*.hsbi")))


@contextlib.contextmanager
def cwd(path: str):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def render_example_ir(name: str) -> str:
    from hierdsl import compile

    with cwd(ROOT):
        return compile(os.path.join("examples", name)).ir.dumps() + "\n"


def render_bad(name: str) -> str:
    """What `hierdsl compile` prints on stderr for a bad program, run from its folder."""
    from hierdsl.cli import main

    err = io.StringIO()
    with cwd(BAD), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = main(["compile", name])
    return f"exit status {status}\n{err.getvalue()}"


def regenerate() -> None:
    os.makedirs(IR_DIR, exist_ok=True)
    for name in example_files():
        with open(os.path.join(IR_DIR, name.replace(".hsbi", ".json")), "w", encoding="utf-8") as f:
            f.write(render_example_ir(name))
    for name in bad_files():
        with open(os.path.join(BAD, name.replace(".hsbi", ".err")), "w", encoding="utf-8") as f:
            f.write(render_bad(name))
    print(f"wrote {len(example_files())} IR dumps and {len(bad_files())} error files under {GOLDEN}")


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    regenerate()
