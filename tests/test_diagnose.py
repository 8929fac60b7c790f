"""`hierdsl check`: the calibration verdict on synthetic draws, the command end to end on a tiny
Gaussian Linear estimator, and its user errors.

The verdict tests use the conjugate Gaussian θ ~ N(0, 1), x | θ ~ N(θ, 1), whose posterior is
N(x / 2, 1 / 2): exact draws must pass, draws with a shrunk (over-confident) or inflated
(under-confident) spread must be flagged.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import hierdsl
from exact_hierarchy import hierarchical_posterior
from hierdsl import cli, diagnose
from hierdsl.cli import UserError
from hierdsl.compiler.errors import HsbiError
from hierdsl.runtime import lf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
GAUSSIAN_LINEAR = os.path.join(EXAMPLES, "gaussian_linear.hsbi")
SITES = 3

TINY_NET = lf.NetworkConfig(width=16, depth=1, num_heads=1)
TINY_TRAIN = lf.TrainConfig(batch_size=32, max_epochs=2, patience=2, steps_per_epoch=5)
TINY_DIRECT = lf.Direct(posterior=TINY_NET, posterior_training=TINY_TRAIN)


def _check_registered() -> bool:
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return "check" in sub.choices


def run_check(argv: list[str]) -> int:
    """`hierdsl check ARGV`: through `cli.main` once `check` is wired in, else through a parser
    built with `diagnose.add_parser`, handling user errors as `cli.main` does."""
    if _check_registered():
        return cli.main(["check", *argv])
    parser = argparse.ArgumentParser(prog="hierdsl")
    sub = parser.add_subparsers(dest="command")
    diagnose.add_parser(sub)
    ns = parser.parse_args(["check", *argv])
    try:
        return ns.run(ns)
    except HsbiError as exc:
        print(exc.render(), file=sys.stderr)
        return 1
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


# ----------------------------------------------------------------------------- the verdict (NumPy)


def conjugate(num_truths: int, num_draws: int, dim: int, spread: float, seed: int = 0):
    """Truths θ ~ N(0, 1) with x ~ N(θ, 1), and posterior draws N(x/2, spread² / 2)."""
    rng = np.random.default_rng(seed)
    theta = rng.standard_normal((num_truths, dim))
    x = theta + rng.standard_normal((num_truths, dim))
    draws = x[:, None, :] / 2 + spread * np.sqrt(0.5) * rng.standard_normal((num_truths, num_draws, dim))
    return theta, draws


def test_exact_posterior_passes():
    truths, draws = conjugate(400, 100, 2, spread=1.0)
    group = diagnose.assess_group("globals", ["a", "b"], truths, draws)
    assert group.verdict == "PASS" and group.sbc_passed and group.reasons == []
    assert group.over_confident == [] and group.under_confident == []
    assert np.all(np.abs(group.coverage_at(0.9) - 0.9) < 0.05)
    lo, hi = group.bands[0.9]
    assert lo < 0.9 < hi and hi - lo < 0.12  # a binomial band of 400 truths, not a fixed margin


def test_over_confident_posterior_fails():
    truths, draws = conjugate(400, 100, 2, spread=0.5)
    group = diagnose.assess_group("locals", ["mu", "nu"], truths, draws)
    assert group.verdict == "FAIL" and not group.sbc_passed
    assert group.over_confident == ["mu", "nu"]
    assert np.all(group.coverage_at(0.9) < group.bands[0.9][0])
    assert any("over-confident" in r for r in group.reasons)


def test_under_confident_posterior_is_flagged_as_conservative():
    truths, draws = conjugate(400, 100, 1, spread=2.0)
    group = diagnose.assess_group("globals", ["sigma"], truths, draws)
    assert group.under_confident == ["sigma"] and group.over_confident == []
    assert group.verdict == "FAIL"  # its ranks are far from uniform (a hump)
    assert any("conservative" in r for r in group.reasons)


def test_tolerance_band_follows_the_number_of_independent_truths():
    assert diagnose.exact_coverage(0.9, 99) == pytest.approx(0.9)
    wide = diagnose.coverage_band(0.9, 100, 50, 0.05)
    narrow = diagnose.coverage_band(0.9, 100, 5000, 0.05)
    assert wide[0] < narrow[0] < 0.9 < narrow[1] < wide[1]
    # Pooled locals that share their simulation's globals use the number of simulations.
    truths, draws = conjugate(600, 50, 1, spread=1.0, seed=3)
    pooled = diagnose.assess_group("locals", ["mu"], truths, draws, num_independent=200)
    assert pooled.num_independent == 200 and pooled.bands[0.9][0] < diagnose.coverage_band(0.9, 50, 600, 0.025)[0]


def test_pooled_locals_of_an_exact_hierarchical_posterior_pass():
    """Locals pooled over the sites of each simulation are tested per simulation (clusters): the
    exact posterior of a strongly pooled hierarchy passes, a shifted one fails."""
    rng = np.random.default_rng(21)
    theta, draws = hierarchical_posterior(200, 8, 50, rng, tau=1.0)
    truths = theta.reshape(-1, 1)
    samples = np.moveaxis(draws, 2, 1).reshape(-1, 50, 1)
    group = diagnose.assess_group("locals", ["theta"], truths, samples, num_independent=200)
    assert group.verdict == "PASS" and group.num_bins == 10  # bins from the 200 simulations
    theta, draws = hierarchical_posterior(200, 8, 50, rng, tau=1.0, shift=1.5)
    shifted = diagnose.assess_group("locals", ["theta"], theta.reshape(-1, 1),
                                    np.moveaxis(draws, 2, 1).reshape(-1, 50, 1), num_independent=200)
    assert shifted.verdict == "FAIL" and not shifted.sbc_passed
    with pytest.raises(ValueError, match="groups of equal size"):
        diagnose.assess_group("locals", ["theta"], truths[:-1], samples[:-1], num_independent=200)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Direct estimator for Gaussian Linear with 3 sites, and a 3-site data file."""
    folder = tmp_path_factory.mktemp("check")
    model = hierdsl.compile(GAUSSIAN_LINEAR, args={"n_sites": SITES})
    estimator = hierdsl.fit(model, budget=60, key=jax.random.key(0), strategy=TINY_DIRECT)
    path = str(folder / "est.hsbe")
    estimator.save(path)
    data = str(folder / "data.csv")
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["simulate", GAUSSIAN_LINEAR, "--arg", f"n_sites={SITES}", "--sites", str(SITES),
                         "--seed", "5", "-o", data]) == 0
    return folder, path, data


def test_check_end_to_end(trained, monkeypatch, capsys):
    import hierdsl.inference as inference

    folder, estimator, data = trained
    traces = []
    real = inference.flow_integrate
    monkeypatch.setattr(inference, "flow_integrate", lambda *a, **k: traces.append(1) or real(*a, **k))
    out = str(folder / "out")
    status = run_check([GAUSSIAN_LINEAR, "--arg", f"n_sites={SITES}", "--estimator", estimator, "--data", data,
                        "--sims", "30", "--samples", "20", "--seed", "1", "-o", out, "--quiet"])
    printed = capsys.readouterr()
    assert status == 0, printed.err
    # One sampler trace serves all 30 simulated sets and the observed data.
    assert len(traces) == 1
    assert sorted(os.listdir(out)) == ["check.json", "coverage.png", "ranks_globals.png", "ranks_locals.png"]
    for name in ("coverage.png", "ranks_globals.png", "ranks_locals.png"):
        with open(os.path.join(out, name), "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(out, "check.json"), encoding="utf-8") as handle:
        report = json.load(handle)
    assert set(report["groups"]) == {"globals", "locals"}
    assert report["num_sims"] == 30 and report["num_sites"] == SITES and report["num_samples"] == 20
    for group in report["groups"].values():
        assert group["verdict"] in ("PASS", "FAIL")
        assert 0 <= group["sbc"]["combined_p_value"] <= 1
        assert all(np.isfinite(p) and 0 <= p <= 1 for p in group["sbc"]["p_values"].values())
        assert set(group["coverage"]["checked"]) == {"0.5", "0.9"}
    assert len(report["groups"]["locals"]["ranks"]["mu"]) == 30 * SITES  # sites pooled
    assert report["groups"]["globals"]["labels"] == ["sigma"]
    lc2st = report["lc2st"]
    assert np.isfinite(lc2st["statistic"]) and 0 < lc2st["p_value"] <= 1 and lc2st["verdict"] in ("PASS", "FAIL")
    assert lc2st["theta_dim"] == 1 + SITES and lc2st["x_dim"] == SITES
    lines = printed.out.splitlines()
    assert lines[0].startswith("check of GaussianLinear: 30 simulated data sets of 3 sites")
    assert any(line.startswith("globals ") for line in lines) and any(line.startswith("locals ") for line in lines)
    assert any(line.startswith("l-C2ST at the data:") for line in lines)
    assert printed.err == ""  # --quiet

    # --strict: the exit status follows the verdict (the same seed and settings give the same one).
    strict_out = str(folder / "strict")
    status = run_check([GAUSSIAN_LINEAR, "--arg", f"n_sites={SITES}", "--estimator", estimator, "--data", data,
                        "--sims", "30", "--samples", "20", "--seed", "1", "-o", strict_out, "--quiet", "--strict"])
    with open(os.path.join(strict_out, "check.json"), encoding="utf-8") as handle:
        verdict = json.load(handle)["verdict"]
    assert verdict == report["verdict"]
    assert status == (0 if verdict == "PASS" else 1)
    capsys.readouterr()


def _error(argv: list[str], capsys) -> str:
    status = run_check(argv)
    err = capsys.readouterr().err
    assert status == 1
    assert "Traceback" not in err
    return err


def test_check_user_errors(trained, tmp_path, capsys):
    folder, estimator, data = trained
    out = str(tmp_path / "out")
    base = ["--estimator", estimator, "-o", out, "--sims", "20", "--samples", "10"]
    err = _error([os.path.join(EXAMPLES, "eight_schools.hsbi"), *base], capsys)
    assert "trained for a different model" in err
    err = _error([GAUSSIAN_LINEAR, "--arg", f"n_sites={SITES}", "--estimator", str(tmp_path / "none.hsbe")], capsys)
    assert "not found" in err
    many = tmp_path / "four.csv"
    many.write_text("site,variable,index,value\n" + "".join(f"s{k},x,,0.{k}\n" for k in range(4)))
    err = _error([GAUSSIAN_LINEAR, "--arg", f"n_sites={SITES}", *base, "--data", str(many)], capsys)
    assert "the data have 4 sites but the estimator serves at most 3" in err
    err = _error([GAUSSIAN_LINEAR, "--arg", f"n_sites={SITES}", *base, "--sites", "5"], capsys)
    assert "serves at most 3" in err
    err = _error([GAUSSIAN_LINEAR, "--arg", f"n_sites={SITES}", *base, "--data", data, "--sites", "2"], capsys)
    assert "--sites 2 differs" in err
    assert not os.path.exists(out)  # nothing written on an error


@pytest.mark.skipif(not _check_registered(), reason="`check` is not wired into hierdsl.cli.build_parser yet")
def test_cli_error_exits_1_without_traceback(trained, tmp_path):
    _, estimator, _ = trained
    result = subprocess.run([sys.executable, "-m", "hierdsl", "check", os.path.join(EXAMPLES, "eight_schools.hsbi"),
                             "--estimator", estimator, "-o", str(tmp_path / "out")],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "trained for a different model" in result.stderr


def test_python_api_without_data(trained):
    _, path, _ = trained
    estimator = hierdsl.load(path, hierdsl.compile(GAUSSIAN_LINEAR, args={"n_sites": SITES}))
    report = diagnose.check(estimator, key=jax.random.key(2), num_sims=12, num_samples=10, num_sites=2)
    assert report.lc2st is None and report.num_sites == 2 and set(report.groups) == {"globals", "locals"}
    assert report.groups["locals"].ranks.shape == (12 * 2, 1)
    assert "overall:" in report.table()
    json.dumps(report.to_json())
