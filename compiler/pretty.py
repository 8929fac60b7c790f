"""Frontend stage: AST → canonical `.hsbi` text (what `hierdsl fmt` prints).

Layout: four-space indentation, one statement per line, module bodies unindented (as in Julia),
a blank line around multi-line definitions. Expressions get the fewest parentheses their
precedence allows, binary operators are spaced (`a + b`) except `^` and ranges (`x^2`, `1:n`),
keyword arguments follow `;`, and numbers are printed so that they re-parse to the same value and
int-ness. The contract is `parse(pretty(p)) == p` (spans aside) for every program `parse` can
produce; short functions are those whose body is a single `Return`.
"""

from __future__ import annotations

import math

from . import ast

__all__ = ["pretty", "pretty_expr"]

_INDENT = "    "

# Binding strength, loosest first; mirrors the `?rule` ladder of grammar.lark.
_TERNARY, _OR, _AND, _COMPARE, _RANGE, _SUM, _PRODUCT, _PREFIX, _POWER, _POSTFIX = range(1, 11)
_BINARY_PRECEDENCE = {
    "||": _OR, "&&": _AND,
    "<": _COMPARE, "<=": _COMPARE, ">": _COMPARE, ">=": _COMPARE, "==": _COMPARE, "!=": _COMPARE,
    "+": _SUM, "-": _SUM, "*": _PRODUCT, "/": _PRODUCT, "^": _POWER,
}
_STRING_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t"}


def pretty(program: ast.Program) -> str:
    """Format a program canonically; the result ends with a newline unless it is empty."""
    return _items(program.items, 0)


def pretty_expr(expr: ast.Expr, indent: int = 0) -> str:
    """Format one expression; `indent` is the block depth used by multi-line `if` expressions."""
    return _Printer(indent).expr(expr)


# ----------------------------------------------------------------------------- items


def _items(items: tuple[ast.Item, ...], depth: int) -> str:
    chunks: list[str] = []
    previous_multiline = False
    for item in items:
        text = _item(item, depth)
        multiline = text.count("\n") > 1
        if chunks and (multiline or previous_multiline):
            chunks.append("\n")
        chunks.append(text)
        previous_multiline = multiline
    return "".join(chunks)


def _item(item: ast.Item, depth: int) -> str:
    pad = _INDENT * depth
    printer = _Printer(depth)
    if isinstance(item, ast.Const):
        return f"{pad}const {item.name} = {printer.expr(item.value)}\n"
    if isinstance(item, ast.Function):
        head = f"{item.name}({_params(item.params, printer)})"
        if item.short and len(item.body) == 1 and isinstance(item.body[0], ast.Return):
            return f"{pad}{head} = {printer.expr(item.body[0].value)}\n"
        return f"{pad}function {head}\n{_block(item.body, depth + 1)}{pad}end\n"
    if isinstance(item, ast.Extern):
        text = f"{pad}extern {'host ' if item.host else ''}function "
        text += f"{item.name}({_params(item.params, printer)})"
        if item.returns is not None:
            text += f"::{_type(item.returns)}"
        if item.target is not None:
            text += f" = {_string(item.target)}"
        return text + "\n"
    if isinstance(item, ast.Model):
        head = f"model {item.name}({_params(item.params, printer)})"
        return f"{pad}{head}\n{_block(item.body, depth + 1)}{pad}end\n"
    if isinstance(item, ast.Module):
        return f"{pad}module {item.name}\n{_items(item.body, depth)}{pad}end\n"
    if isinstance(item, ast.Include):
        return f"{pad}include({_string(item.path)})\n"
    if isinstance(item, ast.Using):
        text = f"{pad}using {'.' if item.relative else ''}{'.'.join(item.module)}"
        if item.names is not None:
            text += ": " + ", ".join(item.names)
        return text + "\n"
    if isinstance(item, ast.Export):
        return f"{pad}export {', '.join(item.names)}\n"
    raise TypeError(f"not a top-level item: {item!r}")


def _params(params: tuple[ast.Param, ...], printer: _Printer) -> str:
    parts = []
    for param in params:
        text = param.name
        if param.annotation is not None:
            text += f"::{_type(param.annotation)}"
        if param.default is not None:
            text += f" = {printer.expr(param.default)}"
        parts.append(text)
    return ", ".join(parts)


def _type(annotation: ast.TypeAnn) -> str:
    if not annotation.params:
        return annotation.name
    return f"{annotation.name}{{{', '.join(str(p) for p in annotation.params)}}}"


def _string(value: str) -> str:
    return '"' + "".join(_STRING_ESCAPES.get(char, char) for char in value) + '"'


# ----------------------------------------------------------------------------- statements


def _block(stmts: tuple[ast.Stmt, ...], depth: int) -> str:
    return "".join(_stmt(stmt, depth) for stmt in stmts)


def _stmt(stmt: ast.Stmt, depth: int) -> str:
    pad = _INDENT * depth
    printer = _Printer(depth)
    if isinstance(stmt, ast.Tilde):
        role = "" if stmt.role == "param" else f"{stmt.role} "
        return f"{pad}{role}{_target(stmt.name, stmt.annotation)} ~ {printer.expr(stmt.dist)}\n"
    if isinstance(stmt, ast.Assign):
        role = "" if stmt.role == "det" else f"{stmt.role} "
        targets = ", ".join(stmt.targets)
        return f"{pad}{role}{_target(targets, stmt.annotation)} = {printer.expr(stmt.value)}\n"
    if isinstance(stmt, ast.Return):
        return f"{pad}return {printer.expr(stmt.value)}\n"
    if isinstance(stmt, ast.ExprStmt):
        return f"{pad}{printer.expr(stmt.value)}\n"
    if isinstance(stmt, ast.Sites):
        site_range = printer.expr(ast.Range(stmt.start, None, stmt.count))
        return (f"{pad}sites {stmt.index} in {site_range}\n"
                f"{_block(stmt.body, depth + 1)}{pad}end\n")
    raise TypeError(f"not a statement: {stmt!r}")


def _target(name: str, annotation: ast.TypeAnn | None) -> str:
    return name if annotation is None else f"{name}::{_type(annotation)}"


# ----------------------------------------------------------------------------- expressions


def _precedence(expr: ast.Expr) -> int:
    if isinstance(expr, ast.Ternary):
        return _TERNARY
    if isinstance(expr, ast.Binary):
        return _BINARY_PRECEDENCE[expr.op]
    if isinstance(expr, ast.Range):
        return _RANGE
    if isinstance(expr, ast.Unary):
        return _PREFIX
    if isinstance(expr, ast.Num) and _number(expr).startswith("-"):
        return _PREFIX  # a negative literal (builder API) reads back as a prefix minus
    return _POSTFIX


def _number(num: ast.Num) -> str:
    if num.is_int:
        return str(int(num.value))
    value = float(num.value)
    if math.isinf(value):
        return "Inf" if value > 0 else "-Inf"  # the checker resolves `Inf` to the same value
    # `repr` is the shortest text that reads back as the same float, and always has `.` or `e`.
    return repr(value)


class _Printer:
    """Expression printer; `depth` is the indentation of the enclosing statement."""

    def __init__(self, depth: int):
        self.depth = depth

    def expr(self, expr: ast.Expr) -> str:
        if isinstance(expr, ast.Num):
            return _number(expr)
        if isinstance(expr, ast.Bool):
            return "true" if expr.value else "false"
        if isinstance(expr, ast.Str):
            return _string(expr.value)
        if isinstance(expr, ast.Name):
            return expr.dotted
        if isinstance(expr, ast.End):
            return "end"
        if isinstance(expr, ast.Colon):
            return ":"
        if isinstance(expr, ast.Unary):
            return expr.op + self.at_least(expr.operand, _PREFIX)
        if isinstance(expr, ast.Binary):
            return self.binary(expr)
        if isinstance(expr, ast.Ternary):
            return (f"{self.at_least(expr.cond, _OR)} ? {self.at_least(expr.then, _TERNARY)}"
                    f" : {self.at_least(expr.otherwise, _TERNARY)}")
        if isinstance(expr, ast.Range):
            parts = [expr.start] + ([expr.step] if expr.step is not None else []) + [expr.stop]
            return ":".join(self.at_least(part, _SUM) for part in parts)
        if isinstance(expr, ast.Call):
            return f"{expr.func.dotted}({self.call_args(expr)})"
        if isinstance(expr, ast.Index):
            indices = ", ".join(self.expr(index) for index in expr.indices)
            return f"{self.at_least(expr.value, _POSTFIX)}[{indices}]"
        if isinstance(expr, ast.VectorLit):
            return "[" + ", ".join(self.expr(item) for item in expr.items) + "]"
        if isinstance(expr, ast.MatrixLit):
            rows = "; ".join(" ".join(self.expr(item) for item in row) for row in expr.rows)
            # A single one-element row needs the `;` that tells it from a one-element vector.
            return f"[{rows};]" if len(expr.rows) == 1 and len(expr.rows[0]) == 1 else f"[{rows}]"
        if isinstance(expr, ast.TupleLit):
            items = ", ".join(self.expr(item) for item in expr.items)
            return f"({items},)" if len(expr.items) == 1 else f"({items})"
        if isinstance(expr, ast.IfExpr):
            return self.if_expr(expr)
        raise TypeError(f"not an expression: {expr!r}")

    def at_least(self, expr: ast.Expr, precedence: int) -> str:
        """Print `expr`, parenthesised unless it binds at least as tightly as `precedence`."""
        text = self.expr(expr)
        return text if _precedence(expr) >= precedence else f"({text})"

    def binary(self, expr: ast.Binary) -> str:
        precedence = _BINARY_PRECEDENCE[expr.op]
        if expr.op == "^":  # right-associative; the base must be a postfix expression
            return f"{self.at_least(expr.left, _POSTFIX)}^{self.at_least(expr.right, _PREFIX)}"
        # Comparisons do not associate, so neither side may be one; the rest associate left.
        left_min = precedence + 1 if precedence == _COMPARE else precedence
        return (f"{self.at_least(expr.left, left_min)} {expr.op} "
                f"{self.at_least(expr.right, precedence + 1)}")

    def call_args(self, call: ast.Call) -> str:
        args = ", ".join(self.expr(arg) for arg in call.args)
        if not call.kwargs:
            return args
        kwargs = ", ".join(f"{kw.name} = {self.expr(kw.value)}" for kw in call.kwargs)
        return f"{args}; {kwargs}" if args else f"; {kwargs}"

    def if_expr(self, expr: ast.IfExpr) -> str:
        pad = _INDENT * self.depth
        lines = []
        for position, (cond, body) in enumerate(expr.branches):
            keyword = "if" if position == 0 else f"{pad}elseif"
            lines.append(f"{keyword} {self.expr(cond)}\n{_block(body, self.depth + 1)}")
        if expr.otherwise:
            lines.append(f"{pad}else\n{_block(expr.otherwise, self.depth + 1)}")
        return "".join(lines) + f"{pad}end"
