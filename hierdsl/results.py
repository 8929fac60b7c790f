"""Posterior results a scientist can use: summary table, ArviZ netCDF, plots, run manifest.

Input: posterior samples keyed by IR name (globals `(draws, *shape)`, per-site variables
`(draws, sites, *shape)`), the observed `Dataset` and the model IR. Output: files in a run folder,
each written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
import warnings
from typing import Mapping, Optional, Sequence

import numpy as np

from hierdsl.compiler.ir import ModelIR
from hierdsl.data import Dataset
from hierdsl.files import atomic_write

QUANTILES = (0.05, 0.5, 0.95)


def _element_names(name: str, shape: tuple[int, ...], site: Optional[str] = None) -> list[tuple[str, tuple]]:
    out = []
    for index in np.ndindex(*shape) if shape else [()]:
        parts = ([site] if site is not None else []) + [str(k + 1) for k in index]
        out.append((f"{name}[{', '.join(parts)}]" if parts else name, index))
    return out


def summary_rows(samples: Mapping[str, np.ndarray], ir: ModelIR, sites: Sequence[str]) -> list[dict]:
    """Mean, sd and 5/50/95% quantiles for every global and every site's locals, element by element."""
    rows = []

    def add(label: str, draws: np.ndarray) -> None:
        q = np.quantile(draws, QUANTILES)
        rows.append({"parameter": label, "mean": float(np.mean(draws)), "sd": float(np.std(draws, ddof=1)),
                     "q5": float(q[0]), "q50": float(q[1]), "q95": float(q[2])})

    for v in ir.globals:
        values = np.asarray(samples[v.name])
        for label, index in _element_names(v.name, v.shape):
            add(label, values[(slice(None), *index)])
    for v in ir.locals:
        values = np.asarray(samples[v.name])
        for s, site in enumerate(sites):
            for label, index in _element_names(v.name, v.shape, site):
                add(label, values[(slice(None), s, *index)])
    return rows


def format_summary(rows: list[dict]) -> str:
    header = ["parameter", "mean", "sd", "q5", "q50", "q95"]
    cells = [[r["parameter"]] + [f"{r[h]:.4g}" for h in header[1:]] for r in rows]
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(len(header))]
    fmt = lambda c: "  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(c, widths)))
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *(fmt(c) for c in cells)])


def summary_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["parameter", "mean", "sd", "q5", "q50", "q95"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _dims(ir: ModelIR, name: str) -> list[str]:
    v = ir.variable(name)
    site = [ir.site_index] if v.per_site else []
    return site + [f"{name}_dim_{k}" for k in range(len(v.shape))]


def inference_data(samples: Mapping[str, np.ndarray], data: Dataset, ir: ModelIR):
    """An ArviZ InferenceData with `posterior` and `observed_data`; the site axis is named after
    the model's site index and carries the data's site labels."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz as az

    posterior = {v.name: np.asarray(samples[v.name])[None] for v in (*ir.globals, *ir.locals)}
    observed = {name: np.asarray(values) for name, values in data.values.items()}
    dims = {name: _dims(ir, name) for name in (*posterior, *observed)}
    coords = {ir.site_index: list(data.sites)}
    return az.from_dict(posterior=posterior, observed_data=observed, dims=dims, coords=coords)


def write_netcdf(path: str, idata) -> None:
    """Write an InferenceData atomically (netCDF4 through h5netcdf)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".nc")
    os.close(fd)
    try:
        idata.to_netcdf(tmp, engine="h5netcdf")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _save_figure(fig, path: str) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write(path, buffer.getvalue())


def write_plots(folder: str, idata, ir: ModelIR, history: Mapping[str, Mapping[str, Sequence[float]]]) -> list[str]:
    """Pair plot of the globals, forest plot of the site parameters, training-loss curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import arviz as az

        written = []
        global_names = [v.name for v in ir.globals]
        if sum(v.size for v in ir.globals) >= 2:
            axes = az.plot_pair(idata, var_names=global_names, kind="kde", marginals=True)
            fig = np.atleast_1d(axes).ravel()[0].figure
        else:
            axes = az.plot_posterior(idata, var_names=global_names)
            fig = np.atleast_1d(axes).ravel()[0].figure
        path = os.path.join(folder, "globals_pair.png")
        _save_figure(fig, path)
        plt.close(fig)
        written.append(path)

        if ir.locals:
            axes = az.plot_forest(idata, var_names=[v.name for v in ir.locals], combined=True, hdi_prob=0.9)
            fig = np.atleast_1d(axes).ravel()[0].figure
            path = os.path.join(folder, "locals_forest.png")
            _save_figure(fig, path)
            plt.close(fig)
            written.append(path)

    if history:
        fig, axes = plt.subplots(1, len(history), figsize=(5 * len(history), 3.5), squeeze=False)
        for ax, (stage, curves) in zip(axes[0], history.items()):
            for label, values in curves.items():
                if len(values):
                    ax.plot(np.arange(1, len(values) + 1), values, label=label)
            ax.set_title(stage)
            ax.set_xlabel("epoch")
            ax.set_ylabel("flow-matching loss")
            ax.legend()
        path = os.path.join(folder, "training_loss.png")
        _save_figure(fig, path)
        plt.close(fig)
        written.append(path)
    return written


def write_manifest(path: str, manifest: Mapping) -> None:
    atomic_write(path, json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
