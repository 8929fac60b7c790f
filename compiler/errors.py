"""Diagnostics shared by every compiler stage: spans, messages, rendering, "did you mean".

Every user-facing problem is a `Diagnostic` (error or warning) with a span, a headline saying what
is wrong, and a label under the caret saying why or how to fix it. Stages collect diagnostics and
raise one `HsbiError` holding all errors, so a user sees every problem at once.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable, Optional

from .ast import NO_SPAN, Span


@dataclass(frozen=True)
class Diagnostic:
    """One error or warning at a source span."""

    severity: str  # "error" or "warning"
    message: str
    span: Span
    label: str = ""
    notes: tuple[str, ...] = ()

    def render(self, sources: Optional[dict[str, str]] = None) -> str:
        return render_diagnostic(self, sources or {})


class HsbiError(Exception):
    """Raised for any user error: carries the diagnostics and renders them like spec §10."""

    def __init__(self, diagnostics: Iterable[Diagnostic], sources: Optional[dict[str, str]] = None):
        self.diagnostics = tuple(diagnostics)
        self.sources = dict(sources or {})
        super().__init__(self.render())

    def render(self) -> str:
        return "\n\n".join(render_diagnostic(d, self.sources) for d in self.diagnostics)

    def __str__(self) -> str:
        return self.render()


def error(message: str, span: Span = NO_SPAN, label: str = "", notes: Iterable[str] = ()) -> Diagnostic:
    return Diagnostic("error", message, span, label, tuple(notes))


def warning(message: str, span: Span = NO_SPAN, label: str = "", notes: Iterable[str] = ()) -> Diagnostic:
    return Diagnostic("warning", message, span, label, tuple(notes))


def did_you_mean(name: str, candidates: Iterable[str]) -> Optional[str]:
    """The closest candidate to a misspelt name, or None when nothing is close."""
    matches = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=0.6)
    return matches[0] if matches else None


def render_diagnostic(diag: Diagnostic, sources: dict[str, str]) -> str:
    """Render in the format of spec §10: headline, location, source line, caret span, label."""
    head = f"{diag.severity}: {diag.message}"
    span = diag.span
    if span is NO_SPAN or span.line <= 0:
        lines = [head]
        lines.extend(f"  = note: {n}" for n in diag.notes)
        if diag.label:
            lines.append(f"  = help: {diag.label}")
        return "\n".join(lines)
    text = sources.get(span.file)
    gutter = " " * len(str(span.line))
    out = [head, f"{gutter}--> {span.file}:{span.line}:{span.column}"]
    if text is not None:
        src_lines = text.splitlines()
        src = src_lines[span.line - 1] if 0 < span.line <= len(src_lines) else ""
        src = src.replace("\t", " ")
        if span.end_line == span.line and span.end_column > span.column:
            width = span.end_column - span.column
        else:
            width = max(1, len(src.rstrip()) - span.column + 1)
        caret = " " * (span.column - 1) + "^" * max(1, width)
        out.append(f"{gutter} |")
        out.append(f"{span.line} | {src}")
        out.append(f"{gutter} | {caret}" + (f" {diag.label}" if diag.label else ""))
    elif diag.label:
        out.append(f"{gutter} = {diag.label}")
    out.extend(f"{gutter} = note: {n}" for n in diag.notes)
    return "\n".join(out)
