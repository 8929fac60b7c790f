"""Benchmark: the main job's estimator (Eight Schools, the bundled data) against NUTS.

Trains the estimator `hierdsl infer examples/eight_schools.hsbi --data examples/eight_schools.csv`
trains (`hierdsl.fit`, budget 2,000, the seed's key; library defaults unless an option says
otherwise), draws 4,000 posterior samples with the key `infer` uses (seed + 1), and compares them
with 4,000 NUTS draws of the model's own likelihood (`hierdsl.nuts.reference_posterior`, key 0,
needs `hierdsl[bench]`): per parameter the ratio of the estimator's sd to NUTS's and the error of
its mean in NUTS sds (for the eight school effects θ: their median and range). Prints one JSON
line for the fit and one for the comparison. Measures only: nothing is asserted.

    python benchmarks/eight_schools.py                        # the defaults
    python benchmarks/eight_schools.py --epochs 50            # a shorter posterior stage
    python benchmarks/eight_schools.py --learning-rate 1e-3   # the posterior stage's peak rate (default 3e-3)
    python benchmarks/eight_schools.py --ema-decay 0.999      # its weights' moving average
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
from hierdsl.data import read_data
from hierdsl.nuts import reference_posterior
from hierdsl.runtime import lf

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def compare(draws: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per element: the sd ratio and the error of the mean in reference sds."""
    draws, ref = draws.reshape(len(draws), -1), ref.reshape(len(ref), -1)
    return draws.std(0) / ref.std(0), (draws.mean(0) - ref.mean(0)) / ref.std(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=2000, help="simulator calls")
    parser.add_argument("--seed", type=int, default=0, help="training seed (infer's --seed)")
    parser.add_argument("--epochs", type=int, default=None, help="posterior epochs (default: the library's)")
    parser.add_argument("--learning-rate", type=float, default=None,
                        help="the posterior stage's peak learning rate (default: the library's)")
    parser.add_argument("--ema-decay", type=float, default=None,
                        help="keep and use a moving average of the posterior network's weights (e.g. 0.999)")
    parser.add_argument("--samples", type=int, default=4000, help="posterior and NUTS draws")
    args = parser.parse_args()

    model = hierdsl.compile(os.path.join(EXAMPLES, "eight_schools.hsbi"))
    data = read_data(os.path.join(EXAMPLES, "eight_schools.csv"), model.ir)
    ref = reference_posterior(model, data.values, num_samples=args.samples, key=jax.random.key(0))

    training = lf.POSTERIOR_TRAINING.with_max_epochs(args.epochs) if args.epochs else lf.POSTERIOR_TRAINING
    training = dataclasses.replace(training, ema_decay=args.ema_decay,
                                   learning_rate=args.learning_rate or training.learning_rate)
    start = time.perf_counter()
    est = hierdsl.fit(model, budget=args.budget, key=jax.random.key(args.seed), strategy=lf.LF(posterior_training=training))
    fit_seconds = time.perf_counter() - start
    print(json.dumps({"epochs": training.max_epochs, "learning_rate": training.learning_rate,
                      "ema_decay": training.ema_decay, "seed": args.seed, "fit_s": round(fit_seconds),
                      "stages": {k: round(v, 1) for k, v in est.trained.seconds.items()},
                      "posterior_val_loss": round(est.trained.stages["posterior"].best_val_loss, 4),
                      "nuts_trusted": bool(ref.trusted)}), flush=True)

    draws = est.condition(data).sample(args.samples, key=jax.random.key(args.seed + 1))
    row = {}
    for name in ("mu", "tau", "theta"):
        ratio, error = compare(np.asarray(draws[name]), np.asarray(ref.samples[name]))
        row[name] = ({"sd_ratio": round(float(ratio[0]), 3), "error": round(float(error[0]), 3)} if ratio.size == 1
                     else {"sd_ratio_median": round(float(np.median(ratio)), 3),
                           "sd_ratio_range": [round(float(ratio.min()), 3), round(float(ratio.max()), 3)],
                           "abs_error_median": round(float(np.median(np.abs(error))), 3),
                           "abs_error_max": round(float(np.abs(error).max()), 3)})
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
