"""Benchmark: speed of the posterior network — training throughput, sampling latency, and the cost
of one optimiser step as the number of sites grows (blockwise vs dense attention).

Prints Markdown tables; every figure is measured in the same run on JAX's default device (CPU or
GPU, unchanged). Times are medians of a few calls after `block_until_ready`; compilation is timed
separately and excluded unless a column says otherwise. Measures only: nothing is asserted.

1. A 50-site model (Gaussian Linear; SIR with `--sir`), default `lf.NetworkConfig()` and
   `lf.TrainConfig()`: optimiser steps per second through `runtime.train.train` with an
   `lf.SiteSubsets` generator over a pool of prior simulations (one compiled epoch of
   `steps_per_epoch` steps plus its validation pass, timed from epoch to epoch); then the time to
   draw 2,000 posterior samples (`--samples`) through `Estimator.condition(...).sample`, first call (compilation
   included) and second call (new key), with untrained networks (weights do not change the cost of
   a fixed-step solve).
2. Gaussian Linear at each of `--sites` × {blockwise, dense}: one jitted optimiser step (flow-matching
   loss, gradient, clipped AdamW update) of the default posterior network on 32 full data sets:
   ms per step and XLA's compiled memory figures. A step whose memory estimate exceeds what the
   device has is reported as OOM instead of run.

    python benchmarks/speed.py [--quick] [--sites 10,100,1000] [--max-dense-sites 1000] [--sir]
                               [--samples 2000] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from typing import TextIO

import equinox as eqx
import jax
import jax.random as jr
import numpy as np
import optax

import hierdsl
from hierdsl.data import data_variables
from hierdsl.inference import POSTERIOR_SAMPLER, Estimator, lower
from hierdsl.runtime import lf
from hierdsl.runtime.flow import FlowData, flow_matching_loss
from hierdsl.runtime.nn import TokenVectorField
from hierdsl.runtime.tokens import TokenLayout, Tokens, TokenSplit
from hierdsl.runtime.train import train

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
POOL_SIZE = 256  # prior data sets the training generator draws from; the step cost does not depend on it
STEP_BATCH = 32  # data sets per optimiser step in the site-scaling table


@dataclasses.dataclass(frozen=True)
class Report:
    """Prints lines as they are measured, and mirrors them to `--out` (flushed per line, so a run cut
    short by a time limit still leaves what it measured)."""

    file: TextIO | None

    def line(self, text: str = "") -> None:
        print(text, flush=True)
        if self.file:
            self.file.write(text + "\n")
            self.file.flush()


# ----------------------------------------------------------------------------- measurement helpers


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """The median wall time of `repeats` calls of `fn`, each waited for with `block_until_ready`."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def device_memory_bytes() -> int | None:
    """What a compiled program may use: the accelerator's allocator limit, or free host memory on CPU."""
    stats = jax.devices()[0].memory_stats()
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def is_oom(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, MemoryError) or "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def mib(num_bytes: int | None) -> str:
    return "n/a" if not num_bytes else f"{num_bytes / 2**20:,.1f}"


# ----------------------------------------------------------------------------- data


def prior_tokens(model: hierdsl.Model, num: int, key) -> tuple[lf.Normaliser, Tokens]:
    """`num` full prior simulations of the model's sites, as normalised posterior tokens."""
    lowered = lower(model)
    num_sites = model.ir.num_sites
    k_sim, k_deq = jr.split(key)
    sims = lf.simulate_full(lowered, k_sim, num, num_sites, lf.SimulationCounter())
    layout = TokenLayout.from_ir(model.ir, max_sites=num_sites)
    raw = lf.encode_batch(layout, lf.flow_values_batch(lowered, sims, k_deq), num_sites)
    normaliser = lf.Normaliser.fit(raw)
    return normaliser, normaliser.forward(raw)


def observed_data(model: hierdsl.Model, key) -> dict[str, np.ndarray]:
    """One prior simulation's data variables (observations and drawn inputs), with a site axis."""
    sims = model.simulate(key)
    return {v.name: np.asarray(sims[v.name]) for v in data_variables(model.ir)}


# ----------------------------------------------------------------------------- section 1


@dataclasses.dataclass(frozen=True)
class FiftySites:
    """Section 1's figures for one model (seconds)."""

    name: str
    attention: str
    tokens: int
    first_epoch_s: float
    epoch_s: float
    steps_per_epoch: int
    batch_size: int
    first_sample_s: float
    second_sample_s: float


def fifty_sites(path: str, num_sites: int, epochs: int, steps_per_epoch: int, num_samples: int, key) -> FiftySites:
    """Training throughput and sampling latency of the default posterior network for one model."""
    model = hierdsl.compile(path, args={"n_sites": num_sites})
    k_pool, k_val, k_net, k_train, k_data, k_first, k_second = jr.split(key, 7)
    normaliser, pool = prior_tokens(model, POOL_SIZE, k_pool)
    layout = TokenLayout.from_ir(model.ir, max_sites=num_sites)
    split = lf.posterior_split(layout, lower(model))
    config, network_config = lf.TrainConfig(), lf.NetworkConfig()
    generator = lf.SiteSubsets(pool, layout, split, batch_size=config.batch_size, min_sites=1)
    validation = lf.SiteSubsets(pool, layout, split, batch_size=config.batch_size, min_sites=1)(k_val)
    network = network_config.build(layout, k_net)

    # `train` reads the losses back once per epoch and then calls `on_epoch`: the time between two
    # calls is one compiled epoch (its steps and the validation pass); the first includes compiling.
    stamps = [time.perf_counter()]
    train(TokenVectorField(network, split), generator, k_train, validation_data=validation,
          optimiser=config.optimiser(), batch_size=config.batch_size, steps_per_epoch=steps_per_epoch,
          max_epochs=1 + epochs, patience=1 + epochs, on_epoch=lambda *_: stamps.append(time.perf_counter()))
    durations = np.diff(stamps)

    trained = lf.Trained(normaliser, network, None, num_sites, 0, {}, {})
    posterior = Estimator(model, lf.LF(), 0, trained).condition(observed_data(model, k_data))
    first = median_seconds(lambda: posterior.sample(num_samples, key=k_first), 1)
    second = median_seconds(lambda: posterior.sample(num_samples, key=k_second), 1)
    return FiftySites(model.name, network.attention, layout.num_global_tokens + num_sites * layout.tokens_per_site,
                      float(durations[0]), float(np.median(durations[1:])), steps_per_epoch, config.batch_size,
                      first, second)


def fifty_sites_header(num_samples: int) -> tuple[str, str]:
    columns = ("model", "tokens", "attention (auto)", "steps / s", "data sets / s", "first epoch, compile incl. (s)",
               f"{num_samples:,} samples, first call (s)", "second call (s)", "first / second")
    return "| " + " | ".join(columns) + " |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"


def fifty_sites_row(r: FiftySites) -> str:
    steps = r.steps_per_epoch / r.epoch_s
    return (f"| {r.name} | {r.tokens} | {r.attention} | {steps:,.1f} | {steps * r.batch_size:,.0f} | "
            f"{r.first_epoch_s:,.1f} | {r.first_sample_s:,.2f} | {r.second_sample_s:,.2f} | "
            f"{r.first_sample_s / r.second_sample_s:,.1f} |")


# ----------------------------------------------------------------------------- section 2


@dataclasses.dataclass(frozen=True)
class StepProblem:
    """Gaussian Linear at one site count: its layout, posterior split and a training batch."""

    num_sites: int
    layout: TokenLayout
    split: TokenSplit
    data: FlowData

    @staticmethod
    def build(num_sites: int, key) -> StepProblem:
        model = hierdsl.compile(os.path.join(EXAMPLES, "gaussian_linear.hsbi"), args={"n_sites": num_sites})
        _, tokens = prior_tokens(model, STEP_BATCH, key)
        layout = TokenLayout.from_ir(model.ir, max_sites=num_sites)
        split = lf.posterior_split(layout, lower(model))
        # Every site real: the most work a batch of this shape can hold.
        return StepProblem(num_sites, layout, split, lf.flow_data(split, layout, tokens))


def step_cost(problem: StepProblem, attention: str, repeats: int, key) -> dict:
    """Compile one optimiser step of the default posterior network with `attention`; return its
    compile time, XLA memory figures and (unless it would not fit) the median time per step."""
    k_net, k_loss = jr.split(key)
    data = problem.data
    network = dataclasses.replace(lf.NetworkConfig(), attention=attention).build(problem.layout, k_net)
    params, static = eqx.partition(TokenVectorField(network, problem.split), eqx.is_inexact_array)
    optimiser = lf.TrainConfig().optimiser()
    opt_state = optimiser.init(params)

    def step(params, opt_state, data, key):
        loss, grads = jax.value_and_grad(lambda p: flow_matching_loss(eqx.combine(p, static), data, key))(params)
        updates, opt_state = optimiser.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    start = time.perf_counter()
    compiled = jax.jit(step).lower(params, opt_state, data, k_loss).compile()
    result = {"compile_s": time.perf_counter() - start}
    stats = compiled.memory_analysis()
    if stats is not None:
        result["temp"] = stats.temp_size_in_bytes
        result["total"] = (stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes
                           - stats.alias_size_in_bytes)
        # XLA:CPU fills in a peak below its own temp figure, so it is shown for accelerators only.
        if jax.default_backend() != "cpu":
            result["peak"] = getattr(stats, "peak_memory_in_bytes", 0)
    available = device_memory_bytes()
    if available is not None and result.get("total", 0) > available:
        result["oom"] = f"OOM (needs {mib(result['total'])} MiB, {mib(available)} available)"
        return result

    state = [params, opt_state]

    def one_step():
        # Feed each step the previous one's weights, as training does.
        state[0], state[1], loss = compiled(state[0], state[1], data, k_loss)
        return loss

    jax.block_until_ready(one_step())  # first execution: allocation and autotuning, not timed
    result["step_s"] = median_seconds(one_step, repeats)
    return result


def report_step_costs(report: Report, sites: list[int], max_dense_sites: int, repeats: int, key) -> None:
    report.line(f"### 2. One optimiser step as sites grow (Gaussian Linear, batch {STEP_BATCH} full data sets)")
    report.line()
    report.line("Memory: XLA's compiled estimate; total = temp + arguments + outputs (weights, optimiser "
                "state, batch). Peak: XLA's `peak_memory_in_bytes` (accelerators only; n/a on CPU).")
    report.line()
    report.line("| sites | tokens | attention | ms / step | compile (s) | temp (MiB) | total (MiB) | peak (MiB) |")
    report.line("|---:|---:|---|---:|---:|---:|---:|---:|")
    for num_sites in sites:
        problem = StepProblem.build(num_sites, jr.fold_in(key, num_sites))
        tokens = problem.layout.num_global_tokens + num_sites * problem.layout.tokens_per_site
        for attention in ("blockwise", "dense"):
            prefix = f"| {num_sites} | {tokens} | {attention} |"
            if attention == "dense" and num_sites > max_dense_sites:
                report.line(f"{prefix} skipped (`--max-dense-sites {max_dense_sites}`) | | | | |")
                continue
            try:
                r = step_cost(problem, attention, repeats, jr.fold_in(key, num_sites))
            except Exception as exc:  # only out-of-memory is reported; anything else is re-raised
                if not is_oom(exc):
                    raise
                report.line(f"{prefix} OOM | | | | |")
                continue
            timing = r["oom"] if "oom" in r else f"{r['step_s'] * 1e3:,.1f}"
            report.line(f"{prefix} {timing} | {r['compile_s']:,.1f} | {mib(r.get('temp'))} | "
                        f"{mib(r.get('total'))} | {mib(r.get('peak'))} |")
    report.line()


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats, sites 10,100 (unless --sites is given)")
    parser.add_argument("--sites", type=lambda s: [int(x) for x in s.split(",")], default=None,
                        help="site counts for the scaling table (default 10,100,1000; --quick: 10,100)")
    parser.add_argument("--max-dense-sites", type=int, default=1000,
                        help="skip dense attention above this many sites")
    parser.add_argument("--sir", action="store_true", help="also time SIR at 50 sites in section 1")
    parser.add_argument("--skip-fifty", action="store_true", help="only the scaling table (section 2)")
    parser.add_argument("--steps-per-epoch", type=int, default=lf.TrainConfig().steps_per_epoch)
    parser.add_argument("--samples", type=int, default=2000, help="posterior samples per sampling call")
    parser.add_argument("--out", help="also write the Markdown to this file")
    args = parser.parse_args()
    with open(args.out, "w", encoding="utf-8") if args.out else contextlib.nullcontext() as out:
        run(args, Report(out))


def run(args: argparse.Namespace, report: Report) -> None:
    """Measure every section (see the module docstring) and report it as it is measured."""
    sites = args.sites or ([10, 100] if args.quick else [10, 100, 1000])
    repeats = 3 if args.quick else 5  # optimiser steps timed per configuration (section 2)
    epochs = 2 if args.quick else 3  # epochs timed after the compiling one (section 1)
    started = time.perf_counter()
    device = jax.devices()[0]
    report.line("## hierdsl speed benchmark")
    report.line()
    report.line(f"- command: `python {shlex.join(sys.argv)}`")
    report.line(f"- JAX {jax.__version__}, backend `{jax.default_backend()}`, device `{device.device_kind}` "
                f"({jax.device_count()} device(s); {os.cpu_count()} host CPUs)")
    net, cfg = lf.NetworkConfig(), lf.TrainConfig()
    report.line(f"- posterior network: width {net.width}, depth {net.depth}, {net.num_heads} heads; "
                f"training batch {cfg.batch_size}, {args.steps_per_epoch} steps per epoch; sampler "
                f"{POSTERIOR_SAMPLER.solver} × {POSTERIOR_SAMPLER.num_steps} steps")
    report.line(f"- medians of {epochs} epochs (section 1) and {repeats} steps (section 2) after compilation")
    report.line()

    key = jr.key(0)
    if not args.skip_fifty:
        models = [os.path.join(EXAMPLES, "gaussian_linear.hsbi")]
        if args.sir:
            models.append(os.path.join(EXAMPLES, "sir.hsbi"))
        report.line("### 1. Training throughput and sampling latency at 50 sites, default networks")
        report.line()
        for text in fifty_sites_header(args.samples):
            report.line(text)
        for i, path in enumerate(models):
            row = fifty_sites(path, 50, epochs, args.steps_per_epoch, args.samples, jr.fold_in(key, i))
            report.line(fifty_sites_row(row))
        report.line()
    report_step_costs(report, sites, args.max_dense_sites, repeats, jr.fold_in(key, 100))
    report.line(f"Total wall time: {time.perf_counter() - started:,.0f} s")


if __name__ == "__main__":
    main()
