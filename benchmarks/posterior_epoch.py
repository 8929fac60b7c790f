"""Benchmark: one real posterior training epoch of a bundled example, blockwise vs dense attention.

Builds the example's posterior network (default `lf.NetworkConfig` size) and times
`train`'s compiled epoch — `steps_per_epoch` optimiser steps on batches that `lf.SiteSubsets` draws
from a pool of standard-normal tokens, as the posterior stage does — alternating the two attention
modes in one process, so that both see the same machine. Prints the first epoch (compilation
included) and the median of the later ones. Measures only: nothing is asserted.

    python benchmarks/posterior_epoch.py examples/sir.hsbi --arg n_sites=10 [--epochs 4]
"""

from __future__ import annotations

import argparse
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import hierdsl
from hierdsl.cli import _parse_args
from hierdsl.runtime import lf
from hierdsl.runtime import train as training
from hierdsl.runtime.tokens import TokenLayout, Tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a .hsbi file")
    parser.add_argument("--arg", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per mode, the first compiles")
    parser.add_argument("--pool", type=int, default=3600, help="data sets in the pool")
    args = parser.parse_args()

    model = hierdsl.compile(args.model, args=_parse_args(args.arg))
    num_sites = model.ir.num_sites
    layout = TokenLayout.from_ir(model.ir, max_sites=num_sites)
    split = lf.posterior_split(layout, model.lowered())
    config = lf.POSTERIOR_TRAINING
    rng = np.random.default_rng(0)
    pool = Tokens(jnp.asarray(rng.normal(size=(args.pool, layout.num_global_tokens)), jnp.float32),
                  jnp.asarray(rng.normal(size=(args.pool, num_sites, layout.tokens_per_site)), jnp.float32),
                  jnp.zeros((args.pool, num_sites, layout.tokens_per_site, layout.coord_dims), jnp.float32),
                  jnp.ones((args.pool, num_sites), jnp.float32))
    batches = lf.SiteSubsets(pool, layout, split, config.batch_size, 1, lf.ALL_SITES_FRACTION)
    optimiser = config.optimiser(config.steps_per_epoch)

    states, seconds = {}, {}
    for mode in ("blockwise", "dense"):
        network = lf.NetworkConfig(attention=mode).build(layout, jr.key(0))
        field = lf._VF(network, split)
        states[mode] = training._State(field, optimiser.init(eqx.filter(field, eqx.is_inexact_array)), jr.key(1))
        seconds[mode] = []
    for _ in range(args.epochs):
        for mode in states:
            start = time.perf_counter()
            states[mode], loss = training._generator_epoch(states[mode], batches, optimiser, 1e-4,
                                                           config.steps_per_epoch)
            jax.block_until_ready(loss)
            seconds[mode].append(time.perf_counter() - start)

    tokens = layout.num_global_tokens + num_sites * layout.tokens_per_site
    print(f"device: {jax.devices()[0]} · {model.name}, {num_sites} sites, {tokens} tokens · "
          f"{config.steps_per_epoch} steps of batch {config.batch_size} per epoch\n")
    print("| attention | first epoch, compile incl. (s) | later epochs, median (s) |")
    print("|---|---:|---:|")
    for mode, times in seconds.items():
        print(f"| {mode} | {times[0]:.2f} | {np.median(times[1:]):.2f} |")
    print(f"\ndense / blockwise (later epochs): {np.median(seconds['dense'][1:]) / np.median(seconds['blockwise'][1:]):.2f}")


if __name__ == "__main__":
    main()
