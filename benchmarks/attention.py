"""Benchmark: blockwise vs dense hierarchical attention in the TFMPE network (tokens → velocities).

For a Gaussian-Linear-like layout (one global scalar; a local and an observation per site), times a
training-step-like forward + backward pass of `TokenVectorField` over a batch, and reads XLA's
memory estimate of the compiled step, for several site counts. Runs on JAX's default device; prints a
Markdown table. Measures only: nothing is asserted.

    python benchmarks/attention.py [--sites 10 100 1000] [--batch 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from hierdsl.compiler.ir import E, ModelIR, Support, Variable
from hierdsl.runtime.nn import TokenTransformer, TokenVectorField
from hierdsl.runtime.tokens import TokenLayout


def gaussian_linear(num_sites: int) -> ModelIR:
    def variable(name: str, role: str) -> Variable:
        return Variable(name, role, True, E("lit", (), (0.0, "float")), (), "float", Support("real"))

    return ModelIR("GaussianLinear", (), "i", num_sites,
                   (variable("sigma", "global"), variable("mu", "local"), variable("x", "observation")))


def measure(num_sites: int, attention: str, args: argparse.Namespace) -> tuple[float, dict[str, int]]:
    """Seconds per compiled step (after compilation) and the compiled step's memory figures."""
    layout = TokenLayout.from_ir(gaussian_linear(num_sites), max_sites=num_sites)
    split = layout.split(target=("sigma", "mu"))
    network = TokenTransformer(layout, width=args.width, depth=args.depth, num_heads=args.heads,
                               attention=attention, key=jax.random.key(0))
    field = TokenVectorField(network, split)
    params, static = eqx.partition(field, eqx.is_array)

    rng = np.random.default_rng(0)
    data = {"sigma": rng.normal(size=args.batch), "mu": rng.normal(size=(args.batch, num_sites)),
            "x": rng.normal(size=(args.batch, num_sites))}
    context = jax.vmap(lambda v: layout.encode(v, num_sites))(data)
    x = jax.vmap(lambda tk: split.gather(tk.global_values, tk.site_values))(context)
    t = jnp.asarray(rng.uniform(size=args.batch), dtype=x.dtype)

    def loss(params, t, x, context):
        velocity = jax.vmap(eqx.combine(params, static))(t, x, context)
        return jnp.mean(jnp.square(velocity - x))

    compiled = jax.jit(jax.value_and_grad(loss)).lower(params, t, x, context).compile()
    stats = compiled.memory_analysis()
    jax.block_until_ready(compiled(params, t, x, context))
    start = time.perf_counter()
    for _ in range(args.repeats):
        jax.block_until_ready(compiled(params, t, x, context))
    seconds = (time.perf_counter() - start) / args.repeats
    # XLA assigns a compiled program's buffers statically: temporaries plus arguments and outputs
    # (less what they alias) bound its footprint. Backends without the analysis return None.
    memory = {} if stats is None else {
        "temp": stats.temp_size_in_bytes,
        "buffers": stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes
        - stats.alias_size_in_bytes,
    }
    return seconds, memory


def mebibytes(num_bytes: int | None) -> str:
    return "n/a" if num_bytes is None else f"{num_bytes / 2**20:,.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--attention", nargs="+", default=["blockwise", "dense"], choices=["blockwise", "dense"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    args = parser.parse_args()

    print(f"device: {jax.devices()[0]} · batch {args.batch} · width {args.width} · depth {args.depth} · "
          f"{args.heads} heads · forward+backward, mean of {args.repeats} calls after compilation\n")
    print("| sites | tokens | attention | ms / step | XLA temp (MiB) | XLA buffers (MiB) |")
    print("|---:|---:|---|---:|---:|---:|")
    for num_sites in args.sites:
        for attention in args.attention:
            seconds, memory = measure(num_sites, attention, args)
            print(f"| {num_sites} | {1 + 2 * num_sites} | {attention} | {seconds * 1e3:,.1f} | "
                  f"{mebibytes(memory.get('temp'))} | {mebibytes(memory.get('buffers'))} |", flush=True)


if __name__ == "__main__":
    main()
