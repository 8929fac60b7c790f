"""`hierdsl bench`: the benchmark protocol of `benchmark.md`, run against reference posteriors.

    hierdsl bench --quick                       # one task, tiny budget: a few minutes on a CPU
    hierdsl bench --tasks gaussian_linear,two_moons,sir --budgets 1000,5000 --sites 50 -o bench/

For every task, site count, method and budget: simulate the observations from the prior (fixed
seeds), sample each observation's reference posterior (exact, grid or NUTS — see `REFERENCES`),
train one estimator (amortised: it serves all observations; LF with rounds trains one per
observation), then score its posterior draws at each observation:

- C2ST against the reference on the full joint and on the globals (sbibm protocol);
- l-C2ST (reference-free; classifiers trained once per estimator on prior simulations);
- simulator calls and wall time of each stage;

and, once per amortised estimator, its calibration: SBC ranks and expected coverage over
`sbc_sims` prior simulations (`hierdsl check`'s verdict per parameter group), in
`OUT/calibration.jsonl`.

Everything expensive is cached in `OUT/cache/` (observations, references, estimators; made from the
task files recorded in `OUT/cache/sources.json`, and refused for any other), and every
scored row is appended to `OUT/results.jsonl` as soon as it exists, so an interrupted run resumes
where it stopped. `OUT/results.md` holds the table (mean and bootstrap 95% interval of the mean over
the observations, then the calibration table) and `OUT/<task>.png` the plots (C2ST against budget, and against the site count
when several are run).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from hierdsl.compiler.errors import HsbiError
from hierdsl.diagnose import exact_coverage
from hierdsl.files import atomic_write

# The task models ship inside the package (`hierdsl.examples`, the repository's examples/), so a
# non-editable install finds them too.
EXAMPLES = str(importlib.resources.files("hierdsl.examples"))


# ----------------------------------------------------------------------------- tasks and references


def _exact_gaussian_linear(uniform: bool) -> Callable:
    def sample(model, data: Mapping[str, np.ndarray], num: int, seed: int) -> tuple[dict, dict]:
        from hierdsl.reference import sample_gaussian_linear

        return sample_gaussian_linear(np.asarray(data["x"]), num, seed=seed, uniform=uniform), {"kind": "exact"}
    return sample


def _two_moons(model, data, num, seed):
    from hierdsl.reference import sample_two_moons

    return sample_two_moons(np.asarray(data["x"]), num, seed=seed), {"kind": "quadrature + NUTS"}


def _sir(model, data, num, seed):
    from hierdsl.reference import sample_sir

    return sample_sir(np.asarray(data["y"]), num, seed=seed), {"kind": "grid"}


def _nuts(model, data, num, seed):
    import jax

    from hierdsl.nuts import reference_posterior

    ref = reference_posterior(model, data, num_samples=num, key=jax.random.key(seed))
    return ref.samples, {"kind": "NUTS", "trusted": bool(ref.trusted), "max_r_hat": ref.max_r_hat,
                         "min_ess": ref.min_ess}


@dataclass(frozen=True)
class Task:
    name: str
    file: str
    reference: Callable  # (model, data, num, seed) -> (samples by name, info)


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("gaussian_linear", "gaussian_linear.hsbi", _exact_gaussian_linear(False)),
    Task("gaussian_linear_uniform", "gaussian_linear_uniform.hsbi", _exact_gaussian_linear(True)),
    Task("gaussian_mixture", "gaussian_mixture.hsbi", _nuts),
    Task("two_moons", "two_moons.hsbi", _two_moons),
    Task("slcp", "slcp.hsbi", _nuts),
    Task("sir", "sir.hsbi", _sir),
)}
METHODS = ("lf", "lf-rounds", "direct")


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """One benchmark run. The defaults are the protocol's main sweep (library training defaults)."""

    tasks: tuple[str, ...] = ("gaussian_linear", "two_moons", "sir")
    methods: tuple[str, ...] = ("lf", "lf-rounds", "direct")
    budgets: tuple[int, ...] = (1000, 5000, 10000)
    sites: tuple[int, ...] = (50,)
    observations: int = 10
    posterior_samples: int = 1000
    reference_samples: int = 1000
    rounds: int = 2
    epochs: Optional[int] = None  # the posterior network's epochs; None: the library default
    surrogate_epochs: Optional[int] = None  # most epochs of the LF surrogate; None: the library default
    width: int = 64
    depth: int = 2
    num_synthetic: Optional[int] = None  # LF's synthetic data sets; None: the library default
    batch_size: Optional[int] = None  # the posterior network's batch; None: the library default
    precondition: Optional[str] = None  # LF's surrogate preconditioning, "network", "linear" or "off"; None: the library default
    posterior_precondition: bool = False  # the posterior network's preconditioning of the locals (lf and direct)
    globals_precondition: bool = False  # the posterior network's preconditioning of the globals (lf and direct)
    c2st_steps: int = 1000
    c2st_width: int = 256  # cap on the classifiers' hidden width (sbibm: 10 · dim)
    lc2st_pairs: int = 1000
    lc2st_null: int = 20
    lc2st_width: int = 64
    sbc_sims: int = 200  # calibration of each amortised estimator: prior simulations (0: skip)
    sbc_samples: int = 100  # posterior draws per simulation (SBC ranks, expected coverage)
    seed: int = 0

    def training_key(self) -> dict:
        # Every training setting, library defaults included, so a changed default retrains; except
        # that the posterior's preconditionings, while off, are left out, as are the settings that
        # only they read, so that folders from before they existed still match.
        key = {m: dataclasses.asdict(strategy(self, m)) for m in ("lf", "direct")}
        for method, fields in (("lf", ("posterior_precondition",)), ("direct", ("posterior_precondition", "preconditioner"))):
            if not key[method]["posterior_precondition"]:
                for field in fields:
                    del key[method][field]
        for method in ("lf", "direct"):
            if not key[method]["globals_precondition"]:
                del key[method]["globals_precondition"], key[method]["globals_preconditioner"]
        return key


# A 2-core CPU: shorter training, smaller classifiers (documented with the results).
CPU = Settings(methods=("lf", "direct"), budgets=(1000, 5000), posterior_samples=500, reference_samples=500, epochs=10, batch_size=64, num_synthetic=1000, c2st_steps=300,
               c2st_width=64, lc2st_pairs=300, lc2st_null=20, lc2st_width=64, sbc_sims=100, sbc_samples=10)
QUICK = Settings(tasks=("gaussian_linear",), methods=("lf", "direct"), budgets=(200,), sites=(5,), observations=2,
                 posterior_samples=200, reference_samples=200, epochs=3, surrogate_epochs=5, width=32, depth=1,
                 num_synthetic=200,
                 c2st_steps=200, c2st_width=64, lc2st_pairs=100, lc2st_null=10, lc2st_width=32,
                 sbc_sims=20, sbc_samples=10)
PRESETS = {"protocol": Settings(), "cpu": CPU, "quick": QUICK}


# The `lf.LF` settings its simulation and surrogate stages depend on (the rest shape the posterior).
SINGLE_SITE_SETTINGS = ("surrogate", "surrogate_training", "surrogates", "precondition", "preconditioner")


def strategy(settings: Settings, method: str):
    from hierdsl.runtime import lf

    net = lf.NetworkConfig(width=settings.width, depth=settings.depth)
    surrogate_training, posterior_training = lf.TrainConfig(), lf.POSTERIOR_TRAINING
    if settings.surrogate_epochs:
        surrogate_training = surrogate_training.with_max_epochs(settings.surrogate_epochs)
    if settings.epochs:
        posterior_training = posterior_training.with_max_epochs(settings.epochs)
    if settings.batch_size:
        posterior_training = dataclasses.replace(posterior_training, batch_size=settings.batch_size)
    if method == "direct":
        return lf.Direct(posterior=net, posterior_training=posterior_training,
                         posterior_precondition=settings.posterior_precondition,
                         globals_precondition=settings.globals_precondition)
    extra = {} if settings.precondition is None else {
        "precondition": None if settings.precondition == "off" else settings.precondition}
    return lf.LF(surrogate=net, posterior=net, surrogate_training=surrogate_training,
                 posterior_training=posterior_training, num_synthetic=settings.num_synthetic,
                 posterior_precondition=settings.posterior_precondition,
                 globals_precondition=settings.globals_precondition, **extra)


# ----------------------------------------------------------------------------- caching


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _save_npz(path: str, arrays: Mapping[str, np.ndarray]) -> None:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
    atomic_write(path, buffer.getvalue())


def _load_npz(path: str) -> Optional[dict[str, np.ndarray]]:
    if not os.path.exists(path):
        return None
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


class Bench:
    """One benchmark run writing into `out`; `log` receives progress lines."""

    def __init__(self, settings: Settings, out: str, log: Callable[[str], None] = lambda s: None):
        unknown = [t for t in settings.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
        bad = [m for m in settings.methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(METHODS)}")
        self.settings = settings
        self.out = out
        self.cache = os.path.join(out, "cache")
        os.makedirs(self.cache, exist_ok=True)
        self.log = log
        self.results_path = os.path.join(out, "results.jsonl")
        self.calibration_path = os.path.join(out, "calibration.jsonl")

    # -- rows ------------------------------------------------------------------
    def rows(self) -> list[dict]:
        return _read_jsonl(self.results_path)

    def calibrations(self) -> list[dict]:
        """Every calibration record in the output folder (one per amortised estimator)."""
        return _read_jsonl(self.calibration_path)

    def _append(self, row: dict, path: Optional[str] = None) -> None:
        # One complete line per row, appended and flushed: a crash loses at most the row in flight.
        with open(path or self.results_path, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _row_id(self, task: str, n: int, method: str, budget: int, obs: int) -> str:
        s = self.settings
        return _digest([task, n, method, budget, obs, s.seed, s.training_key(), s.rounds, s.posterior_samples,
                        s.reference_samples, s.c2st_steps, s.c2st_width, s.lc2st_pairs, s.lc2st_null, s.lc2st_width])

    def _calibration_id(self, task: str, n: int, method: str, budget: int) -> str:
        s = self.settings
        return _digest(["calibration", task, n, method, budget, s.seed, s.training_key(), s.sbc_sims, s.sbc_samples])

    # -- stages ----------------------------------------------------------------
    def model(self, task: str, n: int):
        from hierdsl.model import compile

        self._check_source(task)
        return compile(os.path.join(EXAMPLES, TASKS[task].file), args={"n_sites": n})

    def _source_digest(self, task: str) -> str:
        with open(os.path.join(EXAMPLES, TASKS[task].file), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    def _check_source(self, task: str) -> None:
        """The cached observations, references, estimators and rows of `task` are named by the
        settings, not by the task's model file; `cache/sources.json` records the file each task's
        entries came from, and a different file (an edited example, another hierdsl version's) is
        refused rather than mixed with them."""
        from hierdsl.cli import UserError

        path = os.path.join(self.cache, "sources.json")
        sources = {}
        if os.path.exists(path):
            try:
                with open(path) as f:
                    sources = json.load(f)
            except (OSError, ValueError) as exc:
                raise UserError(f"{path}: unreadable ({exc}); delete it to start the cache afresh") from None
            if not isinstance(sources, dict):
                raise UserError(f"{path}: not a record of task files (a JSON object); delete it to start afresh")
        digest = self._source_digest(task)
        if task not in sources:
            atomic_write(path, json.dumps({**sources, task: digest}, indent=1, sort_keys=True))
        elif sources[task] != digest:
            raise UserError(f"the cache in {self.cache} holds {task} results of a different "
                            f"{TASKS[task].file} than {os.path.join(EXAMPLES, TASKS[task].file)} "
                            f"(recorded in {path}); use another --output folder: that one's cached "
                            f"{task} files and its {task} rows were made from the other file")

    def observations(self, task: str, model, n: int) -> list[tuple[dict, dict]]:
        """`(data, truth)` per observation, drawn from the prior with fixed seeds."""
        import jax

        from hierdsl.data import data_variables

        s = self.settings
        path = os.path.join(self.cache, f"obs_{task}_{n}_{s.observations}_{s.seed}.npz")
        arrays = _load_npz(path)
        if arrays is None:
            keys = jax.random.split(jax.random.key(10_000 + s.seed), s.observations)
            draws = [{k: np.asarray(v) for k, v in model.simulate(k, n).items()} for k in keys]
            arrays = {f"{i}/{k}": v for i, d in enumerate(draws) for k, v in d.items()}
            _save_npz(path, arrays)
        data_names = {v.name for v in data_variables(model.ir)}
        param_names = {v.name for v in (*model.ir.globals, *model.ir.locals)}
        out = []
        for i in range(s.observations):
            d = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.split("/", 1)[0] == str(i)}
            out.append(({k: v for k, v in d.items() if k in data_names}, {k: v for k, v in d.items() if k in param_names}))
        return out

    def reference(self, task: str, model, n: int, index: int, data: dict) -> tuple[dict, dict]:
        s = self.settings
        path = os.path.join(self.cache, f"ref_{task}_{n}_{index}_{s.reference_samples}_{s.seed}.npz")
        info_path = path[:-4] + ".json"
        arrays = _load_npz(path)
        if arrays is not None and os.path.exists(info_path):
            with open(info_path) as f:
                return arrays, json.load(f)
        start = time.perf_counter()
        try:
            samples, info = TASKS[task].reference(model, data, s.reference_samples, 1000 * s.seed + index)
        except ImportError as exc:
            from hierdsl.cli import UserError

            raise UserError(f"the {task} reference posterior needs {exc.name or 'an optional package'}: "
                            "pip install 'hierdsl[bench]'") from None
        info = {**info, "seconds": round(time.perf_counter() - start, 2)}
        _save_npz(path, samples)
        atomic_write(info_path, json.dumps(info))
        return {k: np.asarray(v) for k, v in samples.items()}, info

    def estimator(self, task: str, model, n: int, method: str, budget: int, data=None, index: Optional[int] = None):
        import jax

        from hierdsl.checkpoint import load
        from hierdsl.inference import fit

        s = self.settings
        tag = _digest([s.training_key(), s.seed, s.rounds])
        name = f"est_{task}_{n}_{method}_{budget}" + (f"_obs{index}" if index is not None else "") + f"_{tag}.hsbe"
        path = os.path.join(self.cache, name)
        label = f"{task} n_s={n} {method} B={budget}" + (f" observation {index + 1}" if index is not None else "")
        if os.path.exists(path):
            self.log(f"{label}: estimator from the cache")
            return load(path, model), True
        self.log(f"{label}: training")
        rounds = s.rounds if method == "lf-rounds" else 1
        store = self.single_site_stages(task, budget) if method == "lf" else None
        est = fit(model, budget=budget, key=jax.random.key(s.seed), strategy=strategy(s, method), max_sites=n,
                  rounds=rounds, data=data, store=store)
        est.save(path)
        return est, False

    def single_site_stages(self, task: str, budget: int):
        """LF's simulations and surrogates for `task` at `budget`, kept in the cache and shared by
        every site count: they are single-site, so only the posterior stage depends on `n_s`.

        Keyed by everything they depend on (the example file, the budget, the seed and the
        surrogate's settings), so a change to any of them trains afresh. Every row still reports
        `B` simulator calls and the stages' times as they were measured when first trained."""
        from hierdsl.checkpoint import PartialRun

        s = self.settings
        lf_strategy = strategy(s, "lf")
        fingerprint = {"task": task, "source": self._source_digest(task), "budget": budget, "seed": s.seed,
                       **{field: dataclasses.asdict(lf_strategy)[field] for field in SINGLE_SITE_SETTINGS}}
        return PartialRun(os.path.join(self.cache, f"lf_single_site_{task}_{budget}_{_digest(fingerprint)}"),
                          fingerprint)

    def lc2st(self, model, est, n: int):
        """l-C2ST classifiers of an amortised estimator, from `lc2st_pairs` prior simulations."""
        import jax

        from hierdsl.runtime import lf
        from hierdsl.runtime.metrics import fit_lc2st

        s = self.settings
        sim = lf.full_simulator(model.lowered(), n)
        sims = {k: np.asarray(v) for k, v in sim(jax.random.split(jax.random.key(20_000 + s.seed), s.lc2st_pairs)).items()}
        # (pairs, sites, ...) per variable: one flat row per simulated data set.
        params, data_names = _param_names(model), _data_names(model)
        draws = est.sample_each({k: sims[k] for k in data_names}, key=jax.random.key(30_000 + s.seed))
        theta_q = _flatten(draws, params)
        theta = _flatten(sims, params)
        x = _flatten(sims, data_names)
        return fit_lc2st(theta, x, theta_q, jax.random.key(40_000 + s.seed), num_null=s.lc2st_null,
                         hidden_width=s.lc2st_width)

    def calibration(self, task: str, n: int, method: str, budget: int, est) -> dict:
        """SBC and expected coverage of an amortised estimator over `sbc_sims` prior simulations of
        `n` sites, `sbc_samples` posterior draws each: `hierdsl check`'s verdict per parameter group
        (globals; locals pooled over sites), summarised for the table."""
        import jax

        from hierdsl.diagnose import check

        s = self.settings
        record = {"id": self._calibration_id(task, n, method, budget), "task": task, "sites": n, "method": method,
                  "budget": budget, "sbc_sims": s.sbc_sims, "sbc_samples": s.sbc_samples}
        start = time.perf_counter()
        try:
            report = check(est, key=jax.random.key(70_000 + s.seed), num_sims=s.sbc_sims,
                           num_samples=s.sbc_samples, num_sites=n)
        except HsbiError as exc:
            return {**record, "error": str(exc), "seconds": round(time.perf_counter() - start, 2)}
        groups = {}
        for name, g in report.groups.items():
            groups[name] = {
                "verdict": g.verdict, "sbc_p_value": float(g.combined_p_value), "worst": g.worst,
                "worst_p_value": float(np.min(g.p_values)), "elements": len(g.labels),
                "coverage": {f"{lv:g}": {"mean": float(np.mean(g.coverage_at(lv))), "min": float(np.min(g.coverage_at(lv))),
                                         "max": float(np.max(g.coverage_at(lv))),
                                         "calibrated": exact_coverage(lv, g.num_posterior_samples),
                                         "band": [float(x) for x in g.bands[lv]]}
                             for lv in g.bands},
                "over_confident": g.over_confident, "under_confident": g.under_confident,
                # The ranks' shape, pooled over the group's elements: the mean rank over L (0.5
                # calibrated; above it the draws sit below the truths) and how often each rank 0..L
                # occurred (flat calibrated; U-shaped over-confident, a hump conservative).
                "mean_rank": float(np.mean(g.ranks) / g.num_posterior_samples),
                "rank_counts": np.bincount(np.ravel(g.ranks), minlength=g.num_posterior_samples + 1).tolist(),
            }
        return {**record, "num_sims": report.num_sims, "dropped_non_finite": report.num_dropped,
                "groups": groups, "seconds": round(time.perf_counter() - start, 2)}

    # -- the run ---------------------------------------------------------------
    def run(self) -> list[dict]:
        import jax

        from hierdsl.runtime.metrics import c2st

        s = self.settings
        done = {row["id"] for row in self.rows()}
        calibrated = {record["id"] for record in self.calibrations()}
        for task in s.tasks:
            for n in s.sites:
                model = self.model(task, n)
                observations = self.observations(task, model, n)
                params, data_names = _param_names(model), _data_names(model)
                globals_ = [v.name for v in model.ir.globals]
                refs = []
                for i, (data, _) in enumerate(observations):
                    self.log(f"{task} n_s={n}: reference posterior {i + 1}/{len(observations)}")
                    refs.append(self.reference(task, model, n, i, data))
                for method in s.methods:
                    for budget in s.budgets:
                        ids = [self._row_id(task, n, method, budget, i) for i in range(len(observations))]
                        amortised = method != "lf-rounds"
                        # Calibration is per amortised estimator (lf-rounds trains one per observation).
                        calibration_id = (self._calibration_id(task, n, method, budget)
                                          if amortised and s.sbc_sims > 0 else None)
                        rows_done = all(i in done for i in ids)
                        if rows_done and (calibration_id is None or calibration_id in calibrated):
                            continue
                        if method == "direct" and budget // n < 2:
                            self.log(f"{task} n_s={n} direct B={budget}: skipped (fewer than 2 full simulations)")
                            continue
                        est = classifiers = None
                        if amortised:
                            est, cached = self.estimator(task, model, n, method, budget)
                            if not rows_done:
                                self.log(f"{task} n_s={n} {method} B={budget}: l-C2ST classifiers")
                                start = time.perf_counter()
                                classifiers = self.lc2st(model, est, n)
                                lc2st_seconds = time.perf_counter() - start
                        for i, (data, truth) in enumerate(observations):
                            if ids[i] in done:
                                continue
                            lc2st_stat = lc2st_p = None
                            if not amortised:
                                est, cached = self.estimator(task, model, n, method, budget, data=data, index=i)
                            start = time.perf_counter()
                            key = jax.random.key(50_000 + 100 * s.seed + i)
                            draws = est.condition(data).sample(s.posterior_samples, key=key)
                            sample_seconds = time.perf_counter() - start
                            ref, ref_info = refs[i]
                            k1, k2 = jax.random.split(jax.random.key(60_000 + i))
                            finite = all(np.all(np.isfinite(v)) for v in draws.values())
                            joint = glob = float("nan")
                            if finite:
                                joint = c2st(_flatten(ref, params), _flatten(draws, params), k1,
                                             num_steps=s.c2st_steps, hidden_width=min(s.c2st_width, 10 * _dim(ref, params)))
                                glob = c2st(_flatten(ref, globals_), _flatten(draws, globals_), k2,
                                            num_steps=s.c2st_steps, hidden_width=min(s.c2st_width, 10 * _dim(ref, globals_)))
                                if classifiers is not None:
                                    result = classifiers.test(_flatten(draws, params), _flatten_one(data, data_names))
                                    lc2st_stat, lc2st_p = float(result.statistic), float(result.p_value)
                            row = {
                                "id": ids[i], "task": task, "sites": n, "method": method, "budget": budget,
                                "observation": i, "c2st_joint": joint, "c2st_globals": glob,
                                "lc2st_statistic": lc2st_stat, "lc2st_p_value": lc2st_p,
                                "simulator_calls": int(est.simulator_calls), "finite": bool(finite),
                                "seconds": {**{k: round(v, 2) for k, v in est.trained.seconds.items()},
                                            "sample": round(sample_seconds, 2),
                                            **({"lc2st": round(lc2st_seconds, 2)} if amortised else {})},
                                "estimator_cached": bool(cached), "reference": ref_info,
                            }
                            self._append(row)
                            done.add(ids[i])
                            self.log(f"{task} n_s={n} {method} B={budget} obs {i + 1}: C2ST joint {joint:.3f}, "
                                     f"globals {glob:.3f}" + (f", l-C2ST p {lc2st_p:.2f}" if lc2st_p is not None else ""))
                        if calibration_id is not None and calibration_id not in calibrated:
                            self.log(f"{task} n_s={n} {method} B={budget}: calibration (SBC and coverage, "
                                     f"{s.sbc_sims} simulations x {s.sbc_samples} draws)")
                            record = self.calibration(task, n, method, budget, est)
                            self._append(record, self.calibration_path)
                            calibrated.add(calibration_id)
                            self.log(f"{task} n_s={n} {method} B={budget}: " + _calibration_line(record))
        return self.rows()

    def selected_rows(self) -> list[dict]:
        """This run's rows (the results file may hold others from earlier settings)."""
        s = self.settings
        wanted = {self._row_id(t, n, m, b, i) for t in s.tasks for n in s.sites for m in s.methods
                  for b in s.budgets for i in range(s.observations)}
        return [r for r in self.rows() if r["id"] in wanted]

    def selected_calibrations(self) -> list[dict]:
        """This run's calibration records."""
        s = self.settings
        wanted = {self._calibration_id(t, n, m, b) for t in s.tasks for n in s.sites for m in s.methods
                  for b in s.budgets}
        return [r for r in self.calibrations() if r["id"] in wanted]


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _calibration_line(record: dict) -> str:
    if "error" in record:
        return f"calibration failed: {record['error']}"
    return "; ".join(f"{name} {g['verdict']} (SBC p {g['sbc_p_value']:.3g}, coverage at 90% "
                     f"{g['coverage']['0.9']['mean']:.2f}, calibrated {g['coverage']['0.9']['calibrated']:.2f})"
                     for name, g in record["groups"].items())


def _param_names(model) -> list[str]:
    return [v.name for v in (*model.ir.globals, *model.ir.locals)]


def _data_names(model) -> list[str]:
    from hierdsl.data import data_variables

    return [v.name for v in data_variables(model.ir)]


def _flatten(values: Mapping[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    """Rows of named draws side by side (globals `(num, *shape)`, locals `(num, sites, *shape)`);
    a single data set (no leading draw axis) is one row."""
    first = np.asarray(values[names[0]])
    return np.concatenate([np.asarray(values[k], np.float64).reshape(first.shape[0] if first.ndim else 1, -1)
                           for k in names], axis=1)


def _flatten_one(values: Mapping[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    """One data set (no draw axis) as one flat vector."""
    return np.concatenate([np.asarray(values[k], np.float64).reshape(-1) for k in names])


def _dim(values, names) -> int:
    return int(_flatten(values, names).shape[1])


# ----------------------------------------------------------------------------- report


def mean_interval(values: Sequence[float], seed: int = 0, num: int = 2000) -> tuple[float, float, float]:
    """The mean and a bootstrap 95% interval of the mean (NaN-free values)."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    if v.size == 1:
        return float(v[0]), float(v[0]), float(v[0])
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(num, v.size))].mean(axis=1)
    return float(v.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def _cell(values) -> str:
    m, lo, hi = mean_interval(values)
    return "—" if not np.isfinite(m) else f"{m:.3f} [{lo:.3f}, {hi:.3f}]"


STAGES = ("simulate", "surrogate", "synthesise", "posterior")


def table(rows: Sequence[dict]) -> str:
    """The Markdown table: one line per (task, sites, method, budget)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["sites"], row["method"], row["budget"]), []).append(row)
    lines = [
        "| task | n_s | method | B | obs | sim calls | C2ST joint | C2ST globals | l-C2ST T | l-C2ST rejects | "
        "train s (sim / surrogate / synth / posterior) | sample s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {t: i for i, t in enumerate(TASKS)}
    for key in sorted(groups, key=lambda k: (order.get(k[0], 99), k[1], METHODS.index(k[2]), k[3])):
        g = groups[key]
        p_values = [r["lc2st_p_value"] for r in g if r["lc2st_p_value"] is not None]
        rejects = f"{sum(p < 0.05 for p in p_values)}/{len(p_values)}" if p_values else "—"
        stages = " / ".join(f"{np.mean([r['seconds'].get(k, 0.0) for r in g]):.0f}" for k in STAGES)
        calls = int(np.mean([r["simulator_calls"] for r in g]))
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {len(g)} | {calls} | {_cell([r['c2st_joint'] for r in g])} "
            f"| {_cell([r['c2st_globals'] for r in g])} | {_cell([r['lc2st_statistic'] for r in g])} | {rejects} "
            f"| {stages} | {np.mean([r['seconds']['sample'] for r in g]):.1f} |")
    return "\n".join(lines)


def calibration_table(records: Sequence[dict]) -> str:
    """The calibration table: one line per amortised estimator, each group's SBC verdict and
    Bonferroni p-value and its mean expected coverage at the 50% and 90% levels (with the coverage
    a calibrated estimator has with that many posterior draws)."""
    lines = [
        "| task | n_s | method | B | sims × draws | globals: verdict, SBC p | globals: coverage 50% / 90% "
        "| locals: verdict, SBC p | locals: coverage 50% / 90% | calibrated coverage | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {t: i for i, t in enumerate(TASKS)}
    for r in sorted(records, key=lambda r: (order.get(r["task"], 99), r["sites"], METHODS.index(r["method"]), r["budget"])):
        head = f"| {r['task']} | {r['sites']} | {r['method']} | {r['budget']} | {r['sbc_sims']} × {r['sbc_samples']} "
        if "error" in r:
            lines.append(head + f"| failed: {r['error']} | | | | | {r['seconds']:.1f} |")
            continue
        cells, calibrated = [], "—"
        for name in ("globals", "locals"):
            g = r["groups"].get(name)
            if g is None:
                cells += ["—", "—"]
                continue
            flags = (" (over-confident)" if g["over_confident"] else "") + (" (conservative)" if g["under_confident"] else "")
            cells += [f"{g['verdict']}, {g['sbc_p_value']:.3g}{flags}",
                      f"{g['coverage']['0.5']['mean']:.2f} / {g['coverage']['0.9']['mean']:.2f}"]
            calibrated = f"{g['coverage']['0.5']['calibrated']:.2f} / {g['coverage']['0.9']['calibrated']:.2f}"
        lines.append(head + "| " + " | ".join(cells) + f" | {calibrated} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def plot_panels(task_rows: Sequence[dict]) -> list[tuple[str, int]]:
    """The panels of one task's plot: `("budget", n_s)` (C2ST against the budget at that site count)
    where a site count has several budgets, `("sites", B)` where a budget has several site counts;
    one budget panel per site count when neither does (a single cell)."""
    site_counts = sorted({r["sites"] for r in task_rows})
    budgets = sorted({r["budget"] for r in task_rows})
    against_budget = [("budget", n) for n in site_counts if len({r["budget"] for r in task_rows if r["sites"] == n}) > 1]
    against_sites = [("sites", b) for b in budgets if len({r["sites"] for r in task_rows if r["budget"] == b}) > 1]
    return against_budget + against_sites or [("budget", n) for n in site_counts]


def plots(rows: Sequence[dict], out: str) -> list[str]:
    """One PNG per task: C2ST (joint and globals) against budget, and against the site count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hierdsl.results import _save_figure

    written = []
    for task in dict.fromkeys(r["task"] for r in rows):
        task_rows = [r for r in rows if r["task"] == task]
        site_counts = sorted({r["sites"] for r in task_rows})
        budgets = sorted({r["budget"] for r in task_rows})
        panels = plot_panels(task_rows)
        fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
        for ax, (axis, fixed) in zip(axes[0], panels):
            for method in dict.fromkeys(r["method"] for r in task_rows):
                for metric, style in (("c2st_joint", "-o"), ("c2st_globals", "--s")):
                    xs, ms, los, his = [], [], [], []
                    values = budgets if axis == "budget" else site_counts
                    for v in values:
                        sel = [r[metric] for r in task_rows if r["method"] == method
                               and (r["budget"] == v and r["sites"] == fixed if axis == "budget"
                                    else r["sites"] == v and r["budget"] == fixed)]
                        m, lo, hi = mean_interval(sel)
                        if np.isfinite(m):
                            xs.append(v), ms.append(m), los.append(m - lo), his.append(hi - m)
                    if xs:
                        ax.errorbar(xs, ms, yerr=[los, his], fmt=style, capsize=3,
                                    label=f"{method}, {'joint' if metric == 'c2st_joint' else 'globals'}")
            ax.axhline(0.5, color="grey", lw=0.8)
            ax.set_ylim(0.45, 1.02)
            ax.set_xscale("log")
            ax.set_xlabel("budget B (single-site simulations)" if axis == "budget" else "sites n_s")
            ax.set_ylabel("C2ST (0.5 = exact)")
            ax.set_title(f"{task}, " + (f"n_s = {fixed}" if axis == "budget" else f"B = {fixed}"))
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out, f"{task}.png")
        _save_figure(fig, path)
        plt.close(fig)
        written.append(path)
    return written


def report(bench: Bench, command: str) -> tuple[str, list[str]]:
    rows = bench.selected_rows()
    text = table(rows)
    records = bench.selected_calibrations()
    if records:
        text += ("\n\nCalibration of each amortised estimator (SBC ranks and expected coverage over prior "
                 "simulations; `hierdsl check`'s verdicts):\n\n" + calibration_table(records))
    s = bench.settings
    header = (f"# hierdsl bench\n\nCommand: `{command}`\n\nSettings: {json.dumps(dataclasses.asdict(s))}\n\n"
              "C2ST: 0.5 = indistinguishable from the reference; mean and bootstrap 95% interval of the mean "
              "over the observations. l-C2ST T: 0 = perfect; rejects: observations where l-C2ST rejects at 5%. "
              "Calibration: SBC p is the Bonferroni-combined rank-uniformity p-value of the group (FAIL below "
              "0.05 or when coverage falls below its tolerance band); coverage is the mean over the group's "
              "elements, against what a calibrated estimator gets with that many posterior draws.\n\n")
    atomic_write(os.path.join(bench.out, "results.md"), header + text + "\n")
    return text, plots(rows, bench.out)


# ----------------------------------------------------------------------------- CLI


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def cmd_bench(ns) -> int:
    from hierdsl.cli import UserError

    base = QUICK if ns.quick else PRESETS[ns.preset]
    changes = {}
    try:
        for field, parse in (("tasks", _names), ("methods", _names), ("budgets", _ints), ("sites", _ints)):
            value = getattr(ns, field)
            if value is not None:
                changes[field] = parse(value)
    except ValueError as exc:
        raise UserError(f"bad list of numbers: {exc}") from None
    for field in ("observations", "epochs", "batch_size", "seed", "rounds", "sbc_sims", "sbc_samples"):
        value = getattr(ns, field)
        if value is not None:
            changes[field] = value
    if ns.precondition is not None:
        changes["precondition"] = ns.precondition
    if ns.posterior_precondition:
        changes["posterior_precondition"] = True
    if ns.globals_precondition:
        changes["globals_precondition"] = True
    settings = dataclasses.replace(base, **changes)
    if settings.observations < 1 or any(b < 10 for b in settings.budgets) or any(n < 1 for n in settings.sites):
        raise UserError("--observations and --sites must be at least 1, --budgets at least 10")
    if settings.sbc_sims != 0 and settings.sbc_sims < 10 or settings.sbc_samples < 5:
        raise UserError("--sbc-sims must be 0 (no calibration) or at least 10, --sbc-samples at least 5")
    log = (lambda s: None) if ns.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    try:
        bench = Bench(settings, ns.output, log)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if not ns.report_only:
        bench.run()
    command = "hierdsl bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "hierdsl bench"
    text, written = report(bench, command)
    print(text)
    files = ["results.md", "results.jsonl", *(["calibration.jsonl"] if bench.selected_calibrations() else []),
             *(os.path.basename(p) for p in written)]
    log(f"\nwrote {', '.join(files[:-1])} and {files[-1]} to {ns.output}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="run the benchmark protocol against reference posteriors")
    p.add_argument("--quick", action="store_true",
                   help="one task, tiny budget and networks (a few minutes on a CPU; what CI runs)")
    p.add_argument("--preset", choices=tuple(PRESETS), default="protocol",
                   help="protocol: benchmark.md's settings (for a GPU or a long run); cpu: shorter training and "
                        "smaller classifiers; quick: see --quick. Options below override the preset")
    p.add_argument("--tasks", help=f"comma-separated, from {', '.join(TASKS)} (default gaussian_linear,two_moons,sir)")
    p.add_argument("--methods", help=f"comma-separated, from {', '.join(METHODS)} (default: all; cpu preset lf,direct)")
    p.add_argument("--budgets", help="comma-separated single-site simulation budgets (default 1000,5000,10000; cpu preset 1000,5000)")
    p.add_argument("--sites", help="comma-separated site counts n_s (default 50)")
    p.add_argument("--observations", type=int, help="observations per task (default 10)")
    p.add_argument("--epochs", type=int, help="the posterior network's training epochs (default: the library's)")
    p.add_argument("--batch-size", type=int, help="the posterior network's batch size (default: the library's)")
    p.add_argument("--rounds", type=int, help="rounds of the lf-rounds method (default 2)")
    p.add_argument("--precondition", nargs="?", const="network", choices=("network", "linear", "off"),
                   help="how LF's surrogate sees the observations: as residuals standardised by a location-scale "
                        "network (network, the value without an argument) or linear fit (linear) fitted first, "
                        "or as they are (off); default: the library's (lf.PRECONDITION)")
    p.add_argument("--posterior-precondition", action="store_true",
                   help="the posterior network (lf and direct) sees each site's locals as residuals of a "
                        "location-scale network fitted to them given the globals and the site's own data (off by default)")
    p.add_argument("--globals-precondition", action="store_true",
                   help="the posterior network (lf and direct) sees the globals as residuals of a location-scale "
                        "network fitted to them given all the sites' data; meant with --posterior-precondition "
                        "(off by default)")
    p.add_argument("--sbc-sims", type=int,
                   help="calibration of each amortised estimator: prior simulations for SBC and coverage "
                        "(default 200; cpu preset 100; 0 skips it)")
    p.add_argument("--sbc-samples", type=int, help="posterior draws per calibration simulation (default 100; cpu preset 10)")
    p.add_argument("--seed", type=int, help="seed of the observations and the training (default 0)")
    p.add_argument("-o", "--output", default="bench", help="output folder, with its cache (default ./bench)")
    p.add_argument("--report-only", action="store_true",
                   help="compute nothing: write the table and plots of the rows these settings already have")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(run=cmd_bench)
