"""Diagnostic: how well an estimator's globals preconditioner (`--globals-precondition`) fits.

Loads an estimator file trained with it and scores the preconditioner alone on fresh data sets:
each global's residual `(g - loc(D)) / scale(D)`, with g the data set's true (standardised) global,
should be standard normal. Scored on simulator data sets (what the estimator meets) and, for LF
estimators, on synthetic data sets drawn from the estimator's own surrogate (what it was fitted
to), at several site counts (each data set's first sites). An sd above 1 on both means the fit
itself is too narrow; above 1 on the simulator's only, the surrogate's error. Prints a Markdown
table; measures only, asserts nothing.

    python benchmarks/globals_residuals.py EST.hsbe [--sims 400] [--synthetic 200] [--sites 5 20 50] [--seed 0]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from hierdsl.checkpoint import load
from hierdsl.runtime import lf
from hierdsl.runtime.tokens import TokenLayout, Tokens


def residuals(preconditioner: lf.GlobalsPreconditioner, tokens: Tokens, sites: int) -> np.ndarray:
    """The globals' residuals given each data set's first `sites` sites (normalised tokens)."""
    num, max_sites = tokens.site_mask.shape
    mask = jnp.broadcast_to((jnp.arange(max_sites) < sites).astype(jnp.float32), (num, max_sites))
    subset = Tokens(tokens.global_values, tokens.site_values * mask[..., None], tokens.site_coords, mask)
    return np.asarray(preconditioner.precondition(subset).global_values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("estimator")
    parser.add_argument("--sims", type=int, default=400, help="simulator data sets")
    parser.add_argument("--synthetic", type=int, default=200, help="synthetic data sets (LF estimators only)")
    parser.add_argument("--sites", type=int, nargs="+", default=None, help="site counts (default: 5 and the most)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    estimator = load(args.estimator)
    preconditioner = estimator.trained.globals_preconditioner
    if preconditioner is None:
        raise SystemExit(f"{args.estimator} was trained without --globals-precondition")
    lowered, layout, max_sites = estimator.lowered, estimator.layout, estimator.max_sites
    k_sim, k_deq, k_pool = jax.random.split(jax.random.key(args.seed), 3)
    sims = lf.simulate_full(lowered, k_sim, args.sims, max_sites, lf.SimulationCounter())
    flow = lf.flow_values_batch(lowered, sims, k_deq, dequantise=False)  # as observed data are conditioned on
    if estimator.noncentred:
        real = jnp.ones((max_sites,), jnp.float32)
        flow = jax.vmap(lambda z: lf.noncentre(lowered, z, estimator.noncentred, real))(flow)
    normaliser = lf.posterior_normaliser(estimator.trained.normaliser, layout, estimator.noncentred)
    sources = {"simulator": normaliser.forward(lf.encode_batch(layout, flow, max_sites))}
    if estimator.trained.surrogate is not None and args.synthetic:
        layout1 = TokenLayout.from_ir(estimator.model.ir, max_sites=1)
        sources["synthetic"] = lf.synthetic_pool(
            lowered, estimator.trained.surrogate, lf.surrogate_split(layout1, lowered), estimator.trained.normaliser,
            k_pool, args.synthetic, max_sites, estimator.strategy.sampler, noncentred=estimator.noncentred)
    labels = [slot.name if slot.size == 1 else f"{slot.name}[{i + 1}]" for slot in layout.global_slots
              for i in range(slot.size)]
    print("| data sets | sites | global | residual mean | residual sd | share beyond ±1.645 (0.10) |")
    print("|---|---|---|---|---|---|")
    for source, tokens in sources.items():
        for sites in args.sites or (min(5, max_sites), max_sites):
            z = residuals(preconditioner, tokens, sites)
            for j, label in enumerate(labels):
                print(f"| {source} ({z.shape[0]}) | {sites} | {label} | {z[:, j].mean():.2f} | {z[:, j].std():.2f} "
                      f"| {np.mean(np.abs(z[:, j]) > 1.645):.2f} |")


if __name__ == "__main__":
    main()
