"""Calibration check of a trained estimator on the user's own model: `hierdsl check`.

    hierdsl check model.hsbi --estimator model.hsbe [--data data.csv] [-o check/]

Input: a trained `Estimator` (and optionally the observed data). The check simulates fresh data
sets from the model's prior, draws posterior samples for each from the estimator, and tests:

- **SBC** (Talts et al. 2018): the rank of every true parameter element among its posterior draws
  is uniform for a calibrated estimator; a chi-square test per element, Bonferroni-combined per
  group. The groups are the globals (every global element) and the locals (each local element,
  pooled over the sites of all simulations, since sites are exchangeable).
- **Expected coverage** at the 50% and 90% central credible levels, against a binomial tolerance
  band: coverage below it flags an over-confident estimator (a FAIL), above it an under-confident
  (conservative) one (a note).
- **l-C2ST** (Linhart et al. 2023), with data only: a local test of the joint posterior at the
  observed data, from the same simulations (one posterior draw per simulated set).

Output: a `CheckReport` — printed as a table by the CLI — and, in the output folder, rank
histograms (`ranks_globals.png`, `ranks_locals.png`), `coverage.png` and `check.json`.

The pure-NumPy verdict (`assess_group`) is separate from the simulation so that it can be tested
on synthetic draws.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from hierdsl.compiler.errors import HsbiError, error

LEVEL = 0.05
"""Family-wise significance level of every verdict."""

CHECKED_LEVELS = (0.5, 0.9)
"""Credibility levels whose coverage decides the over-/under-confidence flags."""

DEFAULT_SIMS = 200
DEFAULT_SAMPLES = 100


# ----------------------------------------------------------------------------- the verdict (NumPy)


def exact_coverage(level: float, num_posterior_samples: int) -> float:
    """The expected coverage of a calibrated estimator at `level` with L posterior samples.

    `metrics.expected_coverage` counts a truth inside when its mid-rank (r + ½) / (L + 1) lies
    within level / 2 of ½; with r uniform on {0, …, L} that happens with this probability (α up
    to 1 / (L + 1))."""
    ranks = np.arange(num_posterior_samples + 1)
    mid = (ranks + 0.5) / (num_posterior_samples + 1)
    return float(np.mean(np.abs(mid - 0.5) <= level / 2))


def coverage_band(level: float, num_posterior_samples: int, num_independent: int,
                  alpha: float) -> tuple[float, float]:
    """The central (1 − alpha) binomial tolerance interval of a calibrated estimator's coverage:
    the count inside is Binomial(num_independent, exact_coverage(level, L))."""
    from scipy import stats

    p = exact_coverage(level, num_posterior_samples)
    n = int(num_independent)
    if p >= 1.0:
        return 1.0, 1.0
    lo = stats.binom.ppf(alpha / 2, n, p) / n
    hi = stats.binom.ppf(1 - alpha / 2, n, p) / n
    return float(lo), float(hi)


@dataclass
class GroupCheck:
    """SBC and coverage of one parameter group ("globals" or "locals"), element by element.

    - `labels`: the elements, e.g. `sigma`, `theta[2]` (locals pooled over sites carry no site).
    - `ranks`: the SBC ranks, `(num_truths, dim)`, among `num_posterior_samples` draws.
    - `p_values`: the chi-square uniformity p-value per element; `combined_p_value` their
      Bonferroni combination; `sbc_passed` whether it is at least `level`.
    - `levels`, `coverage`: expected coverage `(num_levels, dim)` at each credibility level.
    - `bands`: per checked level, the binomial tolerance interval of a calibrated estimator's
      coverage (Bonferroni over elements and checked levels), from `num_independent` truths.
    - `over_confident`, `under_confident`: the elements whose coverage falls below / above a band.
    - `verdict`: "PASS", or "FAIL" when SBC rejects or an element is over-confident; `reasons`
      says why; `worst` is the element with the smallest SBC p-value.
    """

    name: str
    labels: list[str]
    ranks: np.ndarray
    num_posterior_samples: int
    num_independent: int
    num_bins: int
    p_values: np.ndarray
    combined_p_value: float
    sbc_passed: bool
    levels: np.ndarray
    coverage: np.ndarray
    bands: dict[float, tuple[float, float]]
    over_confident: list[str]
    under_confident: list[str]
    verdict: str
    reasons: list[str]
    worst: str
    level: float = LEVEL

    def coverage_at(self, level: float) -> np.ndarray:
        """Coverage of every element at one of `levels`."""
        index = int(np.argmin(np.abs(self.levels - level)))
        return self.coverage[index]

    def to_json(self) -> dict:
        return {
            "verdict": self.verdict, "reasons": self.reasons, "worst": self.worst,
            "level": self.level, "labels": self.labels,
            "num_truths": int(self.ranks.shape[0]), "num_independent": self.num_independent,
            "num_posterior_samples": self.num_posterior_samples, "num_bins": self.num_bins,
            "sbc": {"combined_p_value": self.combined_p_value, "passed": self.sbc_passed,
                    "p_values": dict(zip(self.labels, map(float, self.p_values)))},
            "coverage": {
                "levels": [float(x) for x in self.levels],
                "by_parameter": {label: [float(c) for c in self.coverage[:, j]] for j, label in enumerate(self.labels)},
                "checked": {f"{lv:g}": {"band": list(self.bands[lv]),
                                        "expected": exact_coverage(lv, self.num_posterior_samples),
                                        "by_parameter": dict(zip(self.labels, map(float, self.coverage_at(lv))))}
                            for lv in self.bands},
                "over_confident": self.over_confident, "under_confident": self.under_confident,
            },
            "ranks": {label: self.ranks[:, j].tolist() for j, label in enumerate(self.labels)},
        }


def assess_group(name: str, labels: Sequence[str], truths, samples, *, num_independent: Optional[int] = None,
                 level: float = LEVEL, checked_levels: Sequence[float] = CHECKED_LEVELS) -> GroupCheck:
    """The verdict of one parameter group from true values and posterior draws (pure NumPy).

    Arguments:
        name: the group's name ("globals", "locals").
        labels: one label per element (column).
        truths: `(num_truths, dim)` true values.
        samples: `(num_truths, L, dim)` posterior draws for each truth.
        num_independent: how many of the truths are independent (default all). Locals pooled over
            the sites of one simulation share its globals, so they are not independent: pass the
            number of simulations, with the rows in that many consecutive groups of equal size (one
            per simulation, as `check` builds them). The SBC test is then the cluster-robust
            `metrics.sbc_uniformity_clustered` (the pooled Pearson test rejects exact posteriors of
            hierarchical models far too often), and the coverage tolerance is widened to be safe.
        level: the family-wise level of the SBC verdict and of the coverage bands.
        checked_levels: the credibility levels whose coverage is compared with the band.
    """
    from hierdsl.runtime import metrics

    truths = np.asarray(truths, np.float64)
    samples = np.asarray(samples, np.float64)
    if truths.ndim == 1:
        truths = truths[:, None]
    if samples.ndim == 2:
        samples = samples[..., None]
    labels = list(labels)
    if truths.shape[1] != len(labels):
        raise ValueError(f"{len(labels)} labels for {truths.shape[1]} parameter elements")
    num_truths, num_posterior = samples.shape[0], samples.shape[1]
    num_independent = int(num_independent or num_truths)
    if not 1 <= num_independent <= num_truths or num_truths % num_independent:
        raise ValueError(f"{num_truths} truths cannot form {num_independent} groups of equal size")
    # Bins: about 20 expected per bin among the independent units (see `metrics.sbc_uniformity`).
    num_bins = min(num_posterior + 1, max(2, num_independent // 20))
    ranks = metrics.sbc_ranks(truths, samples)
    if num_independent < num_truths:
        clustered = ranks.reshape(num_independent, num_truths // num_independent, -1)
        p_values = metrics.sbc_uniformity_clustered(clustered, num_posterior, num_bins=num_bins)
    else:
        p_values = metrics.sbc_uniformity(ranks, num_posterior, num_bins=num_bins)
    p_values = np.asarray(p_values, np.float64)
    combined = metrics.bonferroni(p_values)
    levels = np.unique(np.concatenate([np.asarray(metrics.COVERAGE_LEVELS), np.asarray(checked_levels)]))
    coverage = np.asarray(metrics.expected_coverage(truths, samples, levels))
    # Bonferroni over elements and checked levels, so that a calibrated estimator is flagged
    # (either way) with probability at most `level`.
    alpha = level / (len(labels) * len(checked_levels))
    bands = {float(lv): coverage_band(lv, num_posterior, num_independent, alpha) for lv in checked_levels}
    over, under = [], []
    for j, label in enumerate(labels):
        at = {lv: coverage[int(np.argmin(np.abs(levels - lv))), j] for lv in bands}
        if any(at[lv] < bands[lv][0] for lv in bands):
            over.append(label)
        elif any(at[lv] > bands[lv][1] for lv in bands):
            under.append(label)
    reasons = []
    if combined < level:
        reasons.append(f"SBC ranks not uniform (Bonferroni p = {combined:.3g} < {level:g})")
    if over:
        reasons.append("over-confident: coverage below the tolerance band for " + ", ".join(over))
    if under:
        reasons.append("under-confident (conservative) for " + ", ".join(under))
    verdict = "FAIL" if combined < level or over else "PASS"
    worst = labels[int(np.argmin(p_values))]
    return GroupCheck(name, labels, ranks, num_posterior, num_independent, num_bins, p_values, combined,
                      combined >= level, levels, coverage, bands, over, under, verdict, reasons, worst, level)


# ----------------------------------------------------------------------------- the report


@dataclass
class LC2STCheck:
    """The l-C2ST of the joint posterior at the observed data."""

    statistic: float
    p_value: float
    num_null: int
    num_pairs: int
    theta_dim: int
    x_dim: int
    hidden_width: int
    verdict: str
    level: float = LEVEL

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class CheckReport:
    """What `check` found: per group SBC/coverage verdicts and, with data, the l-C2ST."""

    model: str
    num_sims: int
    num_dropped: int
    num_samples: int
    num_sites: int
    groups: dict[str, GroupCheck]
    lc2st: Optional[LC2STCheck] = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(g.verdict == "PASS" for g in self.groups.values()) and (
            self.lc2st is None or self.lc2st.verdict == "PASS")

    def to_json(self) -> dict:
        return {
            "model": self.model, "num_sims": self.num_sims, "num_dropped_non_finite": self.num_dropped,
            "num_samples": self.num_samples, "num_sites": self.num_sites,
            "verdict": "PASS" if self.passed else "FAIL",
            "groups": {name: g.to_json() for name, g in self.groups.items()},
            "lc2st": None if self.lc2st is None else self.lc2st.to_json(),
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }

    def table(self) -> str:
        """The evidence, one row per group (coverage: the group's lowest element)."""
        header = ["group", "elements", "verdict", "SBC p", "worst (p)", "cov@0.5", "cov@0.9", "0.9 band", "notes"]
        rows = []
        for g in self.groups.values():
            notes = []
            if g.over_confident:
                notes.append("over-confident")
            if g.under_confident:
                notes.append("under-confident")
            if not g.sbc_passed:
                notes.append("ranks not uniform")
            lo, hi = g.bands.get(0.9, (float("nan"), float("nan")))
            rows.append([g.name, str(len(g.labels)), g.verdict, f"{g.combined_p_value:.3g}",
                         f"{g.worst} ({float(np.min(g.p_values)):.3g})",
                         f"{float(np.min(g.coverage_at(0.5))):.3f}", f"{float(np.min(g.coverage_at(0.9))):.3f}",
                         f"{lo:.3f}-{hi:.3f}", ", ".join(notes) or "-"])
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
        lines = [fmt(header), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)]
        if self.lc2st is not None:
            c = self.lc2st
            lines += ["", f"l-C2ST at the data: statistic {c.statistic:.4g}, p = {c.p_value:.3g} "
                          f"({c.num_null} null fits, {c.num_pairs} calibration pairs) -> {c.verdict}"]
        lines += ["", f"overall: {'PASS' if self.passed else 'FAIL'}"]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- the check


def _element_labels(name: str, shape: tuple[int, ...]) -> list[str]:
    if not shape:
        return [name]
    return [f"{name}[{', '.join(str(k + 1) for k in index)}]" for index in np.ndindex(*shape)]


def _flatten_joint(ir, params: Mapping[str, np.ndarray], lead: int) -> np.ndarray:
    """Globals then locals (every site), flattened after `lead` leading axes."""
    parts = [np.asarray(params[v.name]) for v in (*ir.globals, *ir.locals)]
    return np.concatenate([p.reshape(*p.shape[:lead], -1) for p in parts], axis=-1)


def check(estimator, *, key, num_sims: int = DEFAULT_SIMS, num_samples: int = DEFAULT_SAMPLES,
          num_sites: Optional[int] = None, data=None, level: float = LEVEL, progress=None,
          lc2st_null: int = 50, lc2st_width: Optional[int] = None, lc2st_steps: int = 300) -> CheckReport:
    """Check a trained estimator's calibration on its own model, and (with `data`) at the data.

    Arguments:
        estimator: a trained `Estimator` (`hierdsl.fit` or `hierdsl.load`).
        key: a JAX PRNG key.
        num_sims: fresh data sets simulated from the prior.
        num_samples: posterior draws per data set (and at the observed data).
        num_sites: sites per simulated data set; default the data's site count, else the
            estimator's `max_sites`. With data it must equal the data's count.
        data: observed data (a `Dataset` or `{name: array with a site axis}`): adds the l-C2ST.
        level: the family-wise level of every verdict.
        progress: the CLI's `Progress` (or None).
        lc2st_null, lc2st_width, lc2st_steps: l-C2ST permutation fits, hidden units (default
            `min(128, 10 · (θ dim + x dim))`) and Adam steps.

    Returns: a `CheckReport`. Raises `HsbiError` for unusable settings or data.
    """
    import jax.random as jr

    from hierdsl.data import data_variables
    from hierdsl.runtime import lf

    started = time.perf_counter()
    seconds: dict[str, float] = {}
    ir = estimator.model.ir
    if num_sims < 10:
        raise HsbiError([error(f"the check needs at least 10 simulations, got {num_sims}")])
    if num_samples < 5:
        raise HsbiError([error(f"the check needs at least 5 posterior draws per data set, got {num_samples}")])
    observed = None
    if data is not None:
        observed = estimator.condition(data)  # checks the data against the estimator (site count, variables)
        if num_sites is None:
            num_sites = observed.num_sites
        elif num_sites != observed.num_sites:
            raise HsbiError([error(
                f"the data have {observed.num_sites} sites but {num_sites} were asked for",
                label="the l-C2ST compares simulations with the data, so they need the same number of sites "
                      "(leave out --sites)")])
    num_sites = int(num_sites or estimator.max_sites)
    if num_sites < 1:
        raise HsbiError([error(f"the number of sites must be at least 1, got {num_sites}")])
    if num_sites > estimator.max_sites:
        raise HsbiError([error(
            f"{num_sites} sites asked for, but the estimator serves at most {estimator.max_sites}",
            label=f"train one for more sites (`--max-sites {num_sites}`, Python `max_sites={num_sites}`)")])
    if not (ir.globals or ir.locals):
        raise HsbiError([error(f"model `{ir.name}` has no parameters to check")])

    k_sim, k_post, k_data, k_lc2st = jr.split(key, 4)
    if progress is not None:
        progress.message(f"simulating {num_sims} data sets of {num_sites} site{'s' if num_sites != 1 else ''}")
    t0 = time.perf_counter()
    simulate = lf.full_simulator(estimator.lowered, num_sites)
    sims = {name: np.asarray(value) for name, value in simulate(jr.split(k_sim, num_sims)).items()}
    # Every per-site input goes to the posterior (fixed designs too, so they are not recomputed).
    conditioned = [v.name for v in ir.variables if v.role in ("observation", "input")]
    data_names = [v.name for v in data_variables(ir)]
    finite = np.ones(num_sims, bool)
    for name in (*conditioned, *(v.name for v in (*ir.globals, *ir.locals))):
        finite &= np.all(np.isfinite(sims[name].reshape(num_sims, -1)), axis=1)
    kept = np.flatnonzero(finite)
    if kept.size < 10:
        raise HsbiError([error(
            f"only {kept.size} of {num_sims} simulated data sets are finite; the check needs at least 10",
            label="the simulator produces NaN or infinite values for most prior draws")])
    sims = {name: value[kept] for name, value in sims.items()}
    num_kept = int(kept.size)
    seconds["simulate"] = time.perf_counter() - t0

    # Posterior draws for every simulated set: one compiled sampler (the estimator's own, shared
    # with the draws at the data), reused for every set since all are padded to max_sites.
    t0 = time.perf_counter()
    update = progress.bar("sampling", num_kept) if progress is not None else None
    keys = jr.split(k_post, num_kept)
    draws: dict[str, list] = {v.name: [] for v in (*ir.globals, *ir.locals)}
    for i in range(num_kept):
        post = estimator.condition({name: sims[name][i] for name in conditioned})
        sample = post.sample(num_samples, key=keys[i])
        for name in draws:
            draws[name].append(sample[name])
        if update is not None and ((i + 1) % 10 == 0 or i + 1 == num_kept):
            update(i + 1, num_kept)
    if progress is not None:
        progress.end_line()
    draws = {name: np.stack(values) for name, values in draws.items()}  # (sims, L, ...) / (sims, L, sites, ...)
    if not all(np.all(np.isfinite(v)) for v in draws.values()):
        raise HsbiError([error("the posterior sampler produced non-finite values",
                               label="the estimator may be undertrained (retrain with a larger --budget)")])
    seconds["sample"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    groups: dict[str, GroupCheck] = {}
    if ir.globals:
        labels = [label for v in ir.globals for label in _element_labels(v.name, v.shape)]
        truths = np.concatenate([sims[v.name].reshape(num_kept, -1) for v in ir.globals], axis=1)
        samples = np.concatenate([draws[v.name].reshape(num_kept, num_samples, -1) for v in ir.globals], axis=2)
        groups["globals"] = assess_group("globals", labels, truths, samples, num_independent=num_kept, level=level)
    if ir.locals:
        labels = [label for v in ir.locals for label in _element_labels(v.name, v.shape)]
        # Sites are exchangeable: pool them, one truth per (simulation, site).
        truths = np.concatenate([sims[v.name].reshape(num_kept * num_sites, -1) for v in ir.locals], axis=1)
        samples = np.concatenate([
            np.moveaxis(draws[v.name].reshape(num_kept, num_samples, num_sites, -1), 2, 1)
            .reshape(num_kept * num_sites, num_samples, -1) for v in ir.locals], axis=2)
        groups["locals"] = assess_group("locals", labels, truths, samples, num_independent=num_kept, level=level)
    seconds["sbc"] = time.perf_counter() - t0

    lc2st_check = None
    if observed is not None:
        from hierdsl.runtime import metrics

        t0 = time.perf_counter()
        if progress is not None:
            progress.message(f"l-C2ST at the data: training {lc2st_null + 1} classifiers on {num_kept} pairs")
        theta_joint = _flatten_joint(ir, sims, 1)
        theta_q = _flatten_joint(ir, {name: value[:, 0] for name, value in draws.items()}, 1)
        x_joint = np.concatenate([sims[name].reshape(num_kept, -1) for name in data_names], axis=1)
        at_data = observed.sample(num_samples, key=k_data)
        theta_x0 = _flatten_joint(ir, at_data, 1)
        x0 = np.concatenate([np.asarray(observed.data.values[name], np.float64).reshape(-1) for name in data_names])
        if not np.all(np.isfinite(theta_x0)):
            raise HsbiError([error("the posterior sampler produced non-finite values at the data",
                                   label="the estimator may be undertrained (retrain with a larger --budget)")])
        width = int(lc2st_width or min(128, 10 * (theta_joint.shape[1] + x_joint.shape[1])))
        classifiers = metrics.fit_lc2st(theta_joint, x_joint, theta_q, k_lc2st, num_null=lc2st_null,
                                        hidden_width=width, num_steps=lc2st_steps)
        result = classifiers.test(theta_x0, x0)
        lc2st_check = LC2STCheck(result.statistic, result.p_value, lc2st_null, num_kept, int(theta_joint.shape[1]),
                                 int(x_joint.shape[1]), width, "PASS" if result.p_value >= level else "FAIL", level)
        seconds["lc2st"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - started
    return CheckReport(ir.name, num_kept, num_sims - num_kept, num_samples, num_sites, groups, lc2st_check, seconds)


# ----------------------------------------------------------------------------- plots and files


def _save_png(fig, path: str) -> None:
    """Render to a temporary file in the same folder, then rename: readers never see half a PNG."""
    from hierdsl.files import atomic_write

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write(path, buffer.getvalue())


MAX_PANELS = 16


def _plot_ranks(group: GroupCheck, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import stats

    order = np.argsort(group.p_values)[:MAX_PANELS]  # the worst elements first
    cols = min(4, len(order))
    rows = -(-len(order) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    n, num_values, bins = group.ranks.shape[0], group.num_posterior_samples + 1, group.num_bins
    probabilities = np.bincount(np.arange(num_values) * bins // num_values, minlength=bins) / num_values
    clusters = group.num_independent
    for ax, j in zip(axes.ravel(), order):
        counts = np.bincount(group.ranks[:, j] * bins // num_values, minlength=bins)
        if clusters < n:
            # Ranks of one simulation's sites are correlated: the band's spread comes from the
            # simulations' own bin counts (as in the cluster-robust test), not a binomial.
            per_cluster = (group.ranks[:, j].reshape(clusters, -1, 1) * bins // num_values == np.arange(bins)).sum(1)
            spread = np.sqrt(np.sum((per_cluster - (n // clusters) * probabilities) ** 2, axis=0))
            lo, hi = n * probabilities - 2.576 * spread, n * probabilities + 2.576 * spread
        else:
            lo, hi = stats.binom.ppf(0.005, n, probabilities), stats.binom.ppf(0.995, n, probabilities)
        x = np.arange(bins)
        ax.fill_between(np.concatenate([[x[0] - 0.5], x + 0.5]), np.concatenate([[lo[0]], lo]),
                        np.concatenate([[hi[0]], hi]), step="pre", color="0.85", label="99% uniform band")
        ax.bar(x, counts, width=1.0, color="C0", alpha=0.8, edgecolor="white")
        ax.step(np.concatenate([[x[0] - 0.5], x + 0.5]), np.concatenate([[n * probabilities[0]], n * probabilities]),
                where="pre", color="0.4", lw=1)
        ax.set_title(f"{group.labels[j]}  (p = {group.p_values[j]:.2g})", fontsize=9)
        ax.set_xticks([])
        ax.set_xlabel(f"rank among {group.num_posterior_samples} draws ({bins} bins)", fontsize=8)
    for ax in axes.ravel()[len(order):]:
        ax.axis("off")
    axes[0, 0].legend(fontsize=7, loc="best", framealpha=0.9)
    shown = "" if len(order) == len(group.labels) else f", the {len(order)} lowest p-values of {len(group.labels)}"
    fig.suptitle(f"SBC rank histograms, {group.name}: {group.verdict}{shown}", fontsize=10)
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)


def _plot_coverage(groups: Mapping[str, GroupCheck], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 4), squeeze=False)
    for ax, g in zip(axes[0], groups.values()):
        grid = g.levels
        alpha = g.level / (len(g.labels) * len(g.bands))
        band = np.array([coverage_band(a, g.num_posterior_samples, g.num_independent, alpha) for a in grid])
        ax.fill_between(grid, band[:, 0], band[:, 1], color="0.88", label="calibrated (tolerance band)")
        ax.plot([0, 1], [0, 1], color="0.3", lw=1, ls="--")
        order = np.argsort(g.p_values)[:8]
        for j in order:
            ax.plot(g.levels, g.coverage[:, j], marker=".", lw=1.2, label=g.labels[j])
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.set_xlabel("credibility level")
        ax.set_ylabel("expected coverage")
        ax.set_title(f"{g.name}: {g.verdict}", fontsize=10)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("below the diagonal: over-confident; above: under-confident", fontsize=9)
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)


def write_outputs(report: CheckReport, folder: str, extra: Optional[Mapping[str, Any]] = None) -> list[str]:
    """Rank histograms, the coverage plot and `check.json` in `folder`, each atomically."""
    from hierdsl.files import atomic_write

    os.makedirs(folder, exist_ok=True)
    written = []
    for name, group in report.groups.items():
        path = os.path.join(folder, f"ranks_{name}.png")
        _plot_ranks(group, path)
        written.append(path)
    if report.groups:
        path = os.path.join(folder, "coverage.png")
        _plot_coverage(report.groups, path)
        written.append(path)
    path = os.path.join(folder, "check.json")
    body = {**report.to_json(), **dict(extra or {}), "outputs": [os.path.basename(p) for p in written] + ["check.json"]}
    atomic_write(path, json.dumps(body, indent=1, sort_keys=True) + "\n")
    written.append(path)
    return written


# ----------------------------------------------------------------------------- the CLI


def cmd_check(ns: argparse.Namespace) -> int:
    from hierdsl.checkpoint import load
    from hierdsl.cli import UserError, _compile_for_run, _key
    from hierdsl.data import read_data
    from hierdsl.progress import Progress

    if ns.sims < 10:
        raise UserError("--sims must be at least 10")
    if ns.samples < 5:
        raise UserError("--samples must be at least 5")
    if ns.sites is not None and ns.sites < 1:
        raise UserError("--sites must be at least 1")
    model = _compile_for_run(ns)
    estimator = load(ns.estimator, model)
    data = read_data(ns.data, model.ir) if ns.data else None
    if data is not None and ns.sites is not None and ns.sites != data.num_sites:
        raise UserError(f"--sites {ns.sites} differs from the {data.num_sites} sites of {ns.data}; the l-C2ST "
                        "compares simulations with the data, so leave out --sites")
    progress = Progress(quiet=ns.quiet)
    progress.message(f"checking the estimator in {ns.estimator} (up to {estimator.max_sites} sites)")
    report = check(estimator, key=_key(ns.seed), num_sims=ns.sims, num_samples=ns.samples, num_sites=ns.sites,
                   data=data, progress=progress)
    extra = {"model_file": ns.file, "estimator": ns.estimator, "data": ns.data, "seed": ns.seed}
    written = write_outputs(report, ns.output, extra)
    dropped = f" ({report.num_dropped} non-finite dropped)" if report.num_dropped else ""
    print(f"check of {report.model}: {report.num_sims} simulated data sets{dropped} of {report.num_sites} "
          f"site{'s' if report.num_sites != 1 else ''}, {report.num_samples} posterior draws each; "
          f"verdicts at level {LEVEL:g}\n")
    print(report.table())
    for g in report.groups.values():
        for reason in g.reasons:
            print(f"  {g.name}: {reason}")
    progress.message(f"\nwrote {', '.join(os.path.basename(p) for p in written)} to {ns.output}")
    return 1 if ns.strict and not report.passed else 0


def add_parser(sub) -> argparse.ArgumentParser:
    """Register `check` on an argparse subparsers object (as `hierdsl.cli.build_parser` does)."""
    from hierdsl.cli import _add_run_options

    p = sub.add_parser("check", help="check a trained estimator's calibration (SBC, coverage; l-C2ST at data)")
    p.add_argument("file", help="the .hsbi file the estimator was trained on")
    p.add_argument("--estimator", required=True, help="the trained .hsbe estimator to check")
    p.add_argument("--data", help="observed data (CSV or JSON): adds an l-C2ST at these data")
    p.add_argument("--sims", type=int, default=DEFAULT_SIMS,
                   help=f"data sets simulated from the prior (default {DEFAULT_SIMS})")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                   help=f"posterior draws per data set (default {DEFAULT_SAMPLES})")
    p.add_argument("--sites", type=int, default=None,
                   help="sites per simulated data set (default: the data's, else the estimator's maximum)")
    p.add_argument("-o", "--output", default="check", help="output folder (default ./check)")
    p.add_argument("--quiet", action="store_true", help="no progress output (the verdict table is still printed)")
    p.add_argument("--strict", action="store_true",
                   help="exit with status 1 when the overall verdict is FAIL (for scripts and CI); default 0")
    _add_run_options(p)
    p.set_defaults(run=cmd_check)
    return p
