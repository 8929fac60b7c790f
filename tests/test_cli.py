"""The command line as a user runs it: `hierdsl compile`, `hierdsl fmt`, `hierdsl --version`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

import hierdsl
from hierdsl.compiler.ir import ModelIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "hierdsl", *args], cwd=cwd, capture_output=True, text=True)


def test_compile_sir_prints_structure(tmp_path):
    out = tmp_path / "sir.json"
    result = run("compile", "examples/sir.hsbi", "-o", str(out))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "model SIR  (examples/sir.hsbi)"
    table = "\n".join(lines)
    assert "global       gamma  ()     float  positive" in table
    assert "local        beta   ()     float  positive" in table
    assert "observation  y      (10,)  int    nonnegative_integer" in table
    assert "tokens: 1 global, 11 per site (50 sites → 551 in all)" in table
    ir = ModelIR.loads(out.read_text())
    assert ir == hierdsl.compile(os.path.join(EXAMPLES, "sir.hsbi")).ir
    assert json.loads(out.read_text())["hash"] == ir.hash


def test_misspelt_name_gives_caret_and_exit_1(tmp_path):
    text = open(os.path.join(EXAMPLES, "gaussian_linear.hsbi"), encoding="utf-8").read()
    bad = tmp_path / "typo.hsbi"
    bad.write_text(text.replace("Normal(mu, sigma)", "Normal(mu, sgima)"))
    result = run("compile", "typo.hsbi", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: unknown name `sgima`\n --> ")
    assert "        observe x ~ Normal(mu, sgima)\n" in result.stderr
    assert "  |                                ^^^^^ did you mean `sigma`?" in result.stderr
    assert result.stdout == ""


def test_syntax_error_exits_1_without_traceback(tmp_path):
    bad = tmp_path / "bad.hsbi"
    bad.write_text("model M(\n")
    result = run("compile", str(bad))
    assert result.returncode == 1 and "Traceback" not in result.stderr and "error:" in result.stderr


def test_missing_file_and_bad_arg_exit_1(tmp_path):
    result = run("compile", str(tmp_path / "nope.hsbi"))
    assert result.returncode == 1 and "not found" in result.stderr and "Traceback" not in result.stderr
    result = run("compile", "examples/sir.hsbi", "--arg", "n_sites")
    assert result.returncode == 1 and "NAME=VALUE" in result.stderr


def test_arg_override_and_json():
    result = run("compile", "examples/gaussian_linear.hsbi", "--arg", "n_sites=3", "--json")
    assert result.returncode == 0
    assert json.loads(result.stdout)["num_sites"] == 3


def test_failed_compile_leaves_no_output(tmp_path):
    bad = tmp_path / "bad.hsbi"
    bad.write_text("model M()\nend\n")
    out = tmp_path / "out.json"
    assert run("compile", str(bad), "-o", str(out)).returncode == 1
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.hsbi"]


def test_version():
    result = run("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"hierdsl {hierdsl.__version__}"


def test_fmt_prints_canonical_text_and_check(tmp_path):
    src = tmp_path / "m.hsbi"
    shutil.copy(os.path.join(EXAMPLES, "gaussian_linear.hsbi"), src)
    result = run("fmt", str(src))
    assert result.returncode == 0
    formatted = result.stdout
    assert hierdsl.compile(formatted).ir == hierdsl.compile(str(src)).ir
    assert run("fmt", "--check", str(src)).returncode == 1
    assert run("fmt", "-w", str(src)).returncode == 0
    assert src.read_text() == formatted
    assert run("fmt", "--check", str(src)).returncode == 0


def test_warnings_go_to_stderr(tmp_path):
    src = tmp_path / "w.hsbi"
    src.write_text("""model M(n_sites::Int = 2)
    g ~ Normal(0.0, 1.0)
    sites i in 1:n_sites
        observe x ~ Normal(0.0, 1.0)
    end
end
""")
    result = run("compile", str(src))
    assert result.returncode == 0
    assert "warning: global parameter `g` is never used" in result.stderr


@pytest.mark.parametrize("epochs", [10, 80, 160])
def test_epochs_option_keeps_the_posterior_schedule_whole(epochs):
    """`--epochs` (train/infer) and `bench --epochs` set the posterior's cosine-annealed length;
    early stopping (patience) must not end it before the rate has annealed, beyond 80 epochs too."""
    import argparse

    from hierdsl import bench
    from hierdsl.cli import _strategy
    from hierdsl.runtime import lf

    for method in ("lf", "direct"):
        cli = _strategy(argparse.Namespace(method=method, epochs=epochs, precondition=None))
        benched = bench.strategy(bench.Settings(epochs=epochs), method)
        for training in (cli.posterior_training, benched.posterior_training):
            assert training.max_epochs == epochs and training.schedule == "cosine"
            assert training.patience >= epochs
            # Up to the default length the settings are the library's (so cached estimators stay valid).
            assert training.patience == max(epochs, lf.POSTERIOR_TRAINING.patience)
    # The surrogate's constant rate is stopped early as before: its patience does not change.
    surrogate = _strategy(argparse.Namespace(method="lf", epochs=epochs, precondition=None)).surrogate_training
    assert surrogate.max_epochs == epochs and surrogate.patience == lf.TrainConfig().patience


def test_synthetic_option_sets_the_pool_of_lf_only(tmp_path):
    """`--synthetic N` (train/infer) sets how many synthetic data sets LF's posterior trains on;
    with `--method direct`, or below 10, it is an error with status 1."""
    from hierdsl.cli import _strategy, build_parser

    model = os.path.join(EXAMPLES, "gaussian_linear.hsbi")
    for command in (["train", model, "-o", "e.hsbe"], ["infer", model, "--data", "d.csv"]):
        for epochs in ([], ["--epochs", "5"]):
            ns = build_parser().parse_args(command + ["--synthetic", "500"] + epochs)
            assert _strategy(ns).num_synthetic == 500
        assert _strategy(build_parser().parse_args(command)).num_synthetic is None  # the library's default
    for extra, message in ((["--method", "direct"], "--synthetic needs --method lf"),
                           ([], "--synthetic must be at least 10")):
        result = run("train", model, "-o", str(tmp_path / "e.hsbe"), "--synthetic", "5", *extra)
        assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr
