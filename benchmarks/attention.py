"""Benchmark: blockwise vs dense hierarchical attention in the TFMPE network (tokens → velocities).

For a bundled example's posterior network (all parameters targets, observations and inputs
conditioning; Gaussian Linear unless `--model` says otherwise), times a training-step-like
forward + backward pass of `TokenVectorField` over a batch, and reads XLA's memory estimate of the
compiled step, for several site counts (the model's `n_sites` argument). Runs on JAX's default
device; prints a Markdown table. Measures only: nothing is asserted. `lf.NetworkConfig`'s
"auto" attention picks dense up to `lf.DENSE_ATTENTION_MAX_TOKENS` tokens from these figures.

    python benchmarks/attention.py [--model examples/sir.hsbi] [--sites 10 100 1000] [--batch 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import hierdsl
from hierdsl.runtime import lf
from hierdsl.runtime.nn import TokenTransformer, TokenVectorField
from hierdsl.runtime.tokens import TokenLayout, Tokens

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def measure(model_file: str, num_sites: int, attention: str, args: argparse.Namespace) -> tuple[int, float, dict[str, int]]:
    """Tokens per example, seconds per compiled step (after compilation), the step's memory figures."""
    model = hierdsl.compile(model_file, args={"n_sites": num_sites})
    layout = TokenLayout.from_ir(model.ir, max_sites=num_sites)
    split = lf.posterior_split(layout, model.lowered())
    network = TokenTransformer(layout, width=args.width, depth=args.depth, num_heads=args.heads,
                               attention=attention, key=jax.random.key(0))
    field = TokenVectorField(network, split)
    params, static = eqx.partition(field, eqx.is_array)

    rng = np.random.default_rng(0)
    sites, tokens, globals_ = layout.max_sites, layout.tokens_per_site, layout.num_global_tokens
    context = Tokens(jnp.asarray(rng.normal(size=(args.batch, globals_)), jnp.float32),
                     jnp.asarray(rng.normal(size=(args.batch, sites, tokens)), jnp.float32),
                     jnp.asarray(rng.uniform(size=(args.batch, sites, tokens, layout.coord_dims)), jnp.float32),
                     jnp.ones((args.batch, sites), jnp.float32))
    x = jax.vmap(lambda tk: split.gather(tk.global_values, tk.site_values))(context)
    t = jnp.asarray(rng.uniform(size=args.batch), dtype=x.dtype)

    def loss(params, t, x, context):
        velocity = jax.vmap(eqx.combine(params, static))(t, x, context)
        return jnp.mean(jnp.square(velocity - x))

    compiled = jax.jit(jax.value_and_grad(loss)).lower(params, t, x, context).compile()
    stats = compiled.memory_analysis()
    jax.block_until_ready(compiled(params, t, x, context))
    seconds = np.inf
    for _ in range(args.trials):  # best of several means: the least disturbed by other work
        start = time.perf_counter()
        for _ in range(args.repeats):
            jax.block_until_ready(compiled(params, t, x, context))
        seconds = min(seconds, (time.perf_counter() - start) / args.repeats)
    # XLA assigns a compiled program's buffers statically: temporaries plus arguments and outputs
    # (less what they alias) bound its footprint. Backends without the analysis return None.
    memory = {} if stats is None else {
        "temp": stats.temp_size_in_bytes,
        "buffers": stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes
        - stats.alias_size_in_bytes,
    }
    return globals_ + sites * tokens, seconds, memory


def mebibytes(num_bytes: int | None) -> str:
    return "n/a" if num_bytes is None else f"{num_bytes / 2**20:,.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.path.join(EXAMPLES, "gaussian_linear.hsbi"),
                        help="a model file with an n_sites argument (default: examples/gaussian_linear.hsbi)")
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--attention", nargs="+", default=["blockwise", "dense"], choices=["blockwise", "dense"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trials", type=int, default=3, help="report the best of this many timings")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    args = parser.parse_args()

    print(f"device: {jax.devices()[0]} · {os.path.basename(args.model)} · batch {args.batch} · width {args.width} · "
          f"depth {args.depth} · {args.heads} heads · forward+backward, best of {args.trials} means of "
          f"{args.repeats} calls after compilation\n")
    print("| sites | tokens | attention | ms / step | dense / blockwise | XLA temp (MiB) | XLA buffers (MiB) |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for num_sites in args.sites:
        times = {}
        for attention in args.attention:
            tokens, seconds, memory = measure(args.model, num_sites, attention, args)
            times[attention] = seconds
            ratio = (f"{times['dense'] / times['blockwise']:.2f}"
                     if attention == "dense" and "blockwise" in times else "")
            print(f"| {num_sites} | {tokens} | {attention} | {seconds * 1e3:,.1f} | {ratio} | "
                  f"{mebibytes(memory.get('temp'))} | {mebibytes(memory.get('buffers'))} |", flush=True)


if __name__ == "__main__":
    main()
