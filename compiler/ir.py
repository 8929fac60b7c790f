"""Middle stage: the checked, immutable intermediate representation of one model.

Input: produced by `check` (from the AST) or by the builder API. Output: consumed by the runtime
(`lower` for simulators, `tokens` for the token layout) and by `hierdsl compile` (JSON + table).

The IR is organised by role: constants (already evaluated to static values), functions (bodies as
resolved expression trees), externs, and the model's variables in dependency order, each with its
role (global, local, input, observation, global/site deterministic), shape, dtype and support.

Expressions are `E` nodes: a tag, child nodes and static data. The tags are listed in `TAGS`; the
runtime interprets them one by one. Names are resolved: a `var` refers to a model variable or a
function-local name, `const` to a constant id, `ucall`/`fnref` to a function id, `xcall` to an
extern id, and `call` to a built-in function or distribution. Source spans are kept on variables for
error messages but excluded from equality, the canonical JSON used for hashing, and the hash.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from .ast import NO_SPAN, Span

IR_VERSION = 1

# Every expression tag, with its meaning (args are child `E` nodes; data is static):
TAGS = {
    "lit": "literal; data = (value, dtype), dtype float/int/bool/str; arrays are nested tuples",
    "var": "a model variable, model argument or function-local name; data = (name,)",
    "const": "a constant; data = (const id,)",
    "neg": "-a", "pos": "+a", "not": "!a",
    "add": "a + b", "sub": "a - b", "mul": "a * b (elementwise)", "div": "a / b", "pow": "a ^ b",
    "lt": "a < b", "le": "a <= b", "gt": "a > b", "ge": "a >= b", "eq": "a == b", "ne": "a != b",
    "and": "a && b", "or": "a || b",
    "select": "cond ? a : b, elementwise; args = (cond, a, b)",
    "range": "inclusive range; args = (start, step, stop), all static",
    "vector": "[a, b, c]; args = items (scalars or arrays stacked on a new leading axis)",
    "matrix": "[a b; c d]; args = items row-major; data = (rows, cols)",
    "tuple": "(a, b); args = items",
    "index": "1-based indexing; args = (value, index...); each index is an `E`, `colon` or `slice`",
    "colon": "a bare `:` index",
    "slice": "a static 1-based inclusive range index; data = (start, step, stop)",
    "call": "a built-in function or distribution; data = (name,); args = positional, then `kw` nodes",
    "kw": "keyword argument; data = (name,); args = (value,)",
    "ucall": "a user function; data = (function id,); args = positional arguments",
    "xcall": "an extern function; data = (extern id,); args = positional arguments",
    "fnref": "a function passed as a value (e.g. to odesolve); data = (function id,)",
    "if": "if/elseif/else; args = (cond1, block1, cond2, block2, ..., else_block); both sides run",
    "block": "statements then a value; args = (stmt..., value)",
    "let": "statement: bind targets; data = target names (several = destructuring); args = (value,)",
    "draw": "statement: simulator randomness inside a function; data = (name,); args = (dist,)",
}


@dataclass(frozen=True)
class E:
    """One IR expression node."""

    tag: str
    args: tuple["E", ...] = ()
    data: tuple[Any, ...] = ()

    def to_json(self) -> Any:
        out: dict[str, Any] = {"tag": self.tag}
        if self.args:
            out["args"] = [a.to_json() for a in self.args]
        if self.data:
            out["data"] = [_jsonable(d) for d in self.data]
        return out

    @staticmethod
    def from_json(obj: Any) -> "E":
        return E(
            obj["tag"],
            tuple(E.from_json(a) for a in obj.get("args", ())),
            tuple(_from_jsonable(d) for d in obj.get("data", ())),
        )


def freeze(value: Any) -> Any:
    """Nested lists → nested tuples, so array-valued literals are hashable."""
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": repr(value)}
    return value


def _from_jsonable(value: Any) -> Any:
    if isinstance(value, dict) and "float" in value:
        return float(value["float"])
    if isinstance(value, list):
        return tuple(_from_jsonable(v) for v in value)
    return value


def lit(value: Any, dtype: str = "float") -> E:
    return E("lit", (), (freeze(value), dtype))


def var(name: str) -> E:
    return E("var", (), (name,))


# ----------------------------------------------------------------------------- building blocks


@dataclass(frozen=True)
class Support:
    """Where a parameter's prior puts mass; decides its transform to unconstrained space.

    kind is one of: real, positive, interval, simplex, integer, nonnegative_integer, boolean.
    For interval, `lower`/`upper` are the static bounds, or None when they depend on other
    parameters (then the runtime reads them from the distribution's arguments).
    """

    kind: str
    lower: Optional[float] = None
    upper: Optional[float] = None

    def describe(self) -> str:
        if self.kind == "interval":
            lo = "·" if self.lower is None else _fmt_num(self.lower)
            hi = "·" if self.upper is None else _fmt_num(self.upper)
            return f"({lo}, {hi})"
        return self.kind

    def to_json(self) -> dict:
        return {"kind": self.kind, "lower": _jsonable(self.lower), "upper": _jsonable(self.upper)}

    @staticmethod
    def from_json(obj: dict) -> "Support":
        return Support(obj["kind"], _from_jsonable(obj.get("lower")), _from_jsonable(obj.get("upper")))


def _fmt_num(x: float) -> str:
    if math.isinf(x):
        return "-Inf" if x < 0 else "Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x)) if abs(x) < 1e15 else repr(x)


ROLES = ("global", "global_det", "local", "input", "site_det", "observation")


@dataclass(frozen=True)
class Variable:
    """A model variable.

    role: "global" (inferred, shared), "global_det" (deterministic global), "local" (inferred,
    one per site), "input" (known per-site covariate), "site_det" (deterministic per site),
    "observation" (observed per site).
    stochastic: whether `expr` is a distribution (`~`) or a value (`=`).
    shape: the shape of one draw (per site for site roles).
    deps: the model variables `expr` reads.
    coords: for a function-valued per-site variable (e.g. an observation at per-site times), the
        inputs whose elements are its coordinates along axis 0, decided by the checker from the
        dependency graph and shapes; the tokeniser attaches them to each element's token.
    """

    name: str
    role: str
    stochastic: bool
    expr: E
    shape: tuple[int, ...]
    dtype: str
    support: Support
    deps: tuple[str, ...] = ()
    coords: tuple[str, ...] = ()
    span: Span = field(default=NO_SPAN, compare=False, repr=False)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def per_site(self) -> bool:
        return self.role in ("local", "input", "site_det", "observation")

    def to_json(self, spans: bool = True) -> dict:
        out = {
            "name": self.name,
            "role": self.role,
            "stochastic": self.stochastic,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "support": self.support.to_json(),
            "deps": list(self.deps),
            "coords": list(self.coords),
            "expr": self.expr.to_json(),
        }
        if spans:
            out["span"] = self.span.to_json()
        return out

    @staticmethod
    def from_json(obj: dict) -> "Variable":
        return Variable(
            obj["name"], obj["role"], obj["stochastic"], E.from_json(obj["expr"]),
            tuple(obj["shape"]), obj["dtype"], Support.from_json(obj["support"]),
            tuple(obj["deps"]), tuple(obj.get("coords", ())), _span_from_json(obj.get("span")),
        )


def _span_from_json(obj: Optional[dict]) -> Span:
    if not obj:
        return NO_SPAN
    return Span(obj["file"], obj["line"], obj["column"], obj["end_line"], obj["end_column"])


@dataclass(frozen=True)
class Constant:
    """A constant, evaluated at compile time. `value` is a float/int/bool or nested tuple."""

    id: str
    value: Any
    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict:
        return {"id": self.id, "value": _jsonable(self.value), "shape": list(self.shape), "dtype": self.dtype}

    @staticmethod
    def from_json(obj: dict) -> "Constant":
        return Constant(obj["id"], _from_jsonable(obj["value"]), tuple(obj["shape"]), obj["dtype"])


@dataclass(frozen=True)
class FunctionIR:
    """A user function. `id` is unique ("Module.name/arity"); `body` is a `block` node."""

    id: str
    name: str
    params: tuple[str, ...]
    body: E
    random: bool  # draws simulator randomness (needs a PRNG key)

    def to_json(self) -> dict:
        return {"id": self.id, "name": self.name, "params": list(self.params), "body": self.body.to_json(),
                "random": self.random}

    @staticmethod
    def from_json(obj: dict) -> "FunctionIR":
        return FunctionIR(obj["id"], obj["name"], tuple(obj["params"]), E.from_json(obj["body"]), obj["random"])


@dataclass(frozen=True)
class ExternIR:
    """An `extern [host] function`: bound to a Python callable by the runtime."""

    id: str
    name: str
    params: tuple[str, ...]
    param_shapes: tuple[Optional[tuple[int, ...]], ...]
    returns: Optional[tuple[int, ...]]
    host: bool
    target: Optional[str]

    def to_json(self) -> dict:
        return {
            "id": self.id, "name": self.name, "params": list(self.params),
            "param_shapes": [None if s is None else list(s) for s in self.param_shapes],
            "returns": None if self.returns is None else list(self.returns),
            "host": self.host, "target": self.target,
        }

    @staticmethod
    def from_json(obj: dict) -> "ExternIR":
        return ExternIR(
            obj["id"], obj["name"], tuple(obj["params"]),
            tuple(None if s is None else tuple(s) for s in obj["param_shapes"]),
            None if obj["returns"] is None else tuple(obj["returns"]), obj["host"], obj["target"],
        )


@dataclass(frozen=True)
class ModelIR:
    """One checked model: the unit the runtime lowers and the tokeniser lays out."""

    name: str
    args: tuple[tuple[str, Any], ...]
    site_index: str
    num_sites: int
    variables: tuple[Variable, ...]
    functions: tuple[FunctionIR, ...] = ()
    constants: tuple[Constant, ...] = ()
    externs: tuple[ExternIR, ...] = ()
    span: Span = field(default=NO_SPAN, compare=False, repr=False)

    # -- role views ---------------------------------------------------------
    def by_role(self, *roles: str) -> tuple[Variable, ...]:
        return tuple(v for v in self.variables if v.role in roles)

    @property
    def globals(self) -> tuple[Variable, ...]:
        return self.by_role("global")

    @property
    def locals(self) -> tuple[Variable, ...]:
        return self.by_role("local")

    @property
    def inputs(self) -> tuple[Variable, ...]:
        return self.by_role("input")

    @property
    def observations(self) -> tuple[Variable, ...]:
        return self.by_role("observation")

    @property
    def deterministic(self) -> tuple[Variable, ...]:
        return self.by_role("global_det", "site_det")

    def variable(self, name: str) -> Variable:
        for v in self.variables:
            if v.name == name:
                return v
        raise KeyError(name)

    def function(self, fid: str) -> FunctionIR:
        for f in self.functions:
            if f.id == fid:
                return f
        raise KeyError(fid)

    def constant(self, cid: str) -> Constant:
        for c in self.constants:
            if c.id == cid:
                return c
        raise KeyError(cid)

    @property
    def global_tokens(self) -> int:
        return sum(v.size for v in self.globals)

    @property
    def tokens_per_site(self) -> int:
        return sum(v.size for v in self.variables if v.role in ("local", "input", "observation"))

    # -- serialisation --------------------------------------------------------
    def to_json(self, spans: bool = True) -> dict:
        return {
            "ir_version": IR_VERSION,
            "name": self.name,
            "args": [[k, _jsonable(v)] for k, v in self.args],
            "site_index": self.site_index,
            "num_sites": self.num_sites,
            "variables": [v.to_json(spans) for v in self.variables],
            "functions": [f.to_json() for f in self.functions],
            "constants": [c.to_json() for c in self.constants],
            "externs": [x.to_json() for x in self.externs],
        }

    def dumps(self, spans: bool = True) -> str:
        """Canonical JSON text (sorted keys, fixed separators)."""
        body = self.to_json(spans)
        if spans:
            body = dict(body, hash=self.hash)
        return json.dumps(body, sort_keys=True, indent=1, ensure_ascii=False)

    @property
    def hash(self) -> str:
        """Stable content hash: SHA-256 of the canonical JSON without spans."""
        text = json.dumps(self.to_json(spans=False), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    @staticmethod
    def from_json(obj: dict) -> "ModelIR":
        if obj.get("ir_version") != IR_VERSION:
            raise ValueError(f"unsupported IR version {obj.get('ir_version')!r} (this hierdsl reads {IR_VERSION})")
        return ModelIR(
            obj["name"],
            tuple((k, _from_jsonable(v)) for k, v in obj["args"]),
            obj["site_index"],
            obj["num_sites"],
            tuple(Variable.from_json(v) for v in obj["variables"]),
            tuple(FunctionIR.from_json(f) for f in obj["functions"]),
            tuple(Constant.from_json(c) for c in obj["constants"]),
            tuple(ExternIR.from_json(x) for x in obj["externs"]),
        )

    @staticmethod
    def loads(text: str) -> "ModelIR":
        return ModelIR.from_json(json.loads(text))
