"""bench/evidence.py's pure helpers: the numbers the generated docs quote come from these."""
import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("bench_evidence", Path(__file__).resolve().parents[2] / "bench" / "evidence.py")
results = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(results)


def test_median_step_skips_warmup():
    assert results.median_step([9.0, 9.0, 9.0, 1.0, 2.0, 3.0]) == 2.0
    assert results.median_step([5.0, 1.0]) == 3.0  # too few steps: all of them


def test_plateau_rank_is_smallest_rank_within_one_row_of_best():
    row = {"n_eval": 100}
    res = {1: {**row, "accuracy": 0.50}, 4: {**row, "accuracy": 0.61}, 16: {**row, "accuracy": 0.62},
           64: {**row, "accuracy": 0.60}, 8: None}
    assert results.plateau_rank(res) == 4
    assert results.plateau_rank({1: None}) is None


def test_mean_spread_reports_every_seed_range():
    assert results.mean_spread([0.5]) == "50.0"
    assert results.mean_spread([0.5, 0.6, 0.7]) == "60.0 ± 10.0 (50.0-70.0)"


def test_peak_rss_is_positive_and_reset_does_not_raise():
    results.reset_peak()
    assert results.peak_rss_mib() > 0


def test_unknown_experiment_is_rejected(capsys):
    with pytest.raises(SystemExit):
        results.main(["--only", "exp9"])
    assert "exp9" in capsys.readouterr().err


def test_loaded_timings_are_remeasured_then_marked(tmp_path, monkeypatch):
    # the worker's timing is judged by the cores OTHER processes used meanwhile (bench/machine.py's rule)
    others = iter([1.5, 0.9, 0.05])
    monkeypatch.setattr(results.quiet, "wait_quiet", lambda *a, **k: 0.0)

    def fake_once(self, name, spec):
        return {"step_s": 1.0, "wall_s": 1.0, "load_end": 3.0, "timing_check": results.timing_check(2.0, next(others))}
    monkeypatch.setattr(results.Runner, "run_once", fake_once)
    run = results.Runner(tmp_path, quick=True, reuse=False, log=lambda m: None, remeasure=1)
    first = run("exp1", "a")  # loaded twice: the quieter attempt is kept, and marked
    assert first["timing_check"] == {"util_cores": 2.0, "others_cores": 0.9, "verdict": "loaded", "attempts": 2}
    assert results.timing_mark(first) == " †"
    second = run("exp1", "b")  # quiet at once: no re-measurement, no mark
    assert second["timing_check"]["attempts"] == 1 and results.timing_mark(second) == ""
    # a result saved before timings were checked is never published as if it had been
    assert results.timing_verdict({"step_s": 4.5}) == "unchecked" and results.timing_mark(second, {"step_s": 4.5}) == " †"
    reused = results.Runner(tmp_path, quick=True, reuse=False, log=lambda m: None, report_only=True)("exp1", "a")
    assert reused["timing_check"]["verdict"] == "loaded"
