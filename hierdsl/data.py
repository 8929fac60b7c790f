"""Observed data in and out: tidy CSV and JSON files, checked against a model's IR.

CSV (one row per scalar, header required)::

    site,variable,index,value
    Choate,y,,28
    Choate,sigma,,15
    A,y,3,12          # element 3 of a vector observation (1-based)
    A,x,"2,1",0.5     # element (2, 1) of a matrix

`site` labels are any text and are kept through to the outputs, in order of first appearance.
`index` is empty for scalars. Every site must give every observation and every input of the model
(inputs with a fixed design `input t = …` may be omitted). Locals, globals or unknown variables are
errors; so are NaN/inf values, missing elements, duplicates and wrong shapes.

JSON::

    {"sites": {"Choate": {"y": 28, "sigma": 15}, "Deerfield": {"y": 8, "sigma": 10}}}

with arrays as nested lists.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from hierdsl.compiler.ast import Span
from hierdsl.compiler.errors import HsbiError, error
from hierdsl.compiler.ir import ModelIR, Variable


class DataError(HsbiError):
    """A problem in a data file, reported at its row."""


@dataclass(frozen=True)
class Dataset:
    """Per-site values: `values[name]` has shape `(num_sites, *variable.shape)`."""

    sites: tuple[str, ...]
    values: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def num_sites(self) -> int:
        return len(self.sites)


def data_variables(ir: ModelIR) -> tuple[Variable, ...]:
    """What a data file must give per site: observations, and inputs that are drawn (not fixed)."""
    return tuple(v for v in ir.variables if v.role == "observation" or (v.role == "input" and v.stochastic))


def _fail(path: str, text: Optional[str], line: int, message: str, label: str = "", notes=()) -> DataError:
    span = Span(path, line, 1, line, len(text.splitlines()[line - 1]) + 1 if text and line > 0 else 1)
    return DataError([error(message, span if line > 0 else Span(path, 0, 0, 0, 0), label, notes)],
                     {path: text} if text else {})


def read_data(path: str, ir: ModelIR) -> Dataset:
    """Read and check a CSV or JSON data file for `ir`."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise _fail(path, None, 0, f"data file `{path}` not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(path, None, 0, f"cannot read data file `{path}`: {exc}") from None
    if path.lower().endswith(".json"):
        return _read_json(path, text, ir)
    return _read_csv(path, text, ir)


def _parse_index(raw: str, var: Variable) -> Optional[tuple[int, ...]]:
    raw = raw.strip().strip("()[]")
    if not raw:
        return () if var.shape == () else None
    try:
        index = tuple(int(part) for part in raw.split(","))
    except ValueError:
        return None
    if len(index) != len(var.shape) or any(not 1 <= k <= n for k, n in zip(index, var.shape)):
        return None
    return tuple(k - 1 for k in index)


def _read_csv(path: str, text: str, ir: ModelIR) -> Dataset:
    wanted = {v.name: v for v in data_variables(ir)}
    known = {v.name: v for v in ir.variables}
    reader = csv.reader(io.StringIO(text))
    rows = list(reader)
    if not rows:
        raise _fail(path, text, 0, f"data file `{path}` is empty", "expected a header: site,variable,index,value")
    header = [h.strip().lower() for h in rows[0]]
    need = ["site", "variable", "index", "value"]
    missing = [h for h in need if h not in header]
    if missing:
        raise _fail(path, text, 1, f"the header lacks column{'s' if len(missing) > 1 else ''} "
                    + ", ".join(f"`{m}`" for m in missing), "expected columns: site,variable,index,value")
    col = {h: header.index(h) for h in need}
    sites: list[str] = []
    cells: dict[str, dict[str, dict[tuple, float]]] = {}
    errors = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < len(header):
            errors.append(_fail(path, text, line, f"row {line} has {len(row)} fields, expected {len(header)}"))
            continue
        site, name, raw_index, raw_value = (row[col[h]].strip() for h in need)
        if not site:
            errors.append(_fail(path, text, line, f"row {line}: empty `site`"))
            continue
        if name not in wanted:
            if name in known:
                role = known[name].role
                hint = ("it is a parameter to infer, not data" if role in ("global", "local")
                        else "it is computed by the model" if role in ("global_det", "site_det")
                        else "it is a fixed design (`input = …`), not data")
            else:
                hint = "the model's data variables are: " + ", ".join(sorted(wanted))
            errors.append(_fail(path, text, line, f"row {line}: unknown data variable `{name}`", hint))
            continue
        var = wanted[name]
        index = _parse_index(raw_index, var)
        if index is None:
            shape = "a scalar (leave `index` empty)" if var.shape == () else (
                f"shape {var.shape}: give 1-based indices like " + ",".join(["1"] * len(var.shape)))
            errors.append(_fail(path, text, line, f"row {line}: bad index `{raw_index}` for `{name}`",
                                f"`{name}` has {shape}"))
            continue
        try:
            value = float(raw_value)
        except ValueError:
            errors.append(_fail(path, text, line, f"row {line}: `{raw_value}` is not a number"))
            continue
        if not math.isfinite(value):
            errors.append(_fail(path, text, line, f"row {line}: `{name}` is {raw_value}",
                                "observed data must be finite; drop the site or impute the value"))
            continue
        if site not in cells:
            sites.append(site)
            cells[site] = {}
        per_var = cells[site].setdefault(name, {})
        if index in per_var:
            errors.append(_fail(path, text, line, f"row {line}: `{name}`{_fmt_index(index)} of site `{site}` is given twice"))
            continue
        per_var[index] = value
    if errors:
        raise DataError([d for e in errors[:20] for d in e.diagnostics], {path: text})
    return _assemble(path, sites, cells, wanted, ir)


def _fmt_index(index: tuple) -> str:
    return "" if not index else "[" + ", ".join(str(k + 1) for k in index) + "]"


def _assemble(path: str, sites: list[str], cells: dict, wanted: dict[str, Variable], ir: ModelIR) -> Dataset:
    if not sites:
        raise _fail(path, None, 0, f"data file `{path}` holds no sites")
    problems = []
    values: dict[str, np.ndarray] = {}
    for name, var in wanted.items():
        array = np.full((len(sites), *var.shape), np.nan)
        for s, site in enumerate(sites):
            given = cells[site].get(name, {})
            if not given:
                problems.append(f"site `{site}` has no `{name}`")
                continue
            for index, value in given.items():
                array[(s, *index)] = value
            missing = int(np.isnan(array[s]).sum())
            if missing:
                first = np.argwhere(np.isnan(array[s]))[0]
                problems.append(f"site `{site}`: {missing} element(s) of `{name}` missing, first {_fmt_index(tuple(first))}"
                                f" (shape {var.shape})")
        if var.dtype in ("int", "bool") and not np.all(np.isnan(array) | (array == np.round(array))):
            problems.append(f"`{name}` must hold whole numbers (it is {var.dtype}-valued)")
        values[name] = array
    if problems:
        raise DataError([error(f"data file `{path}` does not match model `{ir.name}`", Span(path, 0, 0, 0, 0),
                               "every site needs every observation and every drawn input", problems[:20])])
    return Dataset(tuple(sites), values)


def _read_json(path: str, text: str, ir: ModelIR) -> Dataset:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(path, text, exc.lineno, f"invalid JSON: {exc.msg}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("sites"), dict):
        raise _fail(path, text, 0, 'expected {"sites": {"label": {"variable": value, …}, …}}')
    wanted = {v.name: v for v in data_variables(ir)}
    sites = list(obj["sites"])
    cells: dict = {}
    problems = []
    for site, entry in obj["sites"].items():
        cells[site] = {}
        if not isinstance(entry, dict):
            problems.append(f"site `{site}`: expected an object of variables")
            continue
        for name, value in entry.items():
            if name not in wanted:
                problems.append(f"site `{site}`: unknown data variable `{name}` (expected: {', '.join(sorted(wanted))})")
                continue
            try:
                array = np.asarray(value, dtype=np.float64)
            except (TypeError, ValueError):
                problems.append(f"site `{site}`: `{name}` is not a number or array")
                continue
            if array.shape != wanted[name].shape:
                problems.append(f"site `{site}`: `{name}` has shape {array.shape}, the model expects {wanted[name].shape}")
                continue
            if not np.all(np.isfinite(array)):
                problems.append(f"site `{site}`: `{name}` holds NaN or infinite values")
                continue
            cells[site][name] = {tuple(i): float(array[tuple(i)]) for i in np.ndindex(*array.shape)} if array.shape \
                else {(): float(array)}
    if problems:
        raise DataError([error(f"data file `{path}` does not match model `{ir.name}`", Span(path, 0, 0, 0, 0),
                               "fix the listed entries", problems[:20])])
    return _assemble(path, sites, cells, wanted, ir)


def dataset_to_csv(dataset: Dataset, names: Optional[list[str]] = None) -> str:
    """The tidy CSV text of a dataset (the format `read_data` reads)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["site", "variable", "index", "value"])
    for s, site in enumerate(dataset.sites):
        for name in names or list(dataset.values):
            array = np.asarray(dataset.values[name][s])
            for index in np.ndindex(*array.shape):
                value = array[index]
                text = repr(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(float(value))
                writer.writerow([site, name, ",".join(str(k + 1) for k in index), text])
    return out.getvalue()


def default_site_labels(num_sites: int) -> tuple[str, ...]:
    width = len(str(num_sites))
    return tuple(f"site{k + 1:0{width}d}" for k in range(num_sites))

