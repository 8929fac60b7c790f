"""Command-line interface: `hierdsl compile | fmt | simulate | train | infer | check | bench`.

User errors (bad model files, bad data) print the rendered diagnostics and exit with status 1,
never with a Python traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import warnings
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


def _compile_for_run(ns: argparse.Namespace):
    from hierdsl.model import compile

    model = compile(ns.file, model=ns.model, args=_parse_args(ns.arg), import_targets=ns.allow_python)
    for w in model.warnings:
        print(w.render(dict(model.sources)), file=sys.stderr)
    missing = [x.name for x in model.ir.externs if x.name not in model.functions]
    if missing:
        raise UserError(
            f"the model calls Python extern(s) {', '.join(missing)}: pass --allow-python to import their "
            "targets (this runs code named in the model file), or use the Python API with functions={...}")
    return model


def _key(seed: int):
    import jax

    return jax.random.key(seed)


def cmd_simulate(ns: argparse.Namespace) -> int:
    import numpy as np

    from hierdsl.data import Dataset, data_variables, dataset_to_csv, default_site_labels
    from hierdsl.runtime.lower import check_simulations

    model = _compile_for_run(ns)
    if ns.sites < 1:
        raise UserError("--sites must be at least 1")
    sims = {k: np.asarray(v) for k, v in model.simulate(_key(ns.seed), ns.sites).items()}
    check_simulations({v.name: sims[v.name] for v in model.ir.observations})
    labels = default_site_labels(ns.sites)
    names = [v.name for v in data_variables(model.ir)]
    dataset = Dataset(labels, {n: sims[n] for n in names})
    truth = {
        "model": model.ir.name, "seed": ns.seed,
        "globals": {v.name: sims[v.name].tolist() for v in model.ir.globals},
        "sites": {label: {v.name: sims[v.name][s].tolist() for v in model.ir.locals} for s, label in enumerate(labels)},
    }
    truth_path = _truth_path(ns.output)
    atomic_write(ns.output, dataset_to_csv(dataset, names))
    atomic_write(truth_path, json.dumps(truth, indent=1) + "\n")
    print(f"wrote {ns.sites} sites of {', '.join(names)} to {ns.output}; true parameters to {truth_path}")
    return 0


def _truth_path(path: str) -> str:
    stem = path[:-4] if path.lower().endswith((".csv", ".json")) and path[-4] == "." else path.rsplit(".", 1)[0]
    return stem + ".truth.json"


def _strategy(ns: argparse.Namespace):
    from hierdsl.runtime import lf

    precondition = getattr(ns, "precondition", None)
    if precondition is not None and ns.method == "direct":
        raise UserError("--precondition needs --method lf (the direct method has no surrogate)")
    extra = {} if precondition is None else {"precondition": None if precondition == "off" else precondition}
    synthetic = getattr(ns, "synthetic", None)
    if synthetic is not None:
        if ns.method == "direct":
            raise UserError("--synthetic needs --method lf (the direct method trains on its simulations)")
        if synthetic < 10:
            raise UserError(f"--synthetic must be at least 10 data sets, got {synthetic}")
        extra["num_synthetic"] = synthetic
    both = {name: True for name in ("posterior_precondition", "globals_precondition") if getattr(ns, name, False)}
    if not ns.epochs:
        return lf.Direct(**both) if ns.method == "direct" else lf.LF(**extra, **both)
    surrogate = lf.TrainConfig().with_max_epochs(ns.epochs)
    posterior = lf.POSTERIOR_TRAINING.with_max_epochs(ns.epochs)
    if ns.method == "direct":
        return lf.Direct(posterior_training=posterior, **both)
    return lf.LF(surrogate_training=surrogate, posterior_training=posterior, **extra, **both)


def _train(ns: argparse.Namespace, model, progress, output: str, data=None):
    """Train, keeping finished stages beside `output` so an interrupted run resumes."""
    import dataclasses

    from hierdsl.checkpoint import PartialRun
    from hierdsl.inference import fit

    if ns.budget < 10:
        raise UserError("--budget must be at least 10 simulations")
    rounds = getattr(ns, "rounds", 1)
    if rounds < 1:
        raise UserError("--rounds must be at least 1")
    if rounds > 1 and ns.method != "lf":
        raise UserError("--rounds needs --method lf")
    strategy = _strategy(ns)
    max_sites = ns.max_sites or model.ir.num_sites
    fingerprint = {"model": model.ir.hash, "strategy": dataclasses.asdict(strategy), "method": ns.method,
                   "budget": ns.budget, "seed": ns.seed, "max_sites": max_sites, "rounds": rounds}
    store = PartialRun(output, fingerprint)
    if store.resumed:
        progress.message(f"resuming the interrupted run kept in {store.folder}")
    progress.message(f"training a {ns.method} estimator for {model.ir.name}: budget {ns.budget} simulator calls, "
                     f"up to {max_sites} sites")
    estimator = fit(model, budget=ns.budget, key=_key(ns.seed), strategy=strategy, max_sites=max_sites,
                    progress=progress, store=store, rounds=rounds, data=data)
    estimator.save(output)
    store.clear()
    return estimator


def cmd_train(ns: argparse.Namespace) -> int:
    from hierdsl.progress import Progress

    model = _compile_for_run(ns)
    progress = Progress(quiet=ns.quiet)
    estimator = _train(ns, model, progress, ns.output)
    progress.message(f"estimator written to {ns.output} ({estimator.simulator_calls} simulator calls)")
    return 0


def cmd_infer(ns: argparse.Namespace) -> int:
    import os
    import time

    import numpy as np

    from hierdsl.checkpoint import load
    from hierdsl.data import read_data
    from hierdsl.progress import Progress
    from hierdsl import results

    started = time.perf_counter()
    model = _compile_for_run(ns)
    data = read_data(ns.data, model.ir)
    progress = Progress(quiet=ns.quiet)
    os.makedirs(ns.output, exist_ok=True)
    if ns.estimator:
        estimator = load(ns.estimator, model)
        progress.message(f"using the estimator in {ns.estimator}")
        trained_here = False
    else:
        estimator = _train(ns, model, progress, os.path.join(ns.output, "estimator.hsbe"), data)
        trained_here = True
    t0 = time.perf_counter()
    posterior = estimator.condition(data)
    samples = posterior.sample(ns.num_samples, key=_key(ns.seed + 1),
                               progress=progress.bar("sample", ns.num_samples))
    samples = {k: np.asarray(v) for k, v in samples.items()}
    sampling_seconds = time.perf_counter() - t0
    finite = all(np.all(np.isfinite(v)) for v in samples.values())
    if not finite:
        raise UserError("the posterior sampler produced non-finite values; the estimator may be undertrained "
                        "(retrain with a larger --budget)")

    rows = results.summary_rows(samples, model.ir, data.sites)
    table = results.format_summary(rows)
    atomic_write(os.path.join(ns.output, "summary.csv"), results.summary_csv(rows))
    idata = results.inference_data(samples, data, model.ir)
    results.write_netcdf(os.path.join(ns.output, "posterior.nc"), idata)
    history = _loss_history(estimator.trained.stages)
    plots = [] if ns.no_plots else results.write_plots(ns.output, idata, model.ir, history)
    import jax

    from hierdsl import __version__

    manifest = {
        "model": model.ir.name, "model_file": ns.file, "model_hash": model.ir.hash, "data": ns.data,
        "sites": list(data.sites), "seed": ns.seed, "method": estimator.strategy.name,
        "budget": estimator.budget, "simulator_calls": estimator.simulator_calls,
        "estimator": ns.estimator or os.path.join(ns.output, "estimator.hsbe"), "trained_in_this_run": trained_here,
        "num_samples": ns.num_samples, "rounds": ns.rounds if not ns.estimator else None,
        "truncation": estimator.trained.truncation.to_json() if estimator.trained.truncation is not None else None,
        "seconds": {**{k: round(v, 3) for k, v in estimator.trained.seconds.items()},
                    "sample": round(sampling_seconds, 3), "total": round(time.perf_counter() - started, 3)},
        "versions": {"hierdsl": __version__, "jax": jax.__version__},
        "outputs": ["posterior.nc", "summary.csv", *[os.path.basename(p) for p in plots]],
    }
    results.write_manifest(os.path.join(ns.output, "manifest.json"), manifest)
    if not ns.quiet:
        print(table)
    progress.message(f"\nwrote {', '.join(manifest['outputs'])} and manifest.json to {ns.output}")
    return 0


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="which model, when the file defines several")
    p.add_argument("--arg", action="append", default=[], metavar="NAME=VALUE", help="override a model argument")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--allow-python", action="store_true",
                   help='import `extern … = "module:attr"` targets named in the model file (runs their code)')


def _add_train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budget", type=int, default=2000, help="single-site simulator calls (default 2000)")
    p.add_argument("--method", choices=("lf", "direct"), default="lf",
                   help="lf: likelihood factorisation (default); direct: full multi-site simulations")
    p.add_argument("--max-sites", type=int, default=None, help="largest site count served (default: the model's)")
    p.add_argument("--epochs", type=int, default=None,
                   help="most training epochs per network (default 200 surrogate, early-stopped; 80 posterior, cosine-annealed)")
    p.add_argument("--precondition", choices=("network", "linear", "off"), default=None,
                   help="how the lf surrogate sees the observations: standardised by a location-scale network "
                        "fitted first (network), by a linear fit (linear), or as they are (off); "
                        "default: the library's (network)")
    p.add_argument("--synthetic", type=int, default=None, metavar="N",
                   help="lf: synthetic data sets the posterior network trains on, drawn from the surrogate "
                        "without simulator calls (default: 2 per simulator call, at least 2000, bounded by memory)")
    p.add_argument("--posterior-precondition", action="store_true",
                   help="the posterior network sees each site's locals as residuals of a location-scale network "
                        "fitted to them given the globals and the site's own data (off by default)")
    p.add_argument("--globals-precondition", action="store_true",
                   help="the posterior network sees the globals as residuals of a location-scale network fitted "
                        "to them given all the sites' data; meant with --posterior-precondition (off by default)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


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

    p = sub.add_parser("simulate", help="simulate a synthetic data set (and write its true parameters)")
    p.add_argument("file")
    p.add_argument("--sites", type=int, required=True, help="number of sites")
    p.add_argument("-o", "--output", required=True, help="data file to write (CSV)")
    _add_run_options(p)
    p.set_defaults(run=cmd_simulate)

    p = sub.add_parser("train", help="train an amortised estimator once")
    p.add_argument("file")
    p.add_argument("-o", "--output", required=True, help="estimator file to write (.hsbe)")
    _add_run_options(p)
    _add_train_options(p)
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("infer", help="condition on data (training first if no --estimator) and write the posterior")
    p.add_argument("file")
    p.add_argument("--data", required=True, help="observed data (CSV or JSON; see README)")
    p.add_argument("--estimator", help="a trained .hsbe estimator to reuse")
    p.add_argument("-o", "--output", default="run", help="output folder (default ./run)")
    p.add_argument("--num-samples", type=int, default=2000, help="posterior draws (default 2000)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--rounds", type=int, default=1,
                   help="sequential rounds toward these data (LF; the budget is split over them; rounds after the "
                        "first draw from the prior truncated to the current posterior's region; default 1)")
    _add_run_options(p)
    _add_train_options(p)
    p.set_defaults(run=cmd_infer)

    from hierdsl import bench, diagnose

    diagnose.add_parser(sub)
    bench.add_parser(sub)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


# Commands that never compile a JAX program, and so never touch the compilation cache.
_WITHOUT_JAX = ("compile", "fmt")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help()
        return 2
    if ns.command not in _WITHOUT_JAX:
        from hierdsl.cache import cache_from_environment

        # With HIERDSL_JAX_CACHE set, later runs of the same model and settings load the compiled
        # programs (see hierdsl/cache.py).
        cache_from_environment()
    try:
        with warnings.catch_warnings():
            # Warnings from hierdsl are messages to the user, not source locations.
            warnings.showwarning = _show_warning
            return ns.run(ns)
    except HsbiError as exc:
        print(exc.render(), file=sys.stderr)
        n = sum(1 for d in exc.diagnostics if d.severity == "error")
        print(f"\n{n} error{'s' if n != 1 else ''}", file=sys.stderr)
        return 1
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        # The runtime's own user-facing errors (non-finite simulations, extern misuse) are not bugs.
        from hierdsl.runtime.errors import RuntimeModelError

        if isinstance(exc, RuntimeModelError):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _loss_history(stages) -> dict:
    """Loss curves per plot panel: one per stage, an ensemble's surrogates together (member m's
    stage is `surrogate_m`)."""
    history: dict = {}
    ensemble = any(name.startswith("surrogate_") for name in stages)
    for name, log in stages.items():
        panel, _, member = name.partition("_")
        suffix = f" {member or 1}" if ensemble and panel == "surrogate" else ""
        history.setdefault(panel, {}).update({f"train{suffix}": log.train_loss, f"validation{suffix}": log.val_loss})
    return history


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

