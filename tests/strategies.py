"""Hypothesis strategies for `.hsbi` ASTs: every program they draw is one `parse` can produce.

Expressions are bounded in size; `end` is only drawn inside index brackets (and never inside an
`if` there, where `end` closes the `if`), `:` only as a whole index, and `if` expressions only
outside indices.
"""

from __future__ import annotations

from hierdsl.compiler import ast
from hypothesis import strategies as st

# A fixed pool keeps generation fast; it mixes ASCII, Unicode, underscores, digits, keyword
# prefixes (`ends`, `input2`) and the names the checker resolves (`pi`, `Inf`).
names = st.sampled_from(
    ["x", "y", "mu", "sigma", "σ", "μ", "θ", "θ2", "n_sites", "_tmp", "a1", "ends", "input2",
     "iff", "model_", "pi", "Inf", "Normal", "f", "g", "M", "Epidemics", "sir_rhs", "β_0"]
)
qualified_names = st.lists(names, min_size=1, max_size=2).map(lambda parts: ast.Name(tuple(parts)))
strings = st.text(alphabet=st.sampled_from('ab/.:_ "\\\n\tσ'), max_size=8)
type_anns = st.builds(
    ast.TypeAnn,
    st.sampled_from(["Real", "Int", "Bool", "Vector", "Matrix", "Tuple"]),
    st.lists(st.integers(0, 99), max_size=2).map(tuple),
)

numbers = st.one_of(
    st.integers(0, 10**20).map(lambda value: ast.Num(value, True)),
    st.floats(0, 1e300, allow_nan=False, allow_infinity=False).map(lambda v: ast.Num(v, False)),
)
_BINARY_OPS = ["+", "-", "*", "/", "^", "<", "<=", ">", ">=", "==", "!=", "&&", "||"]


def _tuples(elements: st.SearchStrategy, min_size: int = 0, max_size: int = 3):
    return st.lists(elements, min_size=min_size, max_size=max_size).map(tuple)


def expressions(in_index: bool = False, max_leaves: int = 10) -> st.SearchStrategy[ast.Expr]:
    """Expressions; `in_index` allows `end` and forbids `if` (see the module docstring)."""
    leaves = [numbers, st.builds(ast.Bool, st.booleans()), qualified_names,
              st.builds(ast.Str, strings)]
    if in_index:
        leaves.append(st.just(ast.End()))

    def extend(children: st.SearchStrategy[ast.Expr]) -> st.SearchStrategy[ast.Expr]:
        options = [
            st.builds(ast.Unary, st.sampled_from(["-", "+", "!"]), children),
            st.builds(ast.Binary, st.sampled_from(_BINARY_OPS), children, children),
            st.builds(ast.Ternary, children, children, children),
            st.builds(ast.Range, children, st.none() | children, children),
            st.builds(
                ast.Call,
                qualified_names,
                _tuples(children),
                _tuples(st.builds(ast.Keyword, names, children), max_size=2),
            ),
            st.builds(ast.Index, children, _tuples(_index_args, min_size=1, max_size=2)),
            st.builds(ast.VectorLit, _tuples(children)),
            _matrices(children),
            st.builds(ast.TupleLit, _tuples(children)),
        ]
        if not in_index:
            options.append(_if_expressions(children))
        return st.one_of(options)

    return st.recursive(st.one_of(leaves), extend, max_leaves=max_leaves)


@st.composite
def _matrices(draw, children: st.SearchStrategy[ast.Expr]) -> ast.MatrixLit:
    num_rows = draw(st.integers(1, 3))
    num_columns = draw(st.integers(1, 3))
    if num_rows == 1 and num_columns == 1:
        return ast.MatrixLit(((draw(children),),))
    rows = tuple(tuple(draw(children) for _ in range(num_columns)) for _ in range(num_rows))
    return ast.MatrixLit(rows)


def _if_expressions(children: st.SearchStrategy[ast.Expr]) -> st.SearchStrategy[ast.IfExpr]:
    block = _tuples(statements(children, allow_sites=False), max_size=2)
    return st.builds(ast.IfExpr, _tuples(st.tuples(children, block), 1, 2), block)


def statements(exprs: st.SearchStrategy[ast.Expr], allow_sites: bool = True,
               depth: int = 0) -> st.SearchStrategy[ast.Stmt]:
    options = [
        st.builds(ast.Tilde, st.sampled_from(["param", "observe", "input"]), names,
                  st.none() | type_anns, exprs),
        st.builds(ast.Assign, st.sampled_from(["det", "observe", "input"]),
                  names.map(lambda name: (name,)), st.none() | type_anns, exprs),
        st.builds(ast.Assign, st.just("det"), _tuples(names, 2, 3), st.none(), exprs),
        st.builds(ast.Return, exprs),
        st.builds(ast.ExprStmt, exprs),
    ]
    if allow_sites and depth < 2:
        body = _tuples(statements(exprs, True, depth + 1), max_size=3)
        options.append(st.builds(ast.Sites, names, exprs, exprs, body))
    return st.one_of(options)


def items(depth: int = 0) -> st.SearchStrategy[ast.Item]:
    exprs = expressions(max_leaves=6)
    params = _tuples(st.builds(ast.Param, names, st.none() | type_anns, st.none() | exprs))
    body = _tuples(statements(exprs), max_size=4)
    options = [
        st.builds(ast.Const, names, exprs),
        st.builds(ast.Function, names, params, body, st.just(False)),
        st.builds(ast.Function, names, params, exprs.map(lambda e: (ast.Return(e),)),
                  st.just(True)),
        st.builds(ast.Extern, names, params, st.none() | type_anns, st.booleans(),
                  st.none() | strings),
        st.builds(ast.Model, names, params, body),
        st.builds(ast.Include, strings),
        st.builds(ast.Using, _tuples(names, 1, 2), st.none() | _tuples(names, 1, 3),
                  st.booleans()),
        st.builds(ast.Export, _tuples(names, 1, 3)),
    ]
    if depth < 1:
        options.append(st.builds(ast.Module, names, _tuples(items(depth + 1), max_size=3)))
    return st.one_of(options)


# Deferred: index expressions contain indices themselves.
_index_args = st.deferred(lambda: st.one_of(st.just(ast.Colon()), _index_expressions))
_index_expressions = expressions(True, max_leaves=4)
programs = st.builds(ast.Program, _tuples(items(), max_size=4))
