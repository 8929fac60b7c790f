"""`hierdsl bench`: the quick preset end to end (what CI runs), resuming from the cache, the report."""

from __future__ import annotations

import contextlib
import io
import json
import os

import numpy as np
import pytest

from hierdsl import bench
from hierdsl.diagnose import exact_coverage
from hierdsl.cli import main


def run_cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("bench"))
    code, out, err = run_cli("bench", "--quick", "-o", folder)
    return folder, code, out, err


def test_quick_bench_end_to_end(quick_run):
    folder, code, out, err = quick_run
    assert code == 0, err
    rows = [json.loads(line) for line in open(os.path.join(folder, "results.jsonl"))]
    settings = bench.QUICK
    assert len(rows) == len(settings.methods) * len(settings.budgets) * settings.observations
    for row in rows:
        assert row["task"] == "gaussian_linear" and row["sites"] == 5
        assert 0.0 <= row["c2st_joint"] <= 1.0 and 0.0 <= row["c2st_globals"] <= 1.0
        assert 0.0 < row["lc2st_p_value"] <= 1.0 and row["lc2st_statistic"] >= 0.0
        assert row["reference"]["kind"] == "exact"
        # LF spends exactly B single-site calls; direct B // n full simulations of n sites.
        expected = 200 if row["method"] == "lf" else (200 // 5) * 5
        assert row["simulator_calls"] == expected
    table = open(os.path.join(folder, "results.md")).read()
    assert "| gaussian_linear | 5 | lf | 200 | 2 | 200 |" in table
    assert "| gaussian_linear | 5 | direct | 200 | 2 | 200 |" in table
    scores, calibration = table.split("Calibration of each amortised estimator")
    assert scores.count("\n| gaussian_linear") == 2 and calibration.count("\n| gaussian_linear") == 2
    assert out.strip().startswith("| task | n_s | method")
    assert os.path.getsize(os.path.join(folder, "gaussian_linear.png")) > 10_000
    # Calibration: one record per amortised estimator, SBC and coverage at the benchmark's site count.
    records = [json.loads(line) for line in open(os.path.join(folder, "calibration.jsonl"))]
    assert sorted(r["method"] for r in records) == ["direct", "lf"]
    for r in records:
        assert r["sites"] == 5 and r["budget"] == 200 and r["sbc_sims"] == settings.sbc_sims
        assert r["num_sims"] + r["dropped_non_finite"] == settings.sbc_sims
        assert set(r["groups"]) == {"globals", "locals"}
        for g in r["groups"].values():
            assert g["verdict"] in ("PASS", "FAIL") and 0.0 < g["sbc_p_value"] <= 1.0
            counts = g["rank_counts"]  # one count per rank 0..L, every truth (locals: every site) once
            assert len(counts) == settings.sbc_samples + 1
            assert sum(counts) == r["num_sims"] * (5 if g is r["groups"]["locals"] else 1)
            assert g["mean_rank"] == pytest.approx(np.dot(np.arange(len(counts)), counts) / sum(counts) / settings.sbc_samples)
            assert 0.0 <= g["mean_rank"] <= 1.0
            for lv, cov in g["coverage"].items():
                assert 0.0 <= cov["min"] <= cov["mean"] <= cov["max"] <= 1.0
                assert cov["calibrated"] == pytest.approx(exact_coverage(float(lv), settings.sbc_samples))
        # The verdict follows the evidence recorded beside it.
        g = r["groups"]["globals"]
        assert (g["verdict"] == "FAIL") == (g["sbc_p_value"] < 0.05 or bool(g["over_confident"]))
        assert f"| gaussian_linear | 5 | {r['method']} | 200 | 20 × 10 | {g['verdict']}, " in table
    assert "calibration (SBC and coverage, 20 simulations x 10 draws)" in err


def test_rerun_reuses_cache_and_rows(quick_run):
    folder, code, _, _ = quick_run
    assert code == 0
    before = open(os.path.join(folder, "results.jsonl")).read()
    calibration = open(os.path.join(folder, "calibration.jsonl")).read()
    stamps = {f: os.path.getmtime(os.path.join(folder, "cache", f)) for f in os.listdir(os.path.join(folder, "cache"))}
    code, out, err = run_cli("bench", "--quick", "-o", folder, "--quiet")
    assert code == 0, err
    assert open(os.path.join(folder, "results.jsonl")).read() == before  # nothing recomputed
    assert open(os.path.join(folder, "calibration.jsonl")).read() == calibration
    assert {f: os.path.getmtime(os.path.join(folder, "cache", f)) for f in stamps} == stamps
    assert err == ""  # --quiet


def copy_keeping_rows(quick_run, copy: str, keep: slice) -> tuple[str, list[str]]:
    """A copy of the quick run's folder whose results keep only the rows `keep` selects; returns
    the copy and all the original result lines."""
    import shutil

    folder, code, _, _ = quick_run
    assert code == 0
    shutil.copytree(folder, copy)
    lines = open(os.path.join(copy, "results.jsonl")).read().splitlines(keepends=True)
    with open(os.path.join(copy, "results.jsonl"), "w") as f:
        f.writelines(lines[keep])
    return copy, lines


def test_report_only_computes_nothing(quick_run, tmp_path):
    copy, lines = copy_keeping_rows(quick_run, str(tmp_path / "partial"), slice(None, 1))
    code, out, err = run_cli("bench", "--quick", "-o", copy, "--report-only")
    assert code == 0, err
    assert open(os.path.join(copy, "results.jsonl")).read() == lines[0]
    scores, calibration = out.split("Calibration of each amortised estimator")
    assert "| gaussian_linear | 5 | lf | 200 | 1 |" in scores and "direct" not in scores.split("\n", 2)[2]
    assert calibration.count("\n| gaussian_linear") == 2  # the calibration records it has, as they are


def test_interrupted_run_resumes_missing_rows(quick_run, tmp_path):
    # A copy of the run that lost its last row (as if killed while scoring it) recomputes only that row.
    copy, lines = copy_keeping_rows(quick_run, str(tmp_path / "copy"), slice(None, -1))
    code, _, err = run_cli("bench", "--quick", "-o", copy)
    assert code == 0, err
    assert ": training" not in err and "estimator from the cache" in err
    again = open(os.path.join(copy, "results.jsonl")).read().splitlines(keepends=True)
    assert again[:-1] == lines[:-1] and len(again) == len(lines)
    assert json.loads(again[-1])["id"] == json.loads(lines[-1])["id"]


def test_missing_calibration_is_computed_alone_from_the_cached_estimators(quick_run, tmp_path):
    # A folder from before calibration existed (rows, cached estimators, no calibration.jsonl): the
    # rerun trains nothing, scores no row again, and calibrates the cached estimators exactly as the
    # first run did.
    copy, lines = copy_keeping_rows(quick_run, str(tmp_path / "old"), slice(None))
    first = {json.loads(line)["id"]: json.loads(line) for line in open(os.path.join(copy, "calibration.jsonl"))}
    os.remove(os.path.join(copy, "calibration.jsonl"))
    code, out, err = run_cli("bench", "--quick", "-o", copy)
    assert code == 0, err
    assert ": training" not in err and "l-C2ST classifiers" not in err and "obs 1" not in err
    assert open(os.path.join(copy, "results.jsonl")).read().splitlines(keepends=True) == lines
    again = [json.loads(line) for line in open(os.path.join(copy, "calibration.jsonl"))]
    assert len(again) == 2
    for record in again:
        assert {k: v for k, v in record.items() if k != "seconds"} == \
            {k: v for k, v in first[record["id"]].items() if k != "seconds"}
    assert "20 × 10" in out


def test_cache_of_another_task_file_is_refused(quick_run, tmp_path):
    # The cache records the task file its entries came from; a folder made from an edited example
    # stops with the reason instead of mixing that file's observations and estimators with this one's.
    copy, lines = copy_keeping_rows(quick_run, str(tmp_path / "edited"), slice(None, -1))
    path = os.path.join(copy, "cache", "sources.json")
    recorded = json.load(open(path))
    assert recorded == {"gaussian_linear": bench.Bench(bench.QUICK, copy)._source_digest("gaussian_linear")}
    with open(path, "w") as f:
        json.dump({"gaussian_linear": "0" * 64}, f)
    code, out, err = run_cli("bench", "--quick", "-o", copy)
    assert code == 1 and "Traceback" not in err
    assert "holds gaussian_linear results of a different gaussian_linear.hsbi" in err and path in err
    assert open(os.path.join(copy, "results.jsonl")).read().splitlines(keepends=True) == lines[:-1]
    for broken, reason in (("{", "unreadable"), ("[1]", "not a record of task files")):
        with open(path, "w") as f:
            f.write(broken)
        code, _, err = run_cli("bench", "--quick", "-o", copy)
        assert code == 1 and reason in err and path in err and "Traceback" not in err
    # A folder from before the record existed is taken as it is, and gets one.
    os.remove(path)
    code, _, err = run_cli("bench", "--quick", "-o", copy, "--quiet")
    assert code == 0, err
    assert json.load(open(path)) == recorded


def test_sbc_sims_zero_skips_calibration(quick_run, tmp_path):
    copy, _ = copy_keeping_rows(quick_run, str(tmp_path / "none"), slice(None))
    os.remove(os.path.join(copy, "calibration.jsonl"))
    code, out, err = run_cli("bench", "--quick", "-o", copy, "--sbc-sims", "0")
    assert code == 0, err
    assert not os.path.exists(os.path.join(copy, "calibration.jsonl"))
    assert "estimator from the cache" not in err  # every row done, nothing to calibrate: nothing loaded
    assert "Calibration" not in out


def test_calibration_table_flags_and_failures():
    group = lambda verdict, p, over, under: {
        "verdict": verdict, "sbc_p_value": p, "over_confident": over, "under_confident": under,
        "coverage": {"0.5": {"mean": 0.31, "calibrated": 0.4545}, "0.9": {"mean": 0.62, "calibrated": 0.9091}}}
    records = [
        {"task": "sir", "sites": 50, "method": "direct", "budget": 1000, "sbc_sims": 100, "sbc_samples": 10,
         "seconds": 12.0, "groups": {"globals": group("FAIL", 1e-4, ["gamma"], []),
                                     "locals": group("PASS", 0.3, [], ["beta"])}},
        {"task": "gaussian_linear", "sites": 50, "method": "lf", "budget": 1000, "sbc_sims": 100, "sbc_samples": 10,
         "seconds": 3.0, "error": "the posterior sampler produced non-finite values"},
    ]
    lines = bench.calibration_table(records).splitlines()
    assert len(lines) == 4 and lines[2].startswith("| gaussian_linear | 50 | lf |")  # task order
    assert "failed: the posterior sampler produced non-finite values" in lines[2]
    assert "| FAIL, 0.0001 (over-confident) | 0.31 / 0.62 | PASS, 0.3 (conservative) | 0.31 / 0.62 | 0.45 / 0.91 | 12.0 |" \
        in lines[3]


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "nope"], "unknown task"),
    (["--sbc-sims", "5"], "at least 10"),
    (["--methods", "lf,magic"], "unknown method"),
    (["--budgets", "1000,x"], "bad list"),
    (["--budgets", "5"], "at least 10"),
])
def test_bad_options_exit_1(tmp_path, argv, message):
    code, _, err = run_cli("bench", "--quick", "-o", str(tmp_path), *argv)
    assert code == 1
    assert message in err and "Traceback" not in err


def test_mean_interval():
    m, lo, hi = bench.mean_interval([0.5, 0.6, 0.7, 0.8])
    assert m == pytest.approx(0.65)
    assert 0.5 <= lo < m < hi <= 0.8
    assert bench.mean_interval([0.7, None, float("nan")]) == (0.7, 0.7, 0.7)
    assert all(np.isnan(bench.mean_interval([])))


def test_plot_panels_follow_the_sweep():
    def rows(cells):
        return [{"sites": n, "budget": b} for n, b in cells]

    # The main sweep: budgets at one site count.
    assert bench.plot_panels(rows([(50, 1000), (50, 5000)])) == [("budget", 50)]
    # The site-count sweep: one budget, several site counts; no single-point budget panels.
    assert bench.plot_panels(rows([(n, 5000) for n in (1, 10, 50)])) == [("sites", 5000)]
    # Both sweeps together, as the protocol runs them.
    both = rows([(50, 1000), (50, 5000), (50, 10000), (1, 5000), (10, 5000)])
    assert bench.plot_panels(both) == [("budget", 50), ("sites", 5000)]
    # A single cell still gets its panel.
    assert bench.plot_panels(rows([(5, 200)])) == [("budget", 5)]


def test_table_groups_and_counts_rejections():
    rows = [
        {"task": "two_moons", "sites": 50, "method": m, "budget": b, "c2st_joint": 0.6 + 0.01 * i,
         "c2st_globals": 0.55, "lc2st_statistic": 0.1, "lc2st_p_value": p, "simulator_calls": b,
         "seconds": {"simulate": 1.0, "posterior": 10.0, "sample": 0.5}}
        for m in ("direct", "lf") for b in (5000, 1000) for i, p in enumerate((0.01, 0.5, 0.03))
    ]
    lines = bench.table(rows).splitlines()
    assert len(lines) == 2 + 4
    # Sorted: methods in METHODS order (lf before direct), budgets ascending.
    assert [line.split("|")[3].strip() for line in lines[2:]] == ["lf", "lf", "direct", "direct"]
    assert [line.split("|")[4].strip() for line in lines[2:]] == ["1000", "5000", "1000", "5000"]
    assert all("| 2/3 |" in line for line in lines[2:])
    assert "0.610 [" in lines[2]


def test_lf_rounds_trains_one_estimator_per_observation(tmp_path):
    code, out, err = run_cli("bench", "--quick", "--methods", "lf-rounds", "--observations", "1", "-o", str(tmp_path))
    assert code == 0, err
    rows = [json.loads(line) for line in open(tmp_path / "results.jsonl")]
    assert len(rows) == 1 and rows[0]["method"] == "lf-rounds"
    assert rows[0]["simulator_calls"] == 200  # the budget is split over the rounds, not added to
    assert rows[0]["lc2st_p_value"] is None  # not amortised: no l-C2ST
    assert 0.0 <= rows[0]["c2st_joint"] <= 1.0
    assert [f for f in os.listdir(tmp_path / "cache") if f.startswith("est_")][0].count("_obs0_") == 1
    assert "| gaussian_linear | 5 | lf-rounds | 200 | 1 | 200 |" in out


def test_precondition_setting_reaches_the_lf_strategy():
    import dataclasses

    from hierdsl.runtime import lf

    assert bench.strategy(bench.QUICK, "lf").precondition == lf.PRECONDITION
    on = dataclasses.replace(bench.QUICK, precondition="linear")
    assert bench.strategy(on, "lf").precondition == "linear"
    off = dataclasses.replace(bench.QUICK, precondition="off")
    assert bench.strategy(off, "lf").precondition is None
    # A different setting is a different estimator in the cache and a different row.
    assert on.training_key() != bench.QUICK.training_key()


@pytest.mark.parametrize("name, only_its", [("posterior_precondition", {"direct": ("preconditioner",)}),
                                             ("globals_precondition", {"lf": ("globals_preconditioner",),
                                                                       "direct": ("globals_preconditioner",)})])
def test_posterior_preconditionings_reach_both_strategies_and_key_only_when_on(name, only_its, tmp_path, monkeypatch):
    import dataclasses

    assert not getattr(bench.strategy(bench.QUICK, "lf"), name)
    on = dataclasses.replace(bench.QUICK, **{name: True})
    assert getattr(bench.strategy(on, "lf"), name) and getattr(bench.strategy(on, "direct"), name)
    assert on.training_key() != bench.QUICK.training_key()
    assert on.training_key()["direct"][name] is True and on.training_key()["lf"][name] is True
    # Off, the setting (and those only it reads) is left out of the key, so folders cached before
    # it existed still match.
    off = bench.QUICK.training_key()
    for method in ("lf", "direct"):
        assert name not in off[method]
        for field in only_its.get(method, ()):
            assert field not in off[method] and field in on.training_key()[method]
    assert "preconditioner" in off["lf"]
    parsed = []
    monkeypatch.setattr(bench.Bench, "run", lambda self: parsed.append(self.settings))  # the option, not a run
    code, _, err = run_cli("bench", "--quick", "--" + name.replace("_", "-"), "-o", str(tmp_path))
    assert code == 0, err
    assert parsed and getattr(parsed[0], name) is True


def test_lf_site_counts_share_the_single_site_stages(quick_run, tmp_path):
    """LF's simulations and surrogates do not depend on n_s: a site-count sweep trains them once.
    Here the quick run's (5 sites) are reused for 3 sites."""
    import dataclasses
    import shutil

    import jax

    from hierdsl.checkpoint import load

    folder, code, _, _ = quick_run
    assert code == 0
    copy = str(tmp_path / "sites")
    shutil.copytree(folder, copy)
    stages = [f for f in os.listdir(os.path.join(copy, "cache")) if f.startswith("lf_single_site_")]
    assert len(stages) == 1
    run = bench.Bench(dataclasses.replace(bench.QUICK, sites=(3,)), copy)
    est3, cached = run.estimator("gaussian_linear", run.model("gaussian_linear", 3), 3, "lf", 200)
    assert not cached and est3.trained.max_sites == 3 and est3.simulator_calls == 200
    [name] = [f for f in os.listdir(os.path.join(copy, "cache")) if f.startswith("est_gaussian_linear_5_lf_")]
    est5 = load(os.path.join(copy, "cache", name), run.model("gaussian_linear", 5))
    # Reused, not re-run: the simulation stage's measured time comes from the store, the
    # surrogates are the 5-site estimator's, and the normaliser refitted from the same simulations.
    saved = run.single_site_stages("gaussian_linear", 200).load_arrays("simulations")
    assert est3.trained.seconds["simulate"] == float(saved["__seconds__"])
    for part in ("surrogate", "normaliser"):
        for a, b in zip(jax.tree.leaves(getattr(est3.trained, part)), jax.tree.leaves(getattr(est5.trained, part))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [f for f in os.listdir(os.path.join(copy, "cache")) if f.startswith("lf_single_site_")] == stages
    # A surrogate setting keys its own stages; a posterior setting does not.
    other = bench.Bench(dataclasses.replace(bench.QUICK, surrogate_epochs=6), copy)
    same = bench.Bench(dataclasses.replace(bench.QUICK, epochs=4), copy)
    assert other.single_site_stages("gaussian_linear", 200).folder != same.single_site_stages("gaussian_linear", 200).folder
    assert same.single_site_stages("gaussian_linear", 200).folder == os.path.join(copy, "cache", stages[0])


def test_report_only_without_rows_names_what_it_wrote(tmp_path):
    code, out, err = run_cli("bench", "--quick", "-o", str(tmp_path), "--report-only")
    assert code == 0, err
    assert out.strip().startswith("| task | n_s | method") and "gaussian_linear" not in out
    assert err.strip().endswith(f"wrote results.md and results.jsonl to {tmp_path}")


def test_task_models_ship_inside_the_package():
    """A non-editable install has no examples/ folder beside it: bench reads its task models from the
    `hierdsl.examples` package, and pyproject's package data must carry every one of them."""
    import fnmatch
    import importlib.resources
    import tomllib

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        setuptools = tomllib.load(f)["tool"]["setuptools"]
    assert "hierdsl.examples" in setuptools["packages"]
    assert setuptools["package-dir"]["hierdsl.examples"] == "examples"
    patterns = setuptools["package-data"]["hierdsl.examples"]
    package = importlib.resources.files("hierdsl.examples")
    assert os.path.samefile(bench.EXAMPLES, str(package))
    for task in bench.TASKS.values():
        assert any(fnmatch.fnmatch(task.file, p) for p in patterns), task.file
        assert (package / task.file).is_file(), task.file
    assert any(fnmatch.fnmatch("eight_schools.csv", p) for p in patterns)
