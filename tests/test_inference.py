"""Inference: simulator-call accounting, save/load, refusing other models' files, resuming an
interrupted run (the CLI from data to netCDF is in test_end_to_end.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os

import jax
import numpy as np
import pytest

import hierdsl
from counting import CallCounter
from tiny import TINY_DIRECT, TINY_LF, cli_trains_tiny_networks
from hierdsl.checkpoint import CheckpointError, load
from hierdsl.cli import main
from hierdsl.runtime import lf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")

COUNTED = """
extern host function shift(mu::Real)::Real

model Counted(n_sites::Int = 4)
    sigma ~ HalfNormal(1.0)
    sites i in 1:n_sites
        mu ~ Normal(0.0, 1.0)
        observe x ~ Normal(shift(mu), sigma)
    end
end
"""


@pytest.fixture(scope="module")
def counted_lf():
    counter = CallCounter()
    model = hierdsl.compile(COUNTED, functions={"shift": counter})
    estimator = hierdsl.fit(model, budget=150, key=jax.random.key(0), strategy=TINY_LF)
    return model, estimator, counter


def test_lf_uses_exactly_the_budget_in_single_site_calls(counted_lf):
    _, estimator, counter = counted_lf
    assert counter.calls == 150
    assert estimator.simulator_calls == 150


def test_direct_uses_budget_over_sites_full_simulations():
    counter = CallCounter()
    model = hierdsl.compile(COUNTED, functions={"shift": counter})
    # With the posterior preconditioner (fitted to the simulations: no more calls).
    strategy = dataclasses.replace(TINY_DIRECT, posterior_precondition=True, globals_precondition=True,
                                   preconditioner=lf.PreconditionerConfig(width=16, depth=1, steps=100),
                                   globals_preconditioner=dataclasses.replace(lf.GLOBALS_PRECONDITIONER, width=16, depth=1, steps=100))
    estimator = hierdsl.fit(model, budget=150, key=jax.random.key(1), strategy=strategy)
    assert counter.calls == (150 // 4) * 4  # 37 simulations of 4 sites each
    assert estimator.simulator_calls == 148
    assert estimator.trained.posterior_preconditioner.targets == (0,)
    assert estimator.trained.globals_preconditioner.features == (1,)  # x, read by sigma's
    draws = estimator.condition({"x": np.array([0.5, -0.2, 1.0])}).sample(10, key=jax.random.key(3))
    assert draws["mu"].shape == (10, 3) and np.all(np.isfinite(draws["mu"]))


def test_training_and_sampling_functions_are_built_once_per_model(counted_lf):
    """Equal training settings share one optimiser (the compiled epoch keys on it), and every
    estimator of a model shares its compiled sampler: rounds and refits don't re-trace."""
    from hierdsl import inference

    model, estimator, _ = counted_lf
    config = lf.POSTERIOR_TRAINING
    assert config.optimiser(50) is dataclasses.replace(config).optimiser(50)
    assert config.optimiser(50) is not config.optimiser(40)
    again = inference.Estimator(model, estimator.strategy, estimator.budget, estimator.trained)
    assert again.lowered is estimator.lowered is model.lowered()
    sampler = inference.POSTERIOR_SAMPLER
    assert inference._sampler(again, sampler) is inference._sampler(estimator, sampler)


def test_posterior_shapes_fixed_key_and_fewer_sites(counted_lf):
    _, estimator, _ = counted_lf
    post = estimator.condition({"x": np.array([0.5, -0.2, 1.0])})  # 3 of at most 4 sites
    a = post.sample(50, key=jax.random.key(3))
    b = post.sample(50, key=jax.random.key(3))
    assert a["sigma"].shape == (50,) and a["mu"].shape == (50, 3)
    np.testing.assert_array_equal(a["mu"], b["mu"])
    assert np.all(a["sigma"] > 0)
    log_p = post.log_prob({k: v[:5] for k, v in a.items()})
    assert log_p.shape == (5,) and np.all(np.isfinite(log_p))
    with pytest.raises(hierdsl.HsbiError, match="at most 4"):
        estimator.condition({"x": np.zeros(5)})


def test_sample_each_matches_one_draw_per_data_set(counted_lf):
    model, est, _ = counted_lf
    rng = np.random.default_rng(3)
    data = {"x": rng.normal(size=(5, 3)).astype(np.float32)}  # 5 data sets of 3 sites
    key = jax.random.key(11)
    batched = est.sample_each(data, key=key)
    assert batched["sigma"].shape == (5,) and batched["mu"].shape == (5, 3)
    keys = jax.random.split(key, 5)
    for i in range(5):
        one = est.condition({"x": data["x"][i]}).sample(1, key=keys[i])
        np.testing.assert_allclose(batched["sigma"][i], one["sigma"][0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(batched["mu"][i], one["mu"][0], rtol=1e-4, atol=1e-5)


def test_save_load_gives_identical_samples(counted_lf, tmp_path):
    model, estimator, _ = counted_lf
    path = str(tmp_path / "est.hsbe")
    estimator.save(path)
    again = load(path, model)
    data = {"x": np.array([0.5, -0.2, 1.0, 0.1])}
    a = estimator.condition(data).sample(20, key=jax.random.key(7))
    b = again.condition(data).sample(20, key=jax.random.key(7))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert again.simulator_calls == 150
    assert [f for f in os.listdir(tmp_path)] == ["est.hsbe"]  # atomic: no temporary left behind
    # The posterior's preconditioners are opt-in: by default nothing is fitted and the file holds none.
    assert estimator.trained.posterior_preconditioner is None and again.trained.posterior_preconditioner is None
    assert estimator.trained.globals_preconditioner is None and again.trained.globals_preconditioner is None


def test_sampling_in_pieces_gives_the_same_draws_and_reports_progress(counted_lf, monkeypatch):
    """`Posterior.sample` integrates at most `sample_chunk` draws at a time (the last piece padded
    to the same shape) and reports after each; the draws are those of one piece, and those of
    `flow.sample` with the same key."""
    from hierdsl import inference
    from hierdsl.runtime.flow import sample as flow_sample
    from hierdsl.runtime.nn import TokenVectorField

    _, estimator, _ = counted_lf
    post = estimator.condition({"x": np.array([0.5, -0.2, 1.0])})
    whole = post.sample(20, key=jax.random.key(3))
    assert inference.sample_chunk(estimator.layout) == 512  # 4 sites × 2 tokens + 1 global: the cap
    monkeypatch.setattr(inference, "sample_chunk", lambda layout: 7)
    calls = []
    pieces = post.sample(20, key=jax.random.key(3), progress=lambda done, total: calls.append((done, total)))
    assert calls == [(7, 20), (14, 20), (20, 20)]
    assert pieces["sigma"].shape == (20,) and pieces["mu"].shape == (20, 3)
    for name in whole:
        np.testing.assert_allclose(pieces[name], whole[name], rtol=1e-5, atol=1e-6)
    # The same base draws as sampling the flow in one call: its first global, back in flow space.
    x = flow_sample(TokenVectorField(estimator.trained.posterior, estimator.split), post.context, post.mask,
                    jax.random.key(3), 20, **inference.POSTERIOR_SAMPLER.options())
    sigma = estimator.normaliser.inverse(estimator.split.scatter(post.context, x[0])).global_values
    z = post.unconstrained(whole)["sigma"]
    np.testing.assert_allclose(z[0], np.ravel(sigma)[0], rtol=1e-4, atol=1e-5)
    none = post.sample(0, key=jax.random.key(3))
    assert none["sigma"].shape == (0,) and none["mu"].shape == (0, 3)


def test_files_from_before_heavy_tail_squashing_load_with_affine_tokens(counted_lf, tmp_path):
    """An estimator file whose normaliser holds only the six affine arrays (written before heavy-
    tailed tokens were squashed) loads with no token squashed and samples as it did."""
    import hashlib
    import json
    import struct

    import equinox as eqx

    from hierdsl.checkpoint import MAGIC, read_header

    model, estimator, _ = counted_lf
    path = str(tmp_path / "new.hsbe")
    estimator.save(path)
    header, _ = read_header(path)
    trained = estimator.trained
    norm = trained.normaliser
    assert header["normaliser_shapes"]["squash"] and not np.any(np.asarray(norm.site_squash))
    buffer = io.BytesIO()
    affine = (norm.global_mean, norm.global_scale, norm.site_mean, norm.site_scale, norm.coord_mean, norm.coord_scale)
    eqx.tree_serialise_leaves(buffer, (affine, trained.posterior, trained.surrogate))
    payload = buffer.getvalue()
    del header["normaliser_shapes"]["squash"], header["normaliser_shapes"]["observed"]
    del header["strategy"]["precondition"], header["strategy"]["preconditioner"]
    del header["normaliser_shapes"]["observed_network"]
    header.update(payload_bytes=len(payload), payload_sha256=hashlib.sha256(payload).hexdigest())
    head = json.dumps(header, sort_keys=True).encode("utf-8")
    old_path = tmp_path / "old.hsbe"
    old_path.write_bytes(MAGIC + struct.pack("<Q", len(head)) + head + payload)
    old = load(str(old_path), model)
    assert not np.any(np.asarray(old.trained.normaliser.global_squash))
    assert old.trained.normaliser.observed == () and not old.strategy.precondition
    data = {"x": np.array([0.5, -0.2, 1.0, 0.1])}
    a = estimator.condition(data).sample(20, key=jax.random.key(7))
    b = old.condition(data).sample(20, key=jax.random.key(7))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_load_refuses_other_models_and_damaged_files(counted_lf, tmp_path):
    _, estimator, _ = counted_lf
    path = tmp_path / "est.hsbe"
    estimator.save(str(path))
    other = hierdsl.compile(os.path.join(EXAMPLES, "gaussian_linear.hsbi"))
    with pytest.raises(CheckpointError, match="trained for a different model"):
        load(str(path), other)
    blob = path.read_bytes()
    (tmp_path / "truncated.hsbe").write_bytes(blob[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load(str(tmp_path / "truncated.hsbe"))
    corrupt = bytearray(blob)
    corrupt[-10] ^= 0xFF
    (tmp_path / "corrupt.hsbe").write_bytes(bytes(corrupt))
    with pytest.raises(CheckpointError, match="checksum"):
        load(str(tmp_path / "corrupt.hsbe"))
    (tmp_path / "junk.hsbe").write_bytes(b"not an estimator")
    with pytest.raises(CheckpointError, match="not a hierdsl estimator"):
        load(str(tmp_path / "junk.hsbe"))


def test_cli_rejects_estimator_for_another_model(counted_lf, tmp_path):
    _, estimator, _ = counted_lf
    estimator.save(str(tmp_path / "est.hsbe"))
    (tmp_path / "d.csv").write_text("site,variable,index,value\nA,x,,0.5\n")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(["infer", os.path.join(EXAMPLES, "gaussian_linear.hsbi"), "--data", str(tmp_path / "d.csv"),
                       "--estimator", str(tmp_path / "est.hsbe"), "-o", str(tmp_path / "run")])
    assert status == 1 and "trained for a different model" in err.getvalue()


def test_interrupted_train_resumes_without_new_simulations(tmp_path, monkeypatch):
    from hierdsl.checkpoint import read_header

    model_file = os.path.join(EXAMPLES, "gaussian_linear.hsbi")
    out = str(tmp_path / "est.hsbe")
    args = ["train", model_file, "--arg", "n_sites=3", "--budget", "120", "--epochs", "2", "-o", out]

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    cli_trains_tiny_networks(monkeypatch)
    monkeypatch.setattr(lf, "synthetic_pool", interrupt)
    with contextlib.redirect_stderr(io.StringIO()):
        assert main(args) == 130
    assert not os.path.exists(out)
    assert sorted(os.listdir(out + ".partial")) == ["meta.json", "simulations.npz", "surrogate.eqx", "surrogate.json"]
    monkeypatch.undo()

    def no_simulations(*a, **k):
        raise AssertionError("a resumed run must not simulate again")

    cli_trains_tiny_networks(monkeypatch)
    monkeypatch.setattr(lf, "simulate_single_sites", no_simulations)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(args) == 0
    assert "reusing 120 simulator calls" in err.getvalue()
    assert "reusing the network trained by the interrupted run" in err.getvalue()
    assert "precondition: network location-scale fit of the observations" in err.getvalue()
    header, _ = read_header(out)
    assert header["simulator_calls"] == 120
    assert not os.path.exists(out + ".partial")


def test_cli_precondition_option_sets_the_strategy(tmp_path):
    from hierdsl.cli import _strategy, build_parser

    def strategy(*args):
        return _strategy(build_parser().parse_args(["train", "m.hsbi", "-o", "e.hsbe", *args]))

    assert strategy().precondition == lf.PRECONDITION == "network"
    assert strategy("--precondition", "off").precondition is None
    assert strategy("--precondition", "linear", "--epochs", "3").precondition == "linear"
    assert strategy().posterior_precondition is False
    assert strategy("--posterior-precondition").posterior_precondition is True
    assert strategy("--posterior-precondition", "--epochs", "3").posterior_precondition is True
    direct = strategy("--method", "direct", "--posterior-precondition")
    assert isinstance(direct, lf.Direct) and direct.posterior_precondition is True
    assert strategy().globals_precondition is False and direct.globals_precondition is False
    both = strategy("--globals-precondition", "--posterior-precondition", "--epochs", "3")
    assert both.globals_precondition is True and both.posterior_precondition is True
    direct = strategy("--method", "direct", "--globals-precondition")
    assert direct.globals_precondition is True and direct.posterior_precondition is False
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["train", os.path.join(EXAMPLES, "gaussian_linear.hsbi"), "--method", "direct",
                     "--precondition", "network", "-o", str(tmp_path / "e.hsbe")])
    assert code == 1 and "--precondition needs --method lf" in err.getvalue()
    assert not os.listdir(tmp_path)


SCALED = """
model Scaled(n::Int = 1)
    s ~ LogNormal(0.0, 0.7)
    sites i in 1:n
        theta ~ Normal(0.0, s)
        observe x ~ Normal(theta, 1.0)
    end
end
"""


def test_noncentred_posterior_density_integrates_to_one():
    """The posterior network works in u = θ / s (θ's scale reads the global s); the density it
    reports for (s, θ) carries the Jacobians of every map back (u → θ, the normaliser, s's log)
    and so integrates to 1 over a grid, whatever the (briefly trained) network learned."""
    model = hierdsl.compile(SCALED)
    estimator = hierdsl.fit(model, budget=200, key=jax.random.key(2), strategy=TINY_LF)
    assert estimator.noncentred == ("theta",)
    post = estimator.condition({"x": np.array([1.5])})
    log_s, theta = np.meshgrid(np.linspace(-3.5, 3.5, 71), np.linspace(-12.0, 12.0, 97), indexing="ij")
    points = {"s": np.exp(log_s).ravel(), "theta": theta.ravel()[:, None]}
    density = np.exp(post.log_prob(points)).reshape(log_s.shape) * np.exp(log_s)  # ds = s d(log s)
    mass = np.trapezoid(np.trapezoid(density, theta[0], axis=1), log_s[:, 0])
    print("mass", mass)
    assert mass == pytest.approx(1.0, abs=0.03)


def test_noncentred_locals_of_padded_sites_stay_finite():
    """A local whose scale is a per-site input: padded sites (input 0, scale 0) must not poison
    the draws or the density of the real ones."""
    model = hierdsl.compile("""
model Weighted(n::Int = 3)
    mu ~ Normal(0.0, 1.0)
    sites i in 1:n
        input w ~ Uniform(0.5, 2.0)
        theta ~ Normal(mu, w)
        observe x ~ Normal(theta, 1.0)
    end
end
""")
    estimator = hierdsl.fit(model, budget=150, key=jax.random.key(3), strategy=TINY_LF)
    assert estimator.noncentred == ("theta",)
    post = estimator.condition({"x": np.array([0.3, -1.0]), "w": np.array([1.0, 1.5])})  # 2 of 3 sites
    draws = post.sample(20, key=jax.random.key(4))
    assert draws["theta"].shape == (20, 2) and np.all(np.isfinite(draws["theta"]))
    assert np.all(np.isfinite(post.log_prob(draws)))


def test_simplex_parameters_are_refused_clearly():
    model = hierdsl.compile("""
model M(n::Int = 2)
    w ~ Dirichlet([1.0, 1.0, 1.0])
    sites i in 1:n
        observe x ~ Normal(sum(w .* [1.0, 2.0, 3.0]), 1.0)
    end
end
""")
    with pytest.raises(hierdsl.HsbiError, match="parameter `w` has a simplex prior"):
        hierdsl.fit(model, budget=100, key=jax.random.key(0), strategy=TINY_LF)


@pytest.mark.parametrize("kind", ["network", "linear"])
def test_preconditioned_surrogate_trains_saves_and_loads(tmp_path, kind):
    """`LF(precondition=...)`: the normaliser carries the fitted preconditioning of the
    observations, and a saved estimator loads with it and draws the same synthetic data."""
    import equinox as eqx

    model = hierdsl.compile(os.path.join(EXAMPLES, "gaussian_linear.hsbi"), args={"n_sites": 4})
    strategy = dataclasses.replace(TINY_LF, precondition=kind,
                                   preconditioner=lf.PreconditionerConfig(width=16, depth=1, steps=200))
    estimator = hierdsl.fit(model, budget=150, key=jax.random.key(2), strategy=strategy)
    norm = estimator.trained.normaliser
    layout1 = lf.TokenLayout.from_ir(model.ir, max_sites=1)
    assert norm.observed == lf.observed_tokens(layout1, estimator.lowered) != ()
    if kind == "network":
        assert norm.observed_loc is None
        # Fitted, not the identity (on Gaussian Linear the linear start is exact, so the MLP may stay zero).
        assert np.any(np.asarray(norm.observed_net.linear) != 0.0)
    else:
        assert norm.observed_net is None and np.any(np.asarray(norm.observed_loc) != 0.0)
    path = str(tmp_path / "pre.hsbe")
    estimator.save(path)
    again = load(path, model)
    assert again.strategy == strategy and again.trained.normaliser.observed == norm.observed
    for a, b in zip(jax.tree.leaves(eqx.filter(norm, eqx.is_array)), jax.tree.leaves(eqx.filter(again.trained.normaliser, eqx.is_array))):
        np.testing.assert_array_equal(a, b)
    split1 = lf.surrogate_split(layout1, estimator.lowered)
    pools = [lf.synthetic_pool(estimator.lowered, e.trained.surrogate, split1, e.trained.normaliser,
                               jax.random.key(3), 8, 4, lf.SamplerConfig(num_steps=4)) for e in (estimator, again)]
    np.testing.assert_array_equal(pools[0].site_values, pools[1].site_values)
    if kind == "linear":
        # A file from before the network preconditioner: a flag (True meant linear), no preconditioner settings.
        import hashlib, json, struct

        from hierdsl.checkpoint import MAGIC, read_header

        header, payload = read_header(path)
        header["strategy"]["precondition"] = True
        del header["strategy"]["preconditioner"], header["normaliser_shapes"]["observed_network"]
        head = json.dumps(header, sort_keys=True).encode("utf-8")
        old_path = tmp_path / "old.hsbe"
        old_path.write_bytes(MAGIC + struct.pack("<Q", len(head)) + head + payload)
        old = load(str(old_path), model)
        assert old.strategy.precondition == "linear"
        np.testing.assert_array_equal(old.trained.normaliser.observed_loc, norm.observed_loc)


LOCATED = """
model Located(n::Int = 1)
    s ~ LogNormal(0.0, 0.5)
    sites i in 1:n
        theta ~ Normal(0.0, 2.0)
        observe x ~ Normal(theta, s)
    end
end
"""


@pytest.mark.parametrize("globals_precondition", [False, True])
def test_posterior_preconditioned_estimator_integrates_to_one_and_saves_and_loads(globals_precondition, tmp_path):
    """`posterior_precondition=True`: the posterior network sees θ (centred: its prior reads no
    global) as a residual of a regression on x; with `globals_precondition=True`, s as one of a
    regression on the sites' x too. The density it reports for (s, θ) carries the maps' Jacobians
    and integrates to 1; a saved estimator loads with the preconditioners and draws and scores the
    same. (Direct's are in `test_direct_uses_budget_over_sites_full_simulations`.)"""
    model = hierdsl.compile(LOCATED)
    small = lf.PreconditionerConfig(width=16, depth=1, steps=200)
    strategy = dataclasses.replace(TINY_LF, posterior_precondition=True, preconditioner=small,
                                   globals_precondition=globals_precondition,
                                   globals_preconditioner=dataclasses.replace(lf.GLOBALS_PRECONDITIONER, width=16, depth=1, steps=200))
    estimator = hierdsl.fit(model, budget=200, key=jax.random.key(2), strategy=strategy)
    pre = estimator.trained.posterior_preconditioner
    assert estimator.noncentred == () and pre is not None and pre.targets == (0,) and pre.features == (1,)
    globals_pre = estimator.trained.globals_preconditioner
    assert (globals_pre is not None and globals_pre.features == (1,)) if globals_precondition else globals_pre is None
    post = estimator.condition({"x": np.array([1.5])})
    log_s, theta = np.meshgrid(np.linspace(-3.0, 3.0, 49), np.linspace(-14.0, 14.0, 113), indexing="ij")
    points = {"s": np.exp(log_s).ravel(), "theta": theta.ravel()[:, None]}
    density = np.exp(post.log_prob(points)).reshape(log_s.shape) * np.exp(log_s)  # ds = s d(log s)
    mass = np.trapezoid(np.trapezoid(density, theta[0], axis=1), log_s[:, 0])
    assert mass == pytest.approx(1.0, abs=0.03)
    path = str(tmp_path / "post.hsbe")
    estimator.save(path)
    again = load(path, model)
    assert again.strategy == strategy
    assert again.trained.posterior_preconditioner.targets == pre.targets
    assert (again.trained.globals_preconditioner is None) == (not globals_precondition)
    draws = post.sample(50, key=jax.random.key(4))
    again_post = again.condition({"x": np.array([1.5])})
    redrawn = again_post.sample(50, key=jax.random.key(4))
    for name in draws:
        np.testing.assert_array_equal(draws[name], redrawn[name])
    np.testing.assert_array_equal(post.log_prob(draws), again_post.log_prob(draws))
