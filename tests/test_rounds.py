"""Sequential rounds: the truncated prior (TSNPE-style proposal), its box, and rounds end to end."""

from __future__ import annotations

import dataclasses
import re
import warnings

import jax
import numpy as np
import pytest
from scipy import stats

import hierdsl
from counting import CallCounter
from tiny import TINY_LF, TINY_NET, cli_trains_tiny_networks
from hierdsl.checkpoint import load
from hierdsl.inference import lower
from hierdsl.runtime import lf
from hierdsl.runtime.errors import RuntimeModelError
from hierdsl.runtime.tokens import TokenLayout

TRUNCATED = """
extern host function shift(u::Real)::Real

model Truncated(n::Int = 3)
    m ~ Normal(1.0, 2.0)
    s ~ LogNormal(0.0, 0.5)
    sites i in 1:n
        input se ~ Uniform(1.0, 2.0)
        u ~ Normal(m, s)
        observe x ~ Normal(shift(u), se)
    end
end
"""

DATA = {"x": np.array([0.4, 0.9, 1.3]), "se": np.array([1.2, 1.5, 1.8])}


@pytest.fixture(scope="module")
def lowered():
    return lower(hierdsl.compile(TRUNCATED, functions={"shift": CallCounter()}))


@pytest.fixture(scope="module")
def rounds():
    counter = CallCounter()
    model = hierdsl.compile(TRUNCATED, functions={"shift": counter})
    est = hierdsl.fit(model, budget=200, key=jax.random.key(7), strategy=TINY_LF, rounds=2, data=DATA)
    return model, est, counter


def box(m=(-np.inf, np.inf), s=(-np.inf, np.inf), u=(-np.inf, np.inf)):
    """A truncation box in unconstrained coordinates (s is on the log scale there)."""
    f = lambda v: np.float32(v)
    return lf.Truncation({"m": f(m[0]), "s": f(s[0]), "u": f(u[0])}, {"m": f(m[1]), "s": f(s[1]), "u": f(u[1])})


def test_truncated_globals_follow_the_prior_restricted_to_the_box(lowered):
    g, site, acceptance = lf.sample_truncated(lowered, jax.random.key(0), 20000, box(m=(0.0, 2.0)), with_site=False)
    m = g["m"]
    assert m.shape == (20000,) and np.all((m >= 0.0) & (m <= 2.0))
    exact = stats.truncnorm(-0.5, 0.5, loc=1.0, scale=2.0)
    # Mean and sd of the truncated normal (sd/sqrt(n) ≈ 0.004), and the prior mass of the box.
    assert abs(m.mean() - exact.mean()) < 0.02
    assert abs(m.std() - exact.std()) < 0.02
    assert abs(acceptance - (stats.norm.cdf(0.5) - stats.norm.cdf(-0.5))) < 0.02
    # The other global is untouched by the box: its prior, LogNormal(0, 0.5).
    assert abs(np.log(g["s"]).std() - 0.5) < 0.02


def test_truncated_sites_lie_in_the_box_and_take_observed_inputs(lowered):
    observed_se = np.array([1.25, 1.5, 1.75], np.float32)
    g, site, acceptance = lf.sample_truncated(
        lowered, jax.random.key(1), 3000, box(m=(0.0, 2.0), s=(-0.5, 0.5), u=(-1.0, 1.0)),
        site_inputs={"se": observed_se})
    assert set(site) == {"u", "se"}
    assert np.all((g["m"] >= 0) & (g["m"] <= 2) & (np.abs(np.log(g["s"])) <= 0.5) & (np.abs(site["u"]) <= 1))
    assert set(np.unique(site["se"])) == set(observed_se.tolist())
    # The locals' box makes fewer draws acceptable than the globals' box alone (0.383 · 0.683 ≈ 0.26).
    assert 0.05 < acceptance < 0.26


def test_truncation_that_no_prior_draw_reaches_is_a_clear_error(lowered):
    with pytest.raises(RuntimeModelError, match="accepted 0 of .* prior draws"):
        lf.sample_truncated(lowered, jax.random.key(2), 10, box(m=(50.0, 50.001)), batch=1024, max_candidates=4096)


def test_box_spans_the_draws_quantiles_widened_and_pools_only_observed_sites(lowered):
    rng = np.random.default_rng(0)
    z = {"m": rng.normal(0.0, 1.0, 100_000), "s": rng.normal(0.0, 0.1, 100_000),
         "u": np.concatenate([rng.uniform(-1, 1, (100_000, 2)), np.full((100_000, 1), 99.0)], axis=1)}
    t = lf.Truncation.from_draws(lowered, z, num_sites=2, quantile=0.01, widen=0.25)
    q = stats.norm.ppf(0.99)
    assert t.lower["m"] == pytest.approx(-1.5 * q, abs=0.03) and t.upper["m"] == pytest.approx(1.5 * q, abs=0.03)
    # The padded third site (99) is not one of the data's sites: it does not stretch the box.
    assert t.lower["u"] == pytest.approx(-0.98 - 0.25 * 1.96, abs=0.01)
    assert t.upper["u"] == pytest.approx(0.98 + 0.25 * 1.96, abs=0.01)
    back = lf.Truncation.from_json(t.to_json())
    for name in ("m", "s", "u"):
        assert np.allclose(back.lower[name], t.lower[name]) and np.allclose(back.upper[name], t.upper[name])


def test_synthetic_pool_uses_the_given_globals_and_compiles_once(lowered, monkeypatch):
    """A round's synthetic data sets take their globals from the truncated prior, not the prior;
    a later round (new surrogate weights, new globals) reuses the compiled pool function."""
    traces = []
    make_pool = lf._make_pool
    monkeypatch.setattr(lf, "_make_pool", lambda *args: traces.append(1) or make_pool(*args))
    layout1 = TokenLayout.from_ir(lowered.ir, max_sites=1)
    split1 = lf.surrogate_split(layout1, lowered)
    sims = lf.simulate_single_sites(lowered, jax.random.key(3), 64, lf.SimulationCounter())
    normaliser = lf.Normaliser.fit(lf.encode_batch(layout1, lf.flow_values_batch(lowered, sims, jax.random.key(4)), 1))
    surrogate = TINY_NET.build(layout1, jax.random.key(5))
    globals = {"m": np.full(6, 7.5, np.float32), "s": np.exp(np.linspace(-1, 1, 6)).astype(np.float32)}
    pool = lf.synthetic_pool(lowered, surrogate, split1, normaliser, jax.random.key(6), 6, 3,
                             lf.SamplerConfig(num_steps=2), globals=globals)
    layout = TokenLayout.from_ir(lowered.ir, max_sites=3)
    decoded = jax.vmap(lambda t: layout.decode(t, 3))(normaliser.inverse(pool))  # flow space: log s
    assert np.allclose(decoded["m"], 7.5, atol=1e-4)
    assert np.allclose(decoded["s"], np.linspace(-1, 1, 6), atol=1e-4)
    assert len(traces) == 1
    later = lf.synthetic_pool(lowered, TINY_NET.build(layout1, jax.random.key(8)), split1, normaliser,
                              jax.random.key(9), 6, 3, lf.SamplerConfig(num_steps=2),
                              globals={"m": np.zeros(6, np.float32), "s": np.ones(6, np.float32)})
    assert len(traces) == 1  # traced (and compiled) once for both
    assert not np.allclose(later.site_values, pool.site_values)


def test_rounds_draw_from_the_truncated_prior_and_the_file_keeps_the_region(rounds, tmp_path):
    model, est, counter = rounds
    # 100 prior simulations, then 100 from the truncated prior: one single-site call each.
    assert counter.calls == 200 and est.simulator_calls == 200
    box_ = est.trained.truncation
    assert box_ is not None and 0 < box_.acceptance <= 1
    # The second round's simulations lie in the box (globals and the site's local, unconstrained).
    sims = est.trained.simulations
    second = slice(100, 200)
    assert np.all((sims["m"][second] >= box_.lower["m"]) & (sims["m"][second] <= box_.upper["m"]))
    log_s = np.log(sims["s"][second])
    assert np.all((log_s >= box_.lower["s"] - 1e-5) & (log_s <= box_.upper["s"] + 1e-5))
    u = sims["u"][second, 0]
    assert np.all((u >= box_.lower["u"]) & (u <= box_.upper["u"]))
    # ... with the observed sites' inputs; the first round's come from the prior.
    assert set(np.round(sims["se"][second, 0], 5)) <= set(np.round(DATA["se"], 5).astype(np.float32))
    assert len(set(np.round(sims["se"][:100, 0], 5))) > 50
    draws = est.condition(DATA).sample(20, key=jax.random.key(0))
    assert np.all(np.isfinite(draws["m"])) and draws["u"].shape == (20, 3)
    path = str(tmp_path / "rounds.hsbe")
    est.save(path)
    back = load(path, model)
    assert np.allclose(back.trained.truncation.lower["m"], box_.lower["m"])
    assert back.trained.truncation.acceptance == pytest.approx(box_.acceptance)


def test_a_rounds_estimator_warns_for_data_outside_its_region(rounds):
    _, est, _ = rounds
    focused = est.trained
    try:
        est.trained = dataclasses.replace(focused, truncation=box(m=(-1e3, 1e3), s=(-1e3, 1e3), u=(-1e3, 1e3)))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # every draw inside the region: no warning
            est.condition(DATA).sample(50, key=jax.random.key(0))
        est.trained = dataclasses.replace(focused, truncation=box(m=(100.0, 101.0), s=(-1e3, 1e3), u=(-1e3, 1e3)))
        with pytest.warns(UserWarning, match="outside the region this estimator's sequential rounds trained for"):
            est.condition(DATA).sample(50, key=jax.random.key(0))
    finally:
        est.trained = focused


def test_cli_infer_with_rounds(tmp_path, monkeypatch):
    import contextlib
    import io
    import json
    import os

    from hierdsl.cli import main

    model_file = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                              "gaussian_linear.hsbi")
    data = tmp_path / "d.csv"
    data.write_text("site,variable,index,value\nA,x,,0.5\nB,x,,-0.3\nC,x,,1.1\n")
    run = str(tmp_path / "run")
    cli_trains_tiny_networks(monkeypatch)  # the subject is the command's rounds, not accuracy
    base = ["infer", model_file, "--arg", "n_sites=3", "--data", str(data), "--budget", "120", "--epochs", "2",
            "--num-samples", "50", "--no-plots", "-o", run]
    for bad, message in ((["--rounds", "0"], "--rounds must be at least 1"),
                         (["--rounds", "2", "--method", "direct"], "--rounds needs --method lf")):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            assert main(base + bad) == 1
        assert message in err.getvalue() and "Traceback" not in err.getvalue()
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert main(base + ["--rounds", "2"]) == 0
    assert "round 2/2: 60 single-site simulations from the prior truncated" in err.getvalue()
    assert "of prior draws fall inside it" in err.getvalue()
    # The posterior draws have their progress bar too (on a terminal it fills piece by piece).
    assert re.search(r"^sample +\[#{30}\] 50/50 ", err.getvalue(), re.M), err.getvalue()
    manifest = json.loads(open(os.path.join(run, "manifest.json")).read())
    assert manifest["rounds"] == 2 and manifest["simulator_calls"] == 120
    assert 0 < manifest["truncation"]["acceptance"] <= 1 and set(manifest["truncation"]["lower"]) == {"sigma", "mu"}
