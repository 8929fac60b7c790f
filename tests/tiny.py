"""Tiny networks and training settings, for tests whose subject is the plumbing, not accuracy."""

from __future__ import annotations

from hierdsl.runtime import lf

TINY_NET = lf.NetworkConfig(width=32, depth=1, num_heads=2)
TINY_TRAIN = lf.TrainConfig(batch_size=64, max_epochs=4, patience=4, steps_per_epoch=10)
TINY_LF = lf.LF(surrogate=TINY_NET, posterior=TINY_NET, surrogate_training=TINY_TRAIN,
                posterior_training=TINY_TRAIN, num_synthetic=64, sampler=lf.SamplerConfig(num_steps=4), surrogates=1,
                preconditioner=lf.PreconditionerConfig(width=16, depth=1, steps=100))
TINY_DIRECT = lf.Direct(posterior=TINY_NET, posterior_training=TINY_TRAIN)


def cli_trains_tiny_networks(monkeypatch) -> None:
    """Make `hierdsl train/infer` in this test train `TINY_LF` (or `TINY_DIRECT` for `--method
    direct`) instead of the default networks; every other option keeps its meaning."""
    from hierdsl import cli

    monkeypatch.setattr(cli, "_strategy", lambda ns: TINY_DIRECT if ns.method == "direct" else TINY_LF)
