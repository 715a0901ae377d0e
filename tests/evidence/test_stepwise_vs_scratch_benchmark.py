"""benchmarks/stepwise_vs_scratch.py: the per-seed rows and their mean and spread (the study runs are the benchmark)."""

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "stepwise_vs_scratch.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("stepwise_vs_scratch", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _report(ladder, scratch, ladder_reach, scratch_reach):
    return {"scratch": {"stage": "median", "ladder_test_kappa": {"value": ladder, "ci_low": 0, "ci_high": 1},
                        "scratch_test_kappa": {"value": scratch, "ci_low": 0, "ci_high": 1},
                        "ladder_seconds": 200.0, "scratch_seconds": 198.0, "scratch_epochs": 3,
                        "scratch_best_val_kappa": 0.7, "ladder_time_to_scratch_best": ladder_reach,
                        "scratch_time_to_scratch_best": scratch_reach}}


def test_mean_and_sample_spread_over_seeds(bench):
    rows = [bench.seed_row(1, _report(0.90, 0.80, 50.0, 200.0), 600),
            bench.seed_row(2, _report(0.86, 0.82, 100.0, 150.0), 610),
            bench.seed_row(3, _report(0.88, 0.78, None, 180.0), 620)]
    assert rows[0]["reach_ratio"] == 0.25 and rows[2]["reach_ratio"] is None
    s = bench.summarise(rows)
    assert s["ladder_test_kappa"]["mean"] == pytest.approx(0.88)
    assert s["ladder_test_kappa"]["sd"] == pytest.approx(0.02)  # sample sd of 0.90, 0.86, 0.88
    assert s["kappa_difference"]["mean"] == pytest.approx((0.10 + 0.04 + 0.10) / 3)
    # A seed whose ladder never reached the scratch run's best is counted, not averaged as zero.
    assert s["seeds_where_ladder_reached"] == 2
    assert s["ladder_time_to_scratch_best"]["n"] == 2 and s["ladder_time_to_scratch_best"]["mean"] == 75.0
    assert "| 3 | 0.880" in bench.table(rows, s) and "| - |" in bench.table(rows, s)


def test_later_seeds_read_the_first_seeds_photos_and_cache(bench, tmp_path):
    first = bench.study_command("quick", tmp_path / "seed-1", 1, None, [])
    later = bench.study_command("quick", tmp_path / "seed-2", 2, tmp_path / "seed-1", ["data.normalize=graham"])
    assert not any(a.startswith("data.data=") for a in first)
    assert "seed=2" in later and "data.normalize=graham" in later
    assert f'data.cache="{tmp_path / "seed-1" / "data" / "cache"}"' in later
