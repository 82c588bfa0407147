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
