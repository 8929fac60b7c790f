"""Estimator files (`.hsbe`): a JSON header and the network weights, no pickle.

Layout::

    b"HSBE" + version byte + b"\\n"     magic (6 bytes)
    8 bytes, little-endian              header length
    header                              UTF-8 JSON: versions, model IR (and its hash), settings,
                                        training log, payload length and SHA-256
    payload                             `equinox.tree_serialise_leaves` of (normaliser,
                                        posterior network, surrogate network or nothing[,
                                        posterior preconditioner][, globals preconditioner],
                                        each preconditioner where the header lists one)

Loading checks the magic, the header, the payload's length and checksum, and (when a model is
given) that the model's IR hash matches; each failure is a clear `CheckpointError` naming the file.
Writes are atomic.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import struct
from typing import Any, Callable, Mapping, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

from hierdsl import __version__
from hierdsl.compiler.ast import Span
from hierdsl.compiler.errors import HsbiError, error
from hierdsl.compiler.ir import ModelIR
from hierdsl.files import atomic_write

MAGIC = b"HSBE\x01\n"
FORMAT_VERSION = 1


class CheckpointError(HsbiError):
    """An estimator file that cannot be used."""


def _fail(path: str, message: str, label: str = "") -> CheckpointError:
    return CheckpointError([error(message, Span(path, 0, 0, 0, 0), label)])


def _strategy_json(strategy) -> dict:
    return {"name": strategy.name, **dataclasses.asdict(strategy)}


def _strategy_from_json(obj: dict):
    from hierdsl.runtime import lf

    obj = dict(obj)
    name = obj.pop("name")
    if isinstance(obj.get("sampler"), dict):
        # Files written before the setting existed synthesised their data with evenly spaced steps.
        obj["sampler"] = {"time_power": 1.0, **obj["sampler"]}
    cls = {"lf": lf.LF, "direct": lf.Direct}[name]
    nested = {"surrogate": lf.NetworkConfig, "posterior": lf.NetworkConfig,
              "surrogate_training": lf.TrainConfig, "posterior_training": lf.TrainConfig,
              "sampler": lf.SamplerConfig, "preconditioner": lf.PreconditionerConfig,
              "globals_preconditioner": lf.PreconditionerConfig}
    kwargs = {k: (nested[k](**v) if k in nested and isinstance(v, dict) else v) for k, v in obj.items()}
    # Files written before the fields existed drew their site counts uniformly and gave the
    # posterior network the locals as they are (centred).
    kwargs.setdefault("all_sites_fraction", 0.0)
    kwargs.setdefault("noncentred", False)
    if cls is lf.LF:
        # Files from before these settings existed were trained without them.
        kwargs.setdefault("surrogates", 1)
        kwargs.setdefault("precondition", None)
        # Files from before the network preconditioner wrote a flag, and theirs was linear.
        if isinstance(kwargs["precondition"], bool):
            kwargs["precondition"] = "linear" if kwargs["precondition"] else None
    return cls(**kwargs)


def _network_shape(net) -> Optional[dict]:
    if net is None:
        return None
    mlp = net.mlp
    return {"features": int(mlp.in_size), "observations": int(net.observations), "width": int(mlp.width_size),
            "depth": int(mlp.depth)}


def save_estimator(path: str, estimator) -> None:
    """Write an estimator atomically."""
    trained = estimator.trained
    buffer = io.BytesIO()
    leaves = (trained.normaliser, trained.posterior, trained.surrogate)
    pre, globals_pre = trained.posterior_preconditioner, trained.globals_preconditioner
    # The preconditioners' weights, those that exist, follow the surrogate's in this order.
    eqx.tree_serialise_leaves(buffer, (*leaves, *(p for p in (pre, globals_pre) if p is not None)))
    payload = buffer.getvalue()
    header = {
        "format": "hsbe",
        "format_version": FORMAT_VERSION,
        "hierdsl_version": __version__,
        "jax_version": jax.__version__,
        "equinox_version": eqx.__version__,
        "model_name": estimator.model.ir.name,
        "model_hash": estimator.model.ir.hash,
        "model_ir": estimator.model.ir.to_json(spans=False),
        "strategy": _strategy_json(estimator.strategy),
        "budget": estimator.budget,
        "max_sites": trained.max_sites,
        "simulator_calls": trained.simulator_calls,
        "seconds": trained.seconds,
        "stages": {k: dataclasses.asdict(v) for k, v in trained.stages.items()},
        "truncation": trained.truncation.to_json() if trained.truncation is not None else None,
        "normaliser_shapes": {
            "globals": int(trained.normaliser.global_mean.shape[0]),
            "tokens": int(trained.normaliser.site_mean.shape[0]),
            "coords": int(trained.normaliser.coord_mean.shape[0]),
            "squash": True,  # the heavy-tail flags follow the six affine arrays
            # the preconditioned observation tokens; their two weight matrices follow the flags
            "observed": list(trained.normaliser.observed),
            # with a network preconditioner, its size (it follows the flags in place of the weights)
            "observed_network": _network_shape(trained.normaliser.observed_net),
        },
        # with the posterior's preconditioner (`LF.posterior_precondition`), its token positions and
        # network size; its weights follow the surrogate's
        "posterior_preconditioner": None if pre is None else {
            "targets": list(pre.targets), "features": list(pre.features), "network": _network_shape(pre.net)},
        # with the globals' preconditioner (`LF.globals_precondition`), its data token positions and
        # size; its weights follow
        "globals_preconditioner": None if globals_pre is None else {
            "features": list(globals_pre.features), "globals": int(globals_pre.head.out_size) // 2,
            "width": int(globals_pre.encoder.width_size), "depth": int(globals_pre.encoder.depth)},
        "payload_bytes": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
    }
    head = json.dumps(header, sort_keys=True).encode("utf-8")
    atomic_write(path, MAGIC + struct.pack("<Q", len(head)) + head + payload)


def read_header(path: str) -> tuple[dict, bytes]:
    """The header and payload of an estimator file, after checking both are intact."""
    try:
        with open(path, "rb") as handle:
            blob = handle.read()
    except FileNotFoundError:
        raise _fail(path, f"estimator file `{path}` not found") from None
    except OSError as exc:
        raise _fail(path, f"cannot read estimator file `{path}`: {exc}") from None
    if not blob.startswith(MAGIC[:4]):
        raise _fail(path, f"`{path}` is not a hierdsl estimator file", "estimator files start with HSBE")
    if blob[:len(MAGIC)] != MAGIC:
        raise _fail(path, f"`{path}` has an unsupported estimator format version",
                    f"this hierdsl reads version {FORMAT_VERSION}")
    if len(blob) < len(MAGIC) + 8:
        raise _fail(path, f"estimator file `{path}` is truncated")
    (length,) = struct.unpack("<Q", blob[len(MAGIC):len(MAGIC) + 8])
    start = len(MAGIC) + 8
    if len(blob) < start + length:
        raise _fail(path, f"estimator file `{path}` is truncated (its header is incomplete)")
    try:
        header = json.loads(blob[start:start + length].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _fail(path, f"estimator file `{path}` is corrupt (its header is not valid JSON)") from None
    payload = blob[start + length:]
    if len(payload) != header.get("payload_bytes"):
        raise _fail(path, f"estimator file `{path}` is truncated or has extra bytes "
                    f"({len(payload)} weight bytes, expected {header.get('payload_bytes')})")
    if hashlib.sha256(payload).hexdigest() != header.get("payload_sha256"):
        raise _fail(path, f"estimator file `{path}` is corrupt (the weights' checksum does not match)")
    return header, payload


def load(path: str, model=None, *, functions: Optional[Mapping[str, Callable]] = None):
    """Load an estimator. With `model` (a compiled `Model`), check it is the model it was trained for;
    without, rebuild the model from the IR stored in the file (externs need `functions`)."""
    from hierdsl.inference import Estimator
    from hierdsl.model import Model
    from hierdsl.runtime import lf
    from hierdsl.runtime.tokens import TokenLayout

    header, payload = read_header(path)
    if model is not None and model.ir.hash != header["model_hash"]:
        raise _fail(path, f"estimator `{path}` was trained for a different model",
                    f"it is for model `{header['model_name']}` (IR hash {header['model_hash'][:12]}), "
                    f"this model is `{model.ir.name}` (IR hash {model.ir.hash[:12]}); retrain, or pass the "
                    "model file it was trained on")
    if model is None:
        ir = ModelIR.from_json(header["model_ir"])
        model = Model(ir, functions=dict(functions or {}))
    strategy = _strategy_from_json(header["strategy"])
    max_sites = int(header["max_sites"])
    shapes = header["normaliser_shapes"]
    zeros = lambda n: jnp.zeros((n,), jnp.float32)
    affine = (zeros(shapes["globals"]), zeros(shapes["globals"]), zeros(shapes["tokens"]), zeros(shapes["tokens"]),
              zeros(shapes["coords"]), zeros(shapes["coords"]))
    squash = (zeros(shapes["globals"]), zeros(shapes["tokens"]))
    # Files written before heavy-tailed tokens were squashed hold the six affine arrays only.
    normaliser = lf.Normaliser(*affine, *squash) if shapes.get("squash") else affine
    observed = tuple(int(i) for i in shapes.get("observed", ()))
    network = shapes.get("observed_network")
    if network:
        net = lf.Preconditioner(network["features"], network["observations"], network["width"], network["depth"],
                                jr.key(0))
        normaliser = lf.Normaliser(*affine, *squash, observed=observed, observed_net=net)
    elif observed:
        features = shapes["globals"] + shapes["tokens"] - len(observed) + 1
        weights = jnp.zeros((features, len(observed)), jnp.float32)
        normaliser = lf.Normaliser(*affine, *squash, weights, weights, observed)
    layout = TokenLayout.from_ir(model.ir, max_sites=max_sites)
    posterior = strategy.posterior.build(layout, jr.key(0))
    surrogate = None
    if isinstance(strategy, lf.LF):
        layout1 = TokenLayout.from_ir(model.ir, max_sites=1)
        surrogate = tuple(strategy.surrogate.build(layout1, jr.key(0)) for _ in range(strategy.surrogates))
    like = (normaliser, posterior, surrogate)
    pre = header.get("posterior_preconditioner")
    if pre:
        network = pre["network"]
        net = lf.Preconditioner(network["features"], network["observations"], network["width"], network["depth"],
                                jr.key(0))
        like = (*like, lf.PosteriorPreconditioner(net, tuple(pre["targets"]), tuple(pre["features"])))
    globals_pre = header.get("globals_preconditioner")
    if globals_pre:
        like = (*like, lf.GlobalsPreconditioner(tuple(globals_pre["features"]), globals_pre["globals"],
                                                globals_pre["width"], globals_pre["depth"], jr.key(0)))
    try:
        normaliser, posterior, surrogate, *rest = eqx.tree_deserialise_leaves(io.BytesIO(payload), like)
    except Exception as exc:  # a payload that does not fit the networks the header describes
        raise _fail(path, f"estimator file `{path}` does not match the networks its header describes: {exc}") from None
    posterior_preconditioner = rest.pop(0) if pre else None
    globals_preconditioner = rest.pop(0) if globals_pre else None
    if not isinstance(normaliser, lf.Normaliser):
        normaliser = lf.Normaliser(*normaliser, *squash)
    stages = {k: lf.StageLog(**v) for k, v in header["stages"].items()}
    truncation = lf.Truncation.from_json(header["truncation"]) if header.get("truncation") else None
    trained = lf.Trained(normaliser, posterior, surrogate, max_sites, int(header["simulator_calls"]), stages,
                         dict(header["seconds"]), truncation=truncation, posterior_preconditioner=posterior_preconditioner,
                         globals_preconditioner=globals_preconditioner)
    return Estimator(model, strategy, int(header["budget"]), trained)


def describe(header: Mapping[str, Any]) -> str:
    return (f"estimator for model {header['model_name']} ({header['strategy']['name']}, budget {header['budget']}, "
            f"up to {header['max_sites']} sites), hierdsl {header['hierdsl_version']}")


class PartialRun:
    """Finished stages of a `hierdsl train` run, kept beside its output (`OUT.partial/`) so that an
    interrupted run resumes where it stopped. A run resumes only with the same model, settings,
    budget and seed (its fingerprint); otherwise the folder is started afresh."""

    def __init__(self, output: str, fingerprint: Mapping[str, Any]):
        import os

        self.folder = output + ".partial"
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
        meta = os.path.join(self.folder, "meta.json")
        self.resumed = False
        if os.path.isfile(meta):
            try:
                with open(meta, encoding="utf-8") as handle:
                    self.resumed = json.load(handle) == self.fingerprint
            except (OSError, json.JSONDecodeError):
                self.resumed = False
            if not self.resumed:
                self.clear()
        os.makedirs(self.folder, exist_ok=True)
        atomic_write(meta, json.dumps(self.fingerprint, sort_keys=True))

    def _path(self, name: str) -> str:
        import os

        return os.path.join(self.folder, name)

    def load_arrays(self, stage: str):
        import numpy as np

        path = self._path(stage + ".npz")
        try:
            with np.load(path, allow_pickle=False) as archive:
                return {name: archive[name] for name in archive.files}
        except (OSError, ValueError):
            return None

    def save_arrays(self, stage: str, arrays: dict) -> None:
        import numpy as np

        buffer = io.BytesIO()
        np.savez(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
        atomic_write(self._path(stage + ".npz"), buffer.getvalue())

    def load_modules(self, stage: str, like):
        try:
            with open(self._path(stage + ".json"), encoding="utf-8") as handle:
                info = json.load(handle)
            with open(self._path(stage + ".eqx"), "rb") as handle:
                blob = handle.read()
            if hashlib.sha256(blob).hexdigest() != info.pop("__sha256__"):
                return None
            return eqx.tree_deserialise_leaves(io.BytesIO(blob), like), info
        except (OSError, ValueError, KeyError, json.JSONDecodeError, RuntimeError):
            return None

    def save_modules(self, stage: str, modules, info: dict) -> None:
        buffer = io.BytesIO()
        eqx.tree_serialise_leaves(buffer, modules)
        blob = buffer.getvalue()
        atomic_write(self._path(stage + ".eqx"), blob)
        atomic_write(self._path(stage + ".json"), json.dumps({**info, "__sha256__": hashlib.sha256(blob).hexdigest()}))

    def clear(self) -> None:
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)
