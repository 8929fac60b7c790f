"""Fuzzing the whole compiler: mutated example programs only compile or raise `HsbiError`."""

from __future__ import annotations

import glob
import os
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hierdsl
from hierdsl.compiler.errors import HsbiError

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
TEXTS = [open(p, encoding="utf-8").read() for p in sorted(glob.glob(os.path.join(EXAMPLES, "*.hsbi")))
         if "include(" not in open(p, encoding="utf-8").read()]
# Pieces that keep a program mostly parseable, so the checker (not just the parser) gets exercised.
TOKENS = ["mu", "sigma", "i", "x", "theta", "1", "2.0", "-1.0", "end", "[1.0, 2.0]", "(", ")", "[", "]",
          ",", "+", "*", "^", "~", "=", "observe ", "input ", "zeros(3)", "Normal(0.0, 1.0)", "sum(",
          "[end]", "[2:end]", "[:, 1]", "::Vector{3}", "::Int", "iid(", "Poisson(1.0)", "\n", " ? 1.0 : 2.0",
          "MvNormal(", "odesolve(", "Mixture(", "fill(1.0, 2)", "matmul(", "[1.0 2.0; 3.0 4.0]", "true"]
WORD = re.compile(r"\w+|[^\w\s]|\n")


@st.composite
def mutated(draw):
    text = draw(st.sampled_from(TEXTS))
    pieces = WORD.findall(text) if draw(st.booleans()) else None
    for _ in range(draw(st.integers(1, 3))):
        if pieces:
            k = draw(st.integers(0, len(pieces) - 1))
            pieces[k] = draw(st.sampled_from(TOKENS + pieces))
            text = None
        else:
            positions = [m.start() for m in WORD.finditer(text)]
            k = draw(st.sampled_from(positions))
            end = k + len(WORD.match(text, k).group(0))
            text = text[:k] + draw(st.sampled_from(TOKENS)) + text[end:]
    if text is None:
        # Re-join tokens keeping line structure roughly: tokens were split without whitespace.
        text = " ".join(pieces).replace(" \n ", "\n")
    return text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_programs_compile_or_raise_hsbi_error(text):
    try:
        hierdsl.compile(text)
    except HsbiError as exc:
        assert exc.diagnostics and exc.render()
