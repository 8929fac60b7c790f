"""Benchmark: one LF estimator of a benchmark task against its reference posterior.

Trains one LF estimator (`hierdsl.fit`, library defaults, budget 2,000) on a task of
`hierdsl.bench.TASKS` at `--sites` sites, in one of three variants: the defaults, the locals'
preconditioner (`posterior_precondition`) or both preconditioners (`globals_precondition` too);
`--num-synthetic` sets how many synthetic data sets the posterior network trains on (the library
default: `max(2000, 2 × budget)`, bounded by memory).
Then for `--obs` data sets simulated from the prior (keys 500, 501, ...) it compares 2,000
posterior draws with 2,000 draws of the task's reference posterior (exact, grid or NUTS): per
parameter, the ratio of the estimator's sd to the reference's and the error of its mean in
reference sds (median and range over a group's elements). Prints one JSON line for the fit and
one per data set. Measures only: nothing is asserted.

    python benchmarks/precondition_tasks.py gaussian_linear_uniform --variant defaults
    python benchmarks/precondition_tasks.py gaussian_mixture --variant both
    python benchmarks/precondition_tasks.py gaussian_linear --budget 1000 --num-synthetic 1000
    python benchmarks/precondition_tasks.py gaussian_linear --budget 1000 --learning-rate 1e-3
    python benchmarks/precondition_tasks.py gaussian_linear --budget 1000 --ema-decay 0.999
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
from hierdsl.bench import EXAMPLES, TASKS
from hierdsl.runtime import lf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("--variant", choices=("defaults", "pp", "both"), default="defaults",
                        help="pp: the locals' preconditioner; both: the globals' too")
    parser.add_argument("--sites", type=int, default=10, help="sites per data set (the model's n_sites)")
    parser.add_argument("--budget", type=int, default=2000, help="simulator calls")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--obs", type=int, default=3, help="data sets to condition on")
    parser.add_argument("--num-synthetic", type=int, default=None,
                        help="synthetic data sets for the posterior network (default: the library's)")
    parser.add_argument("--learning-rate", type=float, default=None,
                        help="the posterior stage's peak learning rate (default: the library's)")
    parser.add_argument("--ema-decay", type=float, default=None,
                        help="keep and use a moving average of the posterior network's weights (e.g. 0.999)")
    args = parser.parse_args()

    task = TASKS[args.task]
    model = hierdsl.compile(os.path.join(EXAMPLES, task.file), args={"n_sites": args.sites})
    strategy = lf.LF(posterior_precondition=args.variant in ("pp", "both"), globals_precondition=args.variant == "both",
                     num_synthetic=args.num_synthetic)
    training = dataclasses.replace(strategy.posterior_training, ema_decay=args.ema_decay,
                                   learning_rate=args.learning_rate or strategy.posterior_training.learning_rate)
    strategy = dataclasses.replace(strategy, posterior_training=training)
    start = time.perf_counter()
    est = hierdsl.fit(model, budget=args.budget, key=jax.random.key(args.seed), strategy=strategy)
    print(json.dumps({"task": args.task, "variant": args.variant, "num_synthetic": args.num_synthetic,
                      "learning_rate": training.learning_rate, "ema_decay": training.ema_decay,
                      "fit_s": round(time.perf_counter() - start),
                      "stages": {k: round(v, 1) for k, v in est.trained.seconds.items()},
                      "posterior_val_loss": round(est.trained.stages["posterior"].best_val_loss, 4)}), flush=True)
    data_names = [v.name for v in model.ir.by_role("observation", "input")]
    for index in range(args.obs):
        data = {k: np.asarray(v) for k, v in model.simulate(jax.random.key(500 + index), n_sites=args.sites).items()}
        ref, _ = task.reference(model, data, 2000, index)
        draws = est.condition({k: data[k] for k in data_names}).sample(2000, key=jax.random.key(index))
        row: dict = {"data_set": index}
        for name in ref:
            r = np.asarray(ref[name]).reshape(len(ref[name]), -1)
            d = np.asarray(draws[name]).reshape(len(draws[name]), -1)
            ratio, error = d.std(0) / r.std(0), np.abs(d.mean(0) - r.mean(0)) / r.std(0)
            row[name] = {"sd_ratio_median": round(float(np.median(ratio)), 3),
                         "sd_ratio_range": [round(float(ratio.min()), 3), round(float(ratio.max()), 3)],
                         "error_median": round(float(np.median(error)), 3), "error_max": round(float(error.max()), 3)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
