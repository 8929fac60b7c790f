"""Frontend stage: read a root `.hsbi` file and everything it includes.

Input: a path or source text. Output: a `Source` set (file name → text) and the root `Program`
with every `include` replaced by the included file's items, in place, as Julia does. Including a
file twice is harmless (the second include adds nothing); include cycles and missing files are
errors at the `include` line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from . import ast
from .errors import Diagnostic, HsbiError, error
from .parse import parse


@dataclass
class Loaded:
    program: ast.Program
    sources: dict[str, str] = field(default_factory=dict)


def read_source(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        raise HsbiError([error(f"file `{path}` not found", label="check the path")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise HsbiError([error(f"cannot read `{path}`: {exc}")]) from None


def load(path: Optional[str] = None, *, source: Optional[str] = None, name: str = "<string>") -> Loaded:
    """Parse the root file (or `source`) and splice in its includes."""
    sources: dict[str, str] = {}
    if source is None:
        assert path is not None
        source = read_source(path)
        name = path
        base = os.path.dirname(os.path.abspath(path))
    else:
        base = os.getcwd()
    sources[name] = source
    root = parse(source, name)
    diags: list[Diagnostic] = []
    seen: set[str] = set()
    if path is not None:
        seen.add(os.path.realpath(path))
    items = _splice(root.items, base, [os.path.realpath(path) if path else name], seen, sources, diags)
    if diags:
        raise HsbiError(diags, sources)
    return Loaded(ast.Program(items, file=name, span=root.span), sources)


def _splice(items, base, stack, seen, sources, diags) -> tuple:
    out = []
    for item in items:
        if isinstance(item, ast.Module):
            body = _splice(item.body, base, stack, seen, sources, diags)
            out.append(ast.Module(item.name, body, span=item.span))
            continue
        if not isinstance(item, ast.Include):
            out.append(item)
            continue
        target = os.path.realpath(os.path.join(base, item.path))
        if target in stack:
            chain = " → ".join(os.path.basename(p) for p in [*stack[stack.index(target):], target])
            diags.append(error(f"include cycle: {chain}", item.span, "a file cannot include itself, directly or indirectly"))
            continue
        if target in seen:
            continue
        if not os.path.isfile(target):
            diags.append(error(
                f"included file `{item.path}` not found", item.span,
                f"looked for {os.path.relpath(target)}; include paths are relative to the including file",
            ))
            continue
        seen.add(target)
        display = os.path.relpath(target) if not os.path.isabs(item.path) else target
        try:
            text = read_source(target)
            sources[display] = text
            program = parse(text, display)
        except HsbiError as exc:
            diags.extend(exc.diagnostics)
            sources.update(exc.sources)
            continue
        out.extend(_splice(program.items, os.path.dirname(target), [*stack, target], seen, sources, diags))
    return tuple(out)
