"""Benchmark: sequential rounds against one round, at the same simulation budget, on a posterior that
is a small part of its prior (where rounds are meant to help).

The model is conjugate, so its posterior is exact: a global mean with a wide prior, `n` sites with
one latent mean and one noisy observation each,

    mu ~ Normal(0, 20);  theta_i ~ Normal(mu, 1);  y_i ~ Normal(theta_i, 0.5),

observed at data drawn with mu = 13. Given y, mu's posterior sd is about 0.35 (1/57 of the prior's)
and each theta_i's about 0.45. Three estimators, all with the same budget and seed:

- one round, `--epochs` posterior epochs (the default training);
- one round, twice as many posterior epochs — the same training length as two rounds;
- `--rounds` rounds, `--epochs` each (the budget split over the rounds; each round after the first
  simulates single sites from the prior truncated to the current posterior's region).

Each is conditioned on the data and sampled; the table gives, against exact draws: mu's error of the
mean in posterior sds and its sd ratio; the thetas' mean absolute error of means and mean sd ratio;
C2ST on the joint and on mu alone (0.5 is perfect); and the wall time. Measures only: nothing is
asserted.

    python benchmarks/rounds.py [--budget 1000] [--epochs 80] [--rounds 2] [--sites 10] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import numpy as np

import hierdsl
from hierdsl.runtime import lf, metrics

SOURCE = """
model Narrow(n_sites::Int = 10)
    mu ~ Normal(0.0, 20.0)
    sites i in 1:n_sites
        theta ~ Normal(mu, 1.0)
        observe y ~ Normal(theta, 0.5)
    end
end
"""
PRIOR_SD, SITE_SD, NOISE_SD = 20.0, 1.0, 0.5
TRUE_MU = 13.0
NUM_DRAWS = 4000


def observed(n: int, rng: np.random.Generator) -> np.ndarray:
    theta = TRUE_MU + SITE_SD * rng.normal(size=n)
    return theta + NOISE_SD * rng.normal(size=n)


def exact_posterior(y: np.ndarray, num: int, rng: np.random.Generator) -> np.ndarray:
    """Exact joint draws `(num, 1 + n)`: mu, then theta_1..n."""
    marginal_var = SITE_SD ** 2 + NOISE_SD ** 2            # y_i | mu
    precision = 1 / PRIOR_SD ** 2 + y.size / marginal_var
    mu = y.sum() / marginal_var / precision + rng.normal(size=num) / np.sqrt(precision)
    site_precision = 1 / SITE_SD ** 2 + 1 / NOISE_SD ** 2  # theta_i | mu, y_i
    mean = (mu[:, None] / SITE_SD ** 2 + y[None, :] / NOISE_SD ** 2) / site_precision
    theta = mean + rng.normal(size=(num, y.size)) / np.sqrt(site_precision)
    return np.concatenate([mu[:, None], theta], axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=80, help="posterior epochs per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="budget 200, 4 epochs: checks the script runs")
    args = parser.parse_args()
    if args.quick:
        args.budget, args.epochs = 200, 4

    model = hierdsl.compile(SOURCE, args={"n_sites": args.sites})
    rng = np.random.default_rng(3)
    y = observed(args.sites, rng)
    reference = exact_posterior(y, NUM_DRAWS, rng)
    mu_mean, mu_sd = reference[:, 0].mean(), reference[:, 0].std()
    print(f"exact posterior: mu {mu_mean:.3f} ± {mu_sd:.3f} (prior sd {PRIOR_SD}); budget {args.budget}, "
          f"{args.sites} sites, seed {args.seed}\n", flush=True)
    print("| estimator | posterior epochs in all | mu: error / sd | mu: sd ratio | theta: error | theta: sd ratio "
          "| C2ST joint | C2ST mu | wall |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)

    for rounds, epochs in ((1, args.epochs), (1, args.rounds * args.epochs), (args.rounds, args.epochs)):
        training = dataclasses.replace(lf.POSTERIOR_TRAINING, max_epochs=epochs, patience=epochs)
        start = time.perf_counter()
        estimator = hierdsl.fit(model, budget=args.budget, key=jax.random.key(args.seed),
                                strategy=lf.LF(posterior_training=training), rounds=rounds, data={"y": y})
        draws = estimator.condition({"y": y}).sample(NUM_DRAWS, key=jax.random.key(args.seed + 1))
        wall = time.perf_counter() - start
        sample = np.concatenate([np.asarray(draws["mu"]).reshape(NUM_DRAWS, 1),
                                 np.asarray(draws["theta"]).reshape(NUM_DRAWS, args.sites)], axis=1)
        joint = metrics.c2st(reference, sample, jax.random.key(2))
        mu_only = metrics.c2st(reference[:, :1], sample[:, :1], jax.random.key(2))
        theta_error = np.abs(sample[:, 1:].mean(0) - reference[:, 1:].mean(0)).mean()
        theta_ratio = (sample[:, 1:].std(0) / reference[:, 1:].std(0)).mean()
        name = "one round" if rounds == 1 else f"{rounds} rounds of {args.budget // rounds} simulations"
        print(f"| {name} | {rounds * epochs} "
              f"| {abs(sample[:, 0].mean() - mu_mean) / mu_sd:.2f} | {sample[:, 0].std() / mu_sd:.2f} "
              f"| {theta_error:.3f} | {theta_ratio:.2f} | {joint:.3f} | {mu_only:.3f} | {wall:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
