"""Command-line interface: `hierdsl compile`, `hierdsl fmt`, `hierdsl --version`.

User errors (bad model files, bad data) print the rendered diagnostics and exit with status 1,
never with a Python traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from hierdsl import __version__
from hierdsl.compiler.errors import HsbiError
from hierdsl.files import atomic_write


class UserError(Exception):
    """A problem with the user's input that is not in a model file (e.g. a bad `--arg`)."""


def _parse_args(pairs: Sequence[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--arg expects NAME=VALUE, got `{pair}`")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            raise UserError(f"--arg {key}: `{value}` is not a number or JSON value") from None
    return out


def cmd_compile(ns: argparse.Namespace) -> int:
    from hierdsl.model import compile

    model = compile(ns.file, model=ns.model, args=_parse_args(ns.arg), import_targets=False)
    for w in model.warnings:
        print(w.render(dict(model.sources)), file=sys.stderr)
        print(file=sys.stderr)
    if ns.output:
        atomic_write(ns.output, model.ir.dumps() + "\n")
    if ns.json:
        print(model.ir.dumps())
    else:
        print(model.structure())
        if ns.output:
            print(f"\nIR written to {ns.output}")
    return 0


def cmd_fmt(ns: argparse.Namespace) -> int:
    from hierdsl.compiler.load import read_source
    from hierdsl.compiler.parse import parse
    from hierdsl.compiler.pretty import pretty

    status = 0
    for path in ns.files:
        text = read_source(path)
        formatted = pretty(parse(text, path))
        if ns.check:
            if formatted != text:
                print(f"{path}: would reformat", file=sys.stderr)
                status = 1
        elif ns.write:
            if formatted != text:
                atomic_write(path, formatted)
        else:
            sys.stdout.write(formatted)
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hierdsl", description="Simulation-based inference for hierarchical models written in .hsbi.")
    parser.add_argument("--version", action="version", version=f"hierdsl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("compile", help="parse and check a model; print its global/site structure")
    p.add_argument("file", help="the .hsbi file")
    p.add_argument("-o", "--output", help="write the IR as JSON to this file")
    p.add_argument("--model", help="which model, when the file defines several")
    p.add_argument("--arg", action="append", default=[], metavar="NAME=VALUE",
                   help="override a model argument, e.g. --arg n_sites=10")
    p.add_argument("--json", action="store_true", help="print the IR JSON instead of the table")
    p.set_defaults(run=cmd_compile)

    p = sub.add_parser("fmt", help="print a .hsbi file in canonical form")
    p.add_argument("files", nargs="+")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--check", action="store_true", help="exit 1 if a file is not canonical")
    group.add_argument("-w", "--write", action="store_true", help="rewrite the files in place")
    p.set_defaults(run=cmd_fmt)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help()
        return 2
    try:
        return ns.run(ns)
    except HsbiError as exc:
        print(exc.render(), file=sys.stderr)
        n = sum(1 for d in exc.diagnostics if d.severity == "error")
        print(f"\n{n} error{'s' if n != 1 else ''}", file=sys.stderr)
        return 1
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
