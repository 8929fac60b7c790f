"""Benchmark: how wide an SIR estimator's posterior is against the exact (grid) posterior.

Trains one estimator on SIR with `--sites` sites (`hierdsl.fit`, library defaults unless an
option says otherwise), then conditions it on fixed data sets whose γ and β are set (slow, middle
and fast epidemics, the regimes of the README's 10-site run) and compares 2,000 posterior draws
with 4,000 draws of `hierdsl.reference.sample_sir`: per parameter the ratio of the estimator's sd to
the exact one, and the error of its mean in exact sds. Prints one JSON line per data set and a
summary line. Measures only: nothing is asserted.

    python benchmarks/sir_width.py --sites 3                        # the defaults
    python benchmarks/sir_width.py --sites 3 --epochs 160           # a longer posterior stage
    python benchmarks/sir_width.py --sites 3 --method direct --budget 12000   # real simulations only
    python benchmarks/sir_width.py --sites 3 --posterior-precondition  # the betas as residuals given gamma and their site's counts
    python benchmarks/sir_width.py --sites 3 --num-synthetic 16000  # four times the default synthetic data sets
    python benchmarks/sir_width.py --sites 3 --learning-rate 1e-3   # the posterior stage's peak rate (default 3e-3)
    python benchmarks/sir_width.py --sites 3 --ema-decay 0.999      # its weights' moving average
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
import numpy as np

import hierdsl
from hierdsl import reference
from hierdsl.runtime import lf

SIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "sir.hsbi")

# (gamma, beta per site): every data set has a slow (beta / gamma < 2) and a faster epidemic.
CASES = [(0.109, (0.17, 0.36, 0.86)), (0.125, (0.20, 0.25, 0.45)), (0.14, (0.30, 0.55, 1.2)),
         (0.10, (0.18, 0.50, 0.70))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=3, help="sites per data set (the model's n_sites)")
    parser.add_argument("--budget", type=int, default=2000, help="simulator calls")
    parser.add_argument("--method", choices=("lf", "direct"), default="lf")
    parser.add_argument("--epochs", type=int, default=None, help="posterior epochs (default: the library's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--learning-rate", type=float, default=None,
                        help="the posterior stage's peak learning rate (default: the library's)")
    parser.add_argument("--ema-decay", type=float, default=None,
                        help="keep and use a moving average of the posterior network's weights (e.g. 0.999)")
    parser.add_argument("--posterior-precondition", action="store_true",
                        help="the posterior network sees each beta as a residual given gamma and its site's counts")
    parser.add_argument("--num-synthetic", type=int, default=None,
                        help="LF's synthetic data sets (default: the library's, 2 per simulator call, at least 2,000)")
    args = parser.parse_args()

    model = hierdsl.compile(SIR, args={"n_sites": args.sites})
    training = lf.POSTERIOR_TRAINING.with_max_epochs(args.epochs) if args.epochs else lf.POSTERIOR_TRAINING
    training = dataclasses.replace(training, ema_decay=args.ema_decay,
                                   learning_rate=args.learning_rate or training.learning_rate)
    strategy = (lf.Direct(posterior_training=training, posterior_precondition=args.posterior_precondition)
                if args.method == "direct"
                else lf.LF(posterior_training=training, posterior_precondition=args.posterior_precondition,
                           num_synthetic=args.num_synthetic))
    start = time.perf_counter()
    est = hierdsl.fit(model, budget=args.budget, key=jax.random.key(args.seed), strategy=strategy)
    fit_seconds = time.perf_counter() - start
    print(json.dumps({"fit_seconds": round(fit_seconds, 1),
                      "stages": {k: round(v, 1) for k, v in est.trained.seconds.items()},
                      "posterior_val_loss": round(est.trained.stages["posterior"].best_val_loss, 4)}), flush=True)

    ratios, errors, gamma_ratios = [], [], []
    for index, (gamma, betas) in enumerate(CASES):
        beta = np.resize(np.asarray(betas), args.sites)
        sim = model.simulate(jax.random.key(1000 + index), n_sites=args.sites, params={"gamma": gamma, "beta": beta})
        y = np.asarray(sim["y"])
        exact = reference.sample_sir(y, 4000, seed=index)
        draws = est.condition({"y": y}).sample(2000, key=jax.random.key(index))
        beta_ratio = np.std(draws["beta"], 0) / np.std(exact["beta"], 0)
        beta_error = (np.mean(draws["beta"], 0) - np.mean(exact["beta"], 0)) / np.std(exact["beta"], 0)
        gamma_ratio = float(np.std(draws["gamma"]) / np.std(exact["gamma"]))
        ratios.append(beta_ratio), errors.append(np.abs(beta_error)), gamma_ratios.append(gamma_ratio)
        print(json.dumps({"data_set": index, "gamma": gamma, "beta": beta.round(3).tolist(),
                          "gamma_sd_ratio": round(gamma_ratio, 3),
                          "gamma_error": round(float((np.mean(draws["gamma"]) - np.mean(exact["gamma"]))
                                                     / np.std(exact["gamma"])), 3),
                          "beta_sd_ratio": beta_ratio.round(3).tolist(), "beta_error": beta_error.round(3).tolist()}),
              flush=True)
    ratios, errors = np.concatenate(ratios), np.concatenate(errors)
    print(f"{args.method}, {args.sites} sites, B = {args.budget}, seed {args.seed}: gamma sd ratio "
          f"{' '.join(f'{r:.2f}' for r in gamma_ratios)}; beta sd ratio median {np.median(ratios):.2f} "
          f"({ratios.min():.2f}-{ratios.max():.2f}); |beta mean error| median {np.median(errors):.2f} "
          f"(max {errors.max():.2f}) exact sds; fit {fit_seconds:.0f} s")


if __name__ == "__main__":
    main()
