"""Frontend stage: `.hsbi` source text → AST (`ast.Program`).

Three steps:

1. `_scan` turns text into raw tokens (names, numbers, operators, newlines), skipping comments and
   remembering whether whitespace preceded each token.
2. `_Tokeniser` resolves the layout rules of spec §2 with a stack of open brackets and `if` blocks:
   newlines end statements at block level but vanish inside `()` and index brackets (and after a
   binary operator); inside a `[ ]` literal a space between two expressions separates matrix
   columns and a newline separates rows; `end` inside an index means "last element"; a spaced
   ` : ` after `?` belongs to the conditional, any other `:` builds a range. It feeds Lark's LALR
   parser (`grammar.lark`) one token at a time.
3. `_Builder` walks the Lark tree and builds the span-carrying AST dataclasses of `ast.py`.

Every failure is an `HsbiError` rendered like spec §10. Syntax errors are labelled from example
mistakes (`_EXAMPLES`, matched with Lark's `match_examples`) and from the parser's state (a block
left without `end`, a bracket left open, a keyword used as a name).

Matrix literals follow Julia: `[a b]` is one row of two columns, `[a - b]` and `[a-b]` are one
element, and `[a -b]` is two (a `+`/`-` with a space before it and none after starts a column).
"""

from __future__ import annotations

import bisect
import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedToken
from lark.lexer import Lexer

from . import ast
from .errors import Diagnostic, HsbiError, error

__all__ = ["parse"]


KEYWORDS = frozenset(
    ["model", "function", "sites", "in", "observe", "input", "const", "module", "end", "export", "using", "include", "extern", "host", "return", "if", "elseif", "else", "true", "false"]
)

# Keyword → terminal. `end` is resolved by context in `_Tokeniser`.
_KEYWORD_TERMINALS = {
    "model": "_MODEL", "function": "_FUNCTION", "sites": "_SITES", "in": "_IN",
    "observe": "OBSERVE", "input": "INPUT", "const": "_CONST", "module": "_MODULE",
    "export": "_EXPORT", "using": "_USING", "include": "_INCLUDE", "extern": "_EXTERN",
    "host": "HOST", "return": "_RETURN", "if": "_IF", "elseif": "_ELSEIF", "else": "_ELSE",
    "true": "TRUE", "false": "FALSE",
}

# Operator text → (terminal, normalised value). Dotted operators mean the same as plain ones.
_OPERATORS = {
    "+": ("ADDOP", "+"), "-": ("ADDOP", "-"), "*": ("MULOP", "*"), "/": ("MULOP", "/"),
    "^": ("POW", "^"), "<": ("CMP", "<"), "<=": ("CMP", "<="), ">": ("CMP", ">"),
    ">=": ("CMP", ">="), "==": ("CMP", "=="), "!=": ("CMP", "!="), "&&": ("ANDAND", "&&"),
    "||": ("OROR", "||"), "!": ("BANG", "!"), "=": ("_ASSIGN", "="), "~": ("_TILDE", "~"),
    "::": ("_DCOLON", "::"), ",": ("_COMMA", ","), ".": ("_DOT", "."), ":": ("_COLON", ":"),
    "?": ("_QMARK", "?"), "{": ("_LBRACE", "{"), "}": ("_RBRACE", "}"),
}
_OPERATORS.update({"." + op: _OPERATORS[op] for op in ["+", "-", "*", "/", "^", "<", "<=", ">", ">=", "==", "!="]})

# What the user sees for each terminal in "expected …" messages.
_TERMINAL_NAMES = {
    "NAME": "a name", "NUMBER": "a number", "STRING": "a string", "ADDOP": "`+` or `-`",
    "MULOP": "`*` or `/`", "POW": "`^`", "CMP": "a comparison", "ANDAND": "`&&`", "OROR": "`||`",
    "BANG": "`!`", "OBSERVE": "`observe`", "INPUT": "`input`", "HOST": "`host`", "TRUE": "`true`",
    "FALSE": "`false`", "END_INDEX": "`end`", "MSEP": "a space", "ROWSEP": "`;`", "SEMI": "`;`",
    "_NL": "a new line", "_ASSIGN": "`=`", "_TILDE": "`~`", "_DCOLON": "`::`", "_COMMA": "`,`",
    "_DOT": "`.`", "_COLON": "`:`", "_TCOLON": "` : `", "_QMARK": "`?`", "_LPAR": "`(`",
    "_CALL_LPAR": "`(`", "_RPAR": "`)`", "_LSQB": "`[`", "_INDEX_LSQB": "`[`", "_RSQB": "`]`",
    "_LBRACE": "`{`", "_RBRACE": "`}`", "$END": "the end of the file",
}
_TERMINAL_NAMES.update({term: f"`{word}`" for word, term in _KEYWORD_TERMINALS.items()})
_TERMINAL_NAMES["_END"] = "`end`"

# Terminals after which an expression is complete: a `(` or `[` right after one (no space) is a
# call or an index, and inside a matrix literal a space after one may start a new column.
_ENDS_EXPRESSION = frozenset(
    {"NAME", "NUMBER", "STRING", "TRUE", "FALSE", "END_INDEX", "_END", "_RPAR", "_RSQB"}
)
# Terminals that can begin an expression (for matrix columns; `+`/`-` are handled separately).
_STARTS_EXPRESSION = frozenset(
    {"NAME", "NUMBER", "STRING", "TRUE", "FALSE", "END_INDEX", "_LPAR", "_LSQB", "BANG", "_IF"}
)
# Terminals after which a statement continues on the next line.
_CONTINUES = frozenset(
    {"ADDOP", "MULOP", "POW", "CMP", "ANDAND", "OROR", "BANG", "_ASSIGN", "_TILDE", "_DCOLON",
     "_COMMA", "_DOT", "_COLON", "_TCOLON", "_QMARK", "_LBRACE"}
)
# Terminals that open a block closed by `end` (used to say which block lacks its `end`).
_BLOCK_OPENERS = frozenset({"_MODEL", "_FUNCTION", "_SITES", "_MODULE", "_IF"})
# Keywords followed by a name: `input = 3` means the keyword was taken for a name.
_NAMED_BY_NEXT = frozenset({"OBSERVE", "INPUT", "_SITES", "_MODEL", "_FUNCTION", "_MODULE",
                            "_CONST"})
# Keywords that can only start a top-level item: meeting one inside a block means an `end` is missing.
_ITEM_KEYWORDS = frozenset({"_MODEL", "_FUNCTION", "_MODULE", "_CONST", "_EXTERN", "_USING",
                            "_INCLUDE", "_EXPORT"})

# ----------------------------------------------------------------------------- raw scanning


_RAW_PATTERN = re.compile(
    r"""
    (?P<space>[ \t\r]+)
  | (?P<newline>\n)
  | (?P<block_comment>\#=)
  | (?P<comment>\#[^\n]*)
  | (?P<number>[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)
  | (?P<name>[^\W\d]\w*)
  | (?P<string>")
  | (?P<dot_call>\.\()
  | (?P<bad_number>\.[0-9])
  | (?P<operator>::|\.?(?:==|!=|<=|>=)|&&|\|\||\.[-+*/^<>]|[-+*/^<>=~!?:,;.{}()\[\]])
    """,
    re.VERBOSE,
)
_STRING_ESCAPES = {"\\": "\\", '"': '"', "n": "\n", "t": "\t"}


@dataclass(frozen=True)
class _Raw:
    """A token before layout resolution.

    `kind` is a group name of `_RAW_PATTERN` ("name", "number", "string", "newline", "dot_call",
    "operator") or, for the brackets and `;` whose meaning depends on context, the character.
    """

    kind: str
    value: str
    start: int
    end: int
    line: int
    column: int
    end_line: int
    end_column: int
    space_before: bool


class _Source:
    """The text being parsed, with offset → (line, column) conversion."""

    def __init__(self, text: str, file: str):
        self.text = text
        self.file = file
        self._line_starts = [0] + [m.end() for m in re.finditer("\n", text)]

    def position(self, offset: int) -> tuple[int, int]:
        line = bisect.bisect_right(self._line_starts, offset)
        return line, offset - self._line_starts[line - 1] + 1

    def span(self, start: int, end: int) -> ast.Span:
        line, column = self.position(start)
        end_line, end_column = self.position(end)
        return ast.Span(self.file, line, column, end_line, end_column)

    def fail(self, message: str, start: int, end: int, label: str = "",
             notes: tuple[str, ...] = ()) -> HsbiError:
        return HsbiError([error(message, self.span(start, end), label, notes)],
                         sources={self.file: self.text})


def _scan(source: _Source) -> Iterator[_Raw]:
    """Yield raw tokens, raising `HsbiError` at the first malformed character sequence."""
    text = source.text
    pos = 0
    space_before = True
    while pos < len(text):
        match = _RAW_PATTERN.match(text, pos)
        if match is None:
            raise _bad_character(source, pos)
        kind = match.lastgroup
        end = match.end()
        if kind == "space" or kind == "comment":
            space_before = True
            pos = end
            continue
        if kind == "block_comment":
            pos = _skip_block_comment(source, pos)
            space_before = True
            continue
        value = match.group()
        if kind == "number":
            _check_number_end(source, pos, end)
        elif kind == "bad_number":
            digits = re.match(r"\.[0-9]+", text[pos:]).group()
            raise source.fail(f"`{digits}` is not a number", pos, pos + len(digits),
                              f"write `0{digits}`")
        elif kind == "string":
            end, value = _scan_string(source, pos)
        if kind == "operator":
            kind = value if value in (";", "(", ")", "[", "]") else "operator"
        yield _make_raw(source, kind, value, pos, end, space_before)
        space_before = kind == "newline"
        pos = end


def _make_raw(source: _Source, kind: str, value: str, start: int, end: int,
              space_before: bool) -> _Raw:
    line, column = source.position(start)
    end_line, end_column = source.position(end)
    return _Raw(kind, value, start, end, line, column, end_line, end_column, space_before)


def _bad_character(source: _Source, pos: int) -> HsbiError:
    char = source.text[pos]
    hints = {
        "&": "logical and is written `&&`",
        "|": "logical or is written `||`",
        "'": "strings use double quotes, and there is no transpose operator: use `transpose(x)`",
        "%": "there is no `%` operator",
    }
    return source.fail(f"unexpected character `{char}`", pos, pos + 1, hints.get(char, ""))


def _skip_block_comment(source: _Source, start: int) -> int:
    """Return the offset just past the `=#` closing the (possibly nested) block comment at `start`."""
    text = source.text
    depth = 0
    pos = start
    while pos < len(text):
        if text.startswith("#=", pos):
            depth += 1
            pos += 2
        elif text.startswith("=#", pos):
            depth -= 1
            pos += 2
            if depth == 0:
                return pos
        else:
            pos += 1
    raise source.fail("unterminated block comment", start, start + 2,
                      "this `#=` has no matching `=#`")


def _check_number_end(source: _Source, start: int, end: int) -> None:
    """Reject `1.`, `1.2.3` and `2x`: Julia reads them, but they are mistakes in `.hsbi`."""
    text = source.text
    after = text[end:end + 1]
    if after == ".":
        following = text[end + 1:end + 2]
        if re.fullmatch("[0-9]", following):
            raise source.fail("malformed number", start, end + 2, "a number has at most one `.`")
        if following not in tuple("+-*/^<>=!"):
            number = text[start:end]
            raise source.fail(f"`{number}.` is not a number", start, end + 1,
                              f"write `{number}.0`")
    elif after and (after.isalpha() or after == "_"):
        number = text[start:end]
        raise source.fail("a number cannot be followed directly by a name", start, end + 1,
                          f"write `{number} * …` to multiply")


def _scan_string(source: _Source, start: int) -> tuple[int, str]:
    """Return the offset past the string literal at `start` and its unescaped value."""
    text = source.text
    chars: list[str] = []
    pos = start + 1
    while pos < len(text) and text[pos] != "\n":
        char = text[pos]
        if char == '"':
            return pos + 1, "".join(chars)
        if char == "\\":
            escaped = text[pos + 1:pos + 2]
            if escaped not in _STRING_ESCAPES:
                raise source.fail("unknown escape in string", pos, pos + 2,
                                  'allowed escapes are \\\\, \\", \\n and \\t')
            chars.append(_STRING_ESCAPES[escaped])
            pos += 2
            continue
        chars.append(char)
        pos += 1
    raise source.fail("unterminated string", start, pos, 'close the string with `"` on this line')


# ----------------------------------------------------------------------------- layout


@dataclass
class _Frame:
    """An open `(`, `[` (index or literal), `if` block, or the file itself."""

    kind: str  # "file", "if", "(", "[index", "[literal"
    opener: _Raw | None = None
    pending_conditionals: int = 0  # `?` seen in this frame still waiting for their ` : `


@dataclass
class _Tokeniser:
    """Turns raw tokens into parser terminals by resolving the layout rules (module docstring)."""

    source: _Source
    frames: list[_Frame] = field(default_factory=lambda: [_Frame("file")])
    previous: Token | None = None

    def tokens(self) -> Iterator[Token]:
        raws = _scan(self.source)
        current = next(raws, None)
        while current is not None:
            # One token of lookahead; a scanning error in it is raised only after `current` has
            # been parsed, so errors are reported in source order.
            try:
                following = next(raws, None)
            except HsbiError:
                yield from self._resolve(current, None)
                raise
            yield from self._resolve(current, following)
            current = following
        innermost = self.innermost_bracket()
        if innermost is not None:
            opener = innermost.opener
            raise self.source.fail(f"unclosed `{opener.value}`", opener.start, opener.end,
                                   f"this `{opener.value}` is never closed")
        if self.previous is not None and self.previous.type != "_NL":
            yield self._token("_NL", "", len(self.source.text), len(self.source.text))

    def _resolve(self, raw: _Raw, following: _Raw | None) -> Iterator[Token]:
        frame = self.frames[-1]
        kind = raw.kind
        if kind == "newline":
            yield from self._newline(raw, following)
            return
        if kind == ";":
            yield from self._semicolon(raw)
            return
        terminal, value = self._classify(raw)
        if frame.kind == "[literal" and self._starts_column(raw, terminal, following):
            yield self._token("MSEP", " ", raw.start, raw.start)
        if terminal == "_QMARK":
            frame.pending_conditionals += 1
        elif terminal == "_TCOLON":
            frame.pending_conditionals -= 1
        elif terminal in ("_RPAR", "_RSQB"):
            self._close(raw)  # before the parser sees it: a mismatched bracket is reported as such
        yield self._token_at(raw, terminal, value)
        self._open(raw, terminal)

    def _classify(self, raw: _Raw) -> tuple[str, str]:
        """The terminal for a non-layout raw token, from its text and what came before it."""
        kind = raw.kind
        attached = (not raw.space_before and self.previous is not None
                    and self.previous.type in _ENDS_EXPRESSION)
        if kind == "name":
            if raw.value == "end":
                return self._end_terminal(), "end"
            return _KEYWORD_TERMINALS.get(raw.value, "NAME"), raw.value
        if kind in ("number", "string"):
            return kind.upper(), raw.value
        if kind == "dot_call":
            return "_CALL_LPAR", "("
        if kind == "(":
            return ("_CALL_LPAR" if attached else "_LPAR"), "("
        if kind == "[":
            return ("_INDEX_LSQB" if attached else "_LSQB"), "["
        if kind in ")]":
            return ("_RPAR" if kind == ")" else "_RSQB"), kind
        terminal, value = _OPERATORS[raw.value]
        if terminal == "_COLON" and self._is_conditional_colon(raw):
            return "_TCOLON", ":"
        return terminal, value

    def _end_terminal(self) -> str:
        """`end` means "last element" inside an index bracket, and closes a block elsewhere."""
        for frame in reversed(self.frames):
            if frame.kind == "[index":
                return "END_INDEX"
            if frame.kind == "if":
                break
        return "_END"

    def _is_conditional_colon(self, raw: _Raw) -> bool:
        frame = self.frames[-1]
        return frame.pending_conditionals > 0 and raw.space_before and self._space_after(raw)

    def _space_after(self, raw: _Raw) -> bool:
        text = self.source.text
        return raw.end >= len(text) or text[raw.end] in " \t\r\n#"

    def _starts_column(self, raw: _Raw, terminal: str, following: _Raw | None) -> bool:
        """Inside `[ ]`, does this token begin a new matrix column (Julia's whitespace rule)?"""
        if not raw.space_before or self.previous is None:
            return False
        if self.previous.type not in _ENDS_EXPRESSION:
            return False
        if terminal == "ADDOP":
            return following is not None and not following.space_before
        return terminal in _STARTS_EXPRESSION

    def _open(self, raw: _Raw, terminal: str) -> None:
        """Open a bracket or `if` frame, or close an `if`, once the parser has accepted `terminal`."""
        if terminal in ("_LPAR", "_CALL_LPAR"):
            self.frames.append(_Frame("(", raw))
        elif terminal == "_INDEX_LSQB":
            self.frames.append(_Frame("[index", raw))
        elif terminal == "_LSQB":
            self.frames.append(_Frame("[literal", raw))
        elif terminal == "_IF":
            self.frames.append(_Frame("if", raw))
        elif terminal == "_END" and self.frames[-1].kind == "if":
            self.frames.pop()

    def _close(self, raw: _Raw) -> None:
        # An `if` left open inside the brackets is the parser's to report (it expects `end`).
        index = len(self.frames) - 1
        while self.frames[index].kind == "if":
            index -= 1
        frame = self.frames[index]
        if frame.kind == "file":
            raise self.source.fail(f"unmatched `{raw.value}`", raw.start, raw.end,
                                   "there is no bracket open here for it to close")
        expected = ")" if frame.kind == "(" else "]"
        if expected != raw.value:
            opener = frame.opener
            raise self.source.fail(
                f"mismatched `{raw.value}`", raw.start, raw.end,
                f"expected `{expected}` to close the `{opener.value}` on line {opener.line}, "
                f"column {opener.column}",
            )
        del self.frames[index:]

    def _newline(self, raw: _Raw, following: _Raw | None) -> Iterator[Token]:
        frame = self.frames[-1]
        previous = self.previous
        if frame.kind in ("(", "[index"):
            return
        if previous is None or previous.type in _CONTINUES or previous.type in ("_NL", "ROWSEP"):
            return
        if frame.kind == "[literal":
            if previous.type == "_LSQB" or (following is not None and following.kind == "]"):
                return
            yield self._token("ROWSEP", "\n", raw.start, raw.end)
            return
        frame.pending_conditionals = 0
        yield self._token("_NL", "\n", raw.start, raw.end)

    def _semicolon(self, raw: _Raw) -> Iterator[Token]:
        frame = self.frames[-1]
        if frame.kind == "(" or frame.kind == "[index":
            yield self._token("SEMI", ";", raw.start, raw.end)
        elif frame.kind == "[literal":
            yield self._token("ROWSEP", ";", raw.start, raw.end)
        elif self.previous is not None and self.previous.type != "_NL":
            frame.pending_conditionals = 0
            yield self._token("_NL", ";", raw.start, raw.end)

    def innermost_bracket(self) -> _Frame | None:
        for frame in reversed(self.frames):
            if frame.kind in ("(", "[index", "[literal"):
                return frame
        return None

    def _token_at(self, raw: _Raw, terminal: str, value: str) -> Token:
        token = Token(terminal, value, raw.start, raw.line, raw.column, raw.end_line,
                      raw.end_column, raw.end)
        self.previous = token
        return token

    def _token(self, terminal: str, value: str, start: int, end: int) -> Token:
        line, column = self.source.position(start)
        end_line, end_column = self.source.position(end)
        token = Token(terminal, value, start, line, column, end_line, end_column, end)
        self.previous = token
        return token


# ----------------------------------------------------------------------------- parsing


class _UnusedLexer(Lexer):
    """Placeholder: `_Tokeniser` feeds the parser directly, so Lark's lexer never runs."""

    def __init__(self, lexer_conf: object):
        pass

    def lex(self, data: str) -> Iterator[Token]:
        raise NotImplementedError("tokens are fed by _Tokeniser")


@functools.cache
def _parser() -> Lark:
    grammar = (Path(__file__).parent / "grammar.lark").read_text(encoding="utf-8")
    return Lark(grammar, parser="lalr", lexer=_UnusedLexer, propagate_positions=True)


def _run_parser(source: _Source, tokeniser: _Tokeniser) -> Tree:
    """Feed the tokeniser's output to the LALR parser; may raise Lark's `UnexpectedToken`."""
    interactive = _parser().parse_interactive()
    for token in tokeniser.tokens():
        interactive.feed_token(token)
    end = len(source.text)
    line, column = source.position(end)
    return interactive.feed_token(Token("$END", "", end, line, column, line, column, end))


def _parse_tree(source: _Source) -> Tree:
    """Parse `source` into a Lark tree; syntax errors become `HsbiError`."""
    tokeniser = _Tokeniser(source)
    try:
        return _run_parser(source, tokeniser)
    except UnexpectedToken as exc:
        raise _syntax_error(exc, source, tokeniser) from None


def _probe(text: str) -> None:
    """Parse `text`, letting `UnexpectedToken` escape: how `_example_errors` runs an example."""
    source = _Source(text, "<example>")
    _run_parser(source, _Tokeniser(source))


# ----------------------------------------------------------------------------- syntax errors

# Example mistakes, each labelled with (headline, help). On a syntax error, the parser state and
# offending token are compared with those of these examples (Lark's `match_examples`).
_EXAMPLES: dict[tuple[str, str], list[str]] = {
    ("`=` assigns; use `==` to compare", "write `==` for equality"): [
        "function f(x)\n    if x = 1\n        1\n    end\nend",
        "function f(x)\n    y = x = 1\nend",
        "model M()\n    y = x = 1\nend",
        "function f(x)\n    y = (x = 1) ? 1 : 0\nend",
    ],
    ("missing `~` or `=` after an observed or input name",
     "write `observe y ~ Dist(…)` or `observe y = expr`"): [
        "model M()\n    sites i in 1:n\n        observe y\n    end\nend",
        "model M()\n    sites i in 1:n\n        input t\n    end\nend",
        "model M()\n    sites i in 1:n\n        observe y Normal(0.0, 1.0)\n    end\nend",
        "model M()\n    sites i in 1:n\n        observe y(1) ~ Normal(0.0, 1.0)\n    end\nend",
    ],
    ("comparisons cannot be chained", "write `a < b && b < c`"): [
        "const c = 1 < 2 < 3",
        "const c = 1 == 2 == 3",
    ],
    ("a conditional needs spaces around its `:`",
     "write `c ? a : b`; without spaces `a:b` is a range"): [
        "const c = x ? 1:2",
        "const c = x ? a:b",
        "const c = x ? f(a):b",
    ],
    ("a function name must be followed directly by `(`", "remove the space before `(`"): [
        "const c = f (1)",
        "const c = Normal (1)",
        "model M()\n    x ~ Normal (0, 1)\nend",
    ],
    ("missing operator or `,` between two expressions",
     "put an operator (`*`, `+`, …) or a `,` between them"): [
        "const c = f(a b)",
        "const c = f(1 2)",
        "const c = (a b)",
        "const c = g(1, a b)",
    ],
    ("unexpected text after the end of the statement",
     "put each statement on its own line, or separate them with `;`"): [
        "const c = 1 2",
        "const c = a b",
        "model M()\n    x = 1 2\nend",
        "model M()\n    x ~ Normal(0, 1) y\nend",
        "function f(x)\n    return x y\nend",
    ],
    ("the long form of a function has no `=`",
     "write `function f(x) … end`, or the short form `f(x) = expr` without `function`"): [
        "function f(x) = x",
    ],
    ("`sites` needs an index and a range", "write `sites i in 1:n_sites`"): [
        "model M()\n    sites 1:n\n    end\nend",
        "model M()\n    sites i 1:n\n    end\nend",
        "model M()\n    sites i = 1:n\n    end\nend",
    ],
    ("only definitions may appear at the top level",
     "the top level holds `const`, `function`, `model`, `module`, `extern`, `include`, `using` "
     "and `export`; statements belong inside a `model` or `function`"): [
        "x",
        "x = 1",
        "x ~ Normal(0, 1)",
        "const a = 1\nx ~ Normal(0, 1)",
        "1 + 2",
        "const a = 1\n1 + 2",
        "return 1",
    ],
    ("`end` without an open block", "remove it, or check the blocks above"): [
        "end",
        "model M()\nend\nend",
    ],
    ("incomplete expression", "an expression is missing here"): [
        "const c = 1 +",
        "const c = 1 *",
        "const c =",
        "model M()\n    x ~\nend",
        "model M()\n    x =\nend",
    ],
}


@functools.cache
def _example_errors() -> dict[str, UnexpectedToken]:
    """Each example's `UnexpectedToken`, with its state reduced to the LALR state number.

    Lark compares parser states including the stack depth, so an example would only match a
    mistake at the same nesting depth; comparing the state number alone generalises it.
    """
    errors: dict[str, UnexpectedToken] = {}
    for snippets in _EXAMPLES.values():
        for snippet in snippets:
            try:
                _probe(snippet)
            except UnexpectedToken as exc:
                exc.state = exc.state.position
                errors[snippet] = exc
    return errors


def _raise_example(snippet: str) -> None:
    raise _example_errors()[snippet]


def _describe(token: Token) -> str:
    if token.type == "$END":
        return "end of file"
    if token.type == "_NL" and token.value == "":
        return "end of file"
    if token.type in ("_NL", "ROWSEP") and token.value == "\n":
        return "end of line"
    if token.type == "MSEP":
        return "space"
    if token.type == "NAME":
        return f"name `{token.value}`"
    if token.type == "NUMBER":
        return f"number `{token.value}`"
    if token.type == "STRING":
        return "string"
    if token.type in _KEYWORD_TERMINALS.values() or token.type in ("_END", "END_INDEX"):
        return f"keyword `{token.value}`"
    return f"`{token.value}`"


# Grouped in "expected …" messages so they do not list every token that can start an expression.
_EXPRESSION_TERMINALS = frozenset(
    {"NAME", "NUMBER", "STRING", "TRUE", "FALSE", "END_INDEX", "_LPAR", "_LSQB", "_IF", "ADDOP",
     "BANG"}
)
_OPERATOR_TERMINALS = frozenset(
    {"ADDOP", "MULOP", "POW", "CMP", "ANDAND", "OROR", "_QMARK", "_COLON", "_CALL_LPAR",
     "_INDEX_LSQB", "_DOT"}
)


def _expected_list(expected: set[str]) -> str:
    """A short "expected …" help line, or "" when too many things would fit."""
    names = set()
    for terminal in expected:
        if "NAME" in expected and "NUMBER" in expected and terminal in _EXPRESSION_TERMINALS:
            names.add("an expression")
        elif terminal in _OPERATOR_TERMINALS:
            names.add("an operator")
        elif terminal != "MSEP":
            names.add(_TERMINAL_NAMES.get(terminal, terminal))
    ordered = sorted(names)
    if not ordered or len(ordered) > 5:
        return ""
    if len(ordered) == 1:
        return f"expected {ordered[0]}"
    return "expected " + ", ".join(ordered[:-1]) + " or " + ordered[-1]


def _never_closed(source: _Source, offset: int) -> bool:
    """Whether the innermost bracket open at `offset` stays open to the end of the file."""
    depth = 0
    try:
        for raw in _scan(_Source(source.text[offset:], source.file)):
            if raw.kind in ("(", "[", "dot_call"):
                depth += 1
            elif raw.kind in (")", "]"):
                if depth == 0:
                    return False
                depth -= 1
    except HsbiError:
        pass  # later text that does not even scan cannot close the bracket
    return True


def _syntax_error(exc: UnexpectedToken, source: _Source, tokeniser: _Tokeniser) -> HsbiError:
    """Explain a parser error: structural causes first (an unclosed bracket, a missing `end`, a
    keyword used as a name), then the labelled examples, then "unexpected X, expected Y"."""
    token = exc.token
    value_stack = exc.state.value_stack
    expected = set(exc.expected)
    sources = {source.file: source.text}
    token_span = ast.Span(source.file, token.line, token.column, token.end_line, token.end_column)

    bracket = tokeniser.innermost_bracket()
    if (bracket is not None and token.line > bracket.opener.line
            and _never_closed(source, token.start_pos)):
        opener = bracket.opener
        return source.fail(
            f"unclosed `{opener.value}`", opener.start, opener.end,
            f"this `{opener.value}` is never closed",
            (f"still inside it at line {token.line}, where the {_describe(token)} "
             "was unexpected",),
        )

    if "_END" in expected and (token.type == "$END" or token.type in _ITEM_KEYWORDS):
        opener_token = _innermost_open_block(value_stack)
        if opener_token is not None:
            found = ("the file ends" if token.type == "$END"
                     else f"found {_describe(token)} on line {token.line}")
            return HsbiError(
                [error(f"missing `end` for this `{opener_token.value}`",
                       _token_span(opener_token, source.file),
                       f"this `{opener_token.value}` block is never closed",
                       (f"{found} before its `end`",))],
                sources=sources,
            )

    keyword = None
    if token.type in _KEYWORD_TERMINALS.values() and "NAME" in expected:
        keyword = token
    elif (token.type in ("_ASSIGN", "_TILDE") and value_stack
          and isinstance(value_stack[-1], Token) and value_stack[-1].type in _NAMED_BY_NEXT):
        keyword = value_stack[-1]  # `input = 3`: the keyword was meant as the name
    if keyword is not None:
        return HsbiError(
            [error(f"`{keyword.value}` is a keyword and cannot be used as a name",
                   _token_span(keyword, source.file), "choose another name")],
            sources=sources,
        )

    exc.state = exc.state.position
    matched = exc.match_examples(_raise_example, _EXAMPLES, token_type_match_fallback=True)
    if matched is not None:
        headline, label = matched
        return HsbiError([error(headline, token_span, label,
                                (f"found {_describe(token)}",))], sources=sources)
    return HsbiError([error(f"unexpected {_describe(token)}", token_span,
                            _expected_list(expected))], sources=sources)


def _innermost_open_block(value_stack: list) -> Token | None:
    for value in reversed(value_stack):
        if isinstance(value, Token) and value.type in _BLOCK_OPENERS:
            return value
    return None


def _token_span(token: Token, file: str) -> ast.Span:
    return ast.Span(file, token.line, token.column, token.end_line, token.end_column)


# ----------------------------------------------------------------------------- AST building


class _Builder:
    """Builds AST nodes from the Lark tree; one method per grammar rule."""

    def __init__(self, source: _Source):
        self.source = source
        self.errors: list[Diagnostic] = []

    def span(self, node: Tree | Token) -> ast.Span:
        if isinstance(node, Token):
            return _token_span(node, self.source.file)
        meta = node.meta
        if meta.empty:
            return ast.NO_SPAN
        return ast.Span(self.source.file, meta.line, meta.column, meta.end_line, meta.end_column)

    def fail(self, message: str, node: Tree | Token, label: str = "") -> None:
        self.errors.append(error(message, self.span(node), label))

    # ------------------------------------------------------------------ top level

    def program(self, tree: Tree) -> ast.Program:
        items = tuple(self.item(child) for child in tree.children)
        span = ast.Span(self.source.file, 1, 1, *self.source.position(len(self.source.text)))
        return ast.Program(items, file=self.source.file, span=span)

    def item(self, tree: Tree) -> ast.Item:
        return getattr(self, "item_" + tree.data)(tree)

    def item_const(self, tree: Tree) -> ast.Const:
        name, value = tree.children
        return ast.Const(str(name), self.expr(value), span=self.span(tree))

    def item_function(self, tree: Tree) -> ast.Function:
        name, params, body = tree.children
        return ast.Function(str(name), self.params(params), self.block(body), short=False,
                            span=self.span(tree))

    def item_short_function(self, tree: Tree) -> ast.Function:
        name, params, value = tree.children
        expr = self.expr(value)
        return ast.Function(str(name), self.params(params), (ast.Return(expr, span=expr.span),),
                            short=True, span=self.span(tree))

    def item_extern(self, tree: Tree) -> ast.Extern:
        children = list(tree.children)
        host = isinstance(children[0], Token) and children[0].type == "HOST"
        if host:
            children.pop(0)
        name, params, *rest = children
        returns: ast.TypeAnn | None = None
        target: str | None = None
        for child in rest:
            if isinstance(child, Tree):
                returns = self.annotation(child)
            else:
                target = str(child)
        return ast.Extern(str(name), self.params(params), returns, host, target,
                          span=self.span(tree))

    def item_model(self, tree: Tree) -> ast.Model:
        name, params, body = tree.children
        return ast.Model(str(name), self.params(params), self.block(body), span=self.span(tree))

    def item_module(self, tree: Tree) -> ast.Module:
        name, body = tree.children
        items = tuple(self.item(child) for child in body.children)
        return ast.Module(str(name), items, span=self.span(tree))

    def item_include(self, tree: Tree) -> ast.Include:
        (path,) = tree.children
        return ast.Include(str(path), span=self.span(tree))

    def item_using(self, tree: Tree) -> ast.Using:
        relative = False
        module: tuple[str, ...] = ()
        names: tuple[str, ...] | None = None
        for child in tree.children:
            if child.data == "relative":
                relative = True
            elif child.data == "module_path":
                module = tuple(str(part) for part in child.children)
            else:
                names = tuple(str(part) for part in child.children)
        return ast.Using(module, names, relative, span=self.span(tree))

    def item_export(self, tree: Tree) -> ast.Export:
        return ast.Export(tuple(str(name) for name in tree.children), span=self.span(tree))

    def params(self, tree: Tree) -> tuple[ast.Param, ...]:
        return tuple(self.param(child) for child in tree.children)

    def param(self, tree: Tree) -> ast.Param:
        name, *rest = tree.children
        annotation: ast.TypeAnn | None = None
        default: ast.Expr | None = None
        for child in rest:
            if child.data == "annotation":
                annotation = self.annotation(child)
            else:
                default = self.expr(child)
        return ast.Param(str(name), annotation, default, span=self.span(tree))

    def annotation(self, tree: Tree) -> ast.TypeAnn:
        (type_tree,) = tree.children
        name, *numbers = type_tree.children
        params = []
        for number in numbers:
            if not re.fullmatch("[0-9]+", number):
                self.fail("a type parameter must be a whole number", number,
                          f"e.g. `{name}{{3}}`")
            else:
                params.append(int(number))
        return ast.TypeAnn(str(name), tuple(params), span=self.span(type_tree))

    # ------------------------------------------------------------------ statements

    def block(self, tree: Tree) -> tuple[ast.Stmt, ...]:
        return tuple(self.stmt(child) for child in tree.children)

    def stmt(self, tree: Tree) -> ast.Stmt:
        return getattr(self, "stmt_" + tree.data)(tree)

    def _role_target(self, tree: Tree) -> tuple[str | None, str, ast.TypeAnn | None, ast.Expr]:
        children = list(tree.children)
        role = None
        if isinstance(children[0], Tree) and children[0].data == "role":
            role = str(children.pop(0).children[0])
        name = str(children.pop(0))
        annotation = self.annotation(children.pop(0)) if len(children) == 2 else None
        return role, name, annotation, self.expr(children[0])

    def stmt_tilde(self, tree: Tree) -> ast.Tilde:
        role, name, annotation, dist = self._role_target(tree)
        return ast.Tilde(role or "param", name, annotation, dist, span=self.span(tree))

    def stmt_assign(self, tree: Tree) -> ast.Assign:
        role, name, annotation, value = self._role_target(tree)
        return ast.Assign(role or "det", (name,), annotation, value, span=self.span(tree))

    def stmt_destructure(self, tree: Tree) -> ast.Assign:
        *names, value = tree.children
        return ast.Assign("det", tuple(str(n) for n in names), None, self.expr(value),
                          span=self.span(tree))

    def stmt_return_stmt(self, tree: Tree) -> ast.Return:
        (value,) = tree.children
        return ast.Return(self.expr(value), span=self.span(tree))

    def stmt_expr_stmt(self, tree: Tree) -> ast.ExprStmt:
        (value,) = tree.children
        return ast.ExprStmt(self.expr(value), span=self.span(tree))

    def stmt_sites(self, tree: Tree) -> ast.Sites:
        index, range_tree, body = tree.children
        site_range = self.expr(range_tree)
        if not isinstance(site_range, ast.Range) or site_range.step is not None:
            self.fail("`sites` needs a range `start:count`", range_tree,
                      f"write e.g. `sites {index} in 1:n_sites`")
            start, count = site_range, site_range
        else:
            start, count = site_range.start, site_range.stop
        return ast.Sites(str(index), start, count, self.block(body), span=self.span(tree))

    # ------------------------------------------------------------------ expressions

    def expr(self, tree: Tree) -> ast.Expr:
        return getattr(self, "expr_" + tree.data)(tree)

    def expr_ternary(self, tree: Tree) -> ast.Ternary:
        cond, then, otherwise = (self.expr(child) for child in tree.children)
        return ast.Ternary(cond, then, otherwise, span=self.span(tree))

    def expr_binary(self, tree: Tree) -> ast.Binary:
        left, op, right = tree.children
        return ast.Binary(str(op), self.expr(left), self.expr(right), span=self.span(tree))

    def expr_unary(self, tree: Tree) -> ast.Unary:
        op, operand = tree.children
        return ast.Unary(str(op), self.expr(operand), span=self.span(tree))

    def expr_range(self, tree: Tree) -> ast.Range:
        parts = [self.expr(child) for child in tree.children]
        step = parts[1] if len(parts) == 3 else None
        return ast.Range(parts[0], step, parts[-1], span=self.span(tree))

    def expr_call(self, tree: Tree) -> ast.Call:
        func_tree, args_tree = tree.children
        args: list[ast.Expr] = []
        kwargs: list[ast.Keyword] = []
        for child in args_tree.children:
            if isinstance(child, Token):  # the `;` before keyword arguments
                continue
            if child.data == "kwarg":
                name, value = child.children
                kwargs.append(ast.Keyword(str(name), self.expr(value), span=self.span(child)))
            elif kwargs:
                self.fail("positional argument after a keyword argument", child,
                          "put positional arguments first")
            else:
                args.append(self.expr(child))
        return ast.Call(self.expr_qualname(func_tree), tuple(args), tuple(kwargs),
                        span=self.span(tree))

    def expr_index(self, tree: Tree) -> ast.Index:
        value, indices = tree.children
        return ast.Index(self.expr(value), tuple(self.expr(child) for child in indices.children),
                         span=self.span(tree))

    def expr_colon(self, tree: Tree) -> ast.Colon:
        return ast.Colon(span=self.span(tree))

    def expr_qualname(self, tree: Tree) -> ast.Name:
        return ast.Name(tuple(str(part) for part in tree.children), span=self.span(tree))

    def expr_number(self, tree: Tree) -> ast.Num:
        (token,) = tree.children
        text = str(token)
        if re.fullmatch("[0-9]+", text):
            return ast.Num(int(text), True, span=self.span(tree))
        return ast.Num(float(text), False, span=self.span(tree))

    def expr_true(self, tree: Tree) -> ast.Bool:
        return ast.Bool(True, span=self.span(tree))

    def expr_false(self, tree: Tree) -> ast.Bool:
        return ast.Bool(False, span=self.span(tree))

    def expr_string(self, tree: Tree) -> ast.Str:
        (token,) = tree.children
        return ast.Str(str(token), span=self.span(tree))

    def expr_end_index(self, tree: Tree) -> ast.End:
        return ast.End(span=self.span(tree))

    def expr_tuple(self, tree: Tree) -> ast.TupleLit:
        return ast.TupleLit(tuple(self.expr(child) for child in tree.children),
                            span=self.span(tree))

    def expr_vector(self, tree: Tree) -> ast.VectorLit:
        return ast.VectorLit(tuple(self.expr(child) for child in tree.children),
                             span=self.span(tree))

    def expr_matrix(self, tree: Tree) -> ast.MatrixLit:
        rows: list[list[ast.Expr]] = [[]]
        for child in tree.children:
            if isinstance(child, Token):
                if child.type == "ROWSEP":
                    rows.append([])
            elif child.data == "matrix_row":
                rows[-1].extend(self.expr(item) for item in child.children
                                if isinstance(item, Tree))
            else:
                rows[-1].append(self.expr(child))
        if not rows[-1]:  # a trailing `;`
            rows.pop()
        return ast.MatrixLit(tuple(tuple(row) for row in rows), span=self.span(tree))

    def expr_if_expr(self, tree: Tree) -> ast.IfExpr:
        children = list(tree.children)
        branches = []
        while len(children) >= 2:
            cond, body = children.pop(0), children.pop(0)
            branches.append((self.expr(cond), self.block(body)))
        otherwise = self.block(children[0]) if children else ()
        return ast.IfExpr(tuple(branches), otherwise, span=self.span(tree))


# ----------------------------------------------------------------------------- entry point


def parse(text: str, file: str = "<string>") -> ast.Program:
    """Parse `.hsbi` source text into an `ast.Program` whose nodes carry source spans.

    Args:
        text: the source.
        file: the name used in spans and error messages.

    Raises:
        HsbiError: on any syntax error, rendered with file, line, column and a caret.
    """
    source = _Source(text, file)
    try:
        tree = _parse_tree(source)
        builder = _Builder(source)
        program = builder.program(tree)
    except RecursionError:
        raise source.fail("the program is nested too deeply", 0, 0,
                          "split deeply nested expressions into named steps") from None
    if builder.errors:
        raise HsbiError(builder.errors, sources={file: text})
    return program
