"""The training benchmark's bookkeeping (not its timings): interleaved repetitions, min and median, their ratios."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent / "benchmarks" / "bench_train.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_repetitions_interleave_in_alternating_order(bench):
    calls = []

    def measure(name, values):
        values = iter(values)

        def call() -> float:
            calls.append(name)
            return next(values)
        return call

    samples = bench.interleaved({"ours": measure("ours", [1.0, 2.0, 3.0, 4.0]),
                                 "reference": measure("reference", [5.0, 6.0, 7.0, 8.0])}, 4)
    assert calls == ["ours", "reference", "reference", "ours", "ours", "reference", "reference", "ours"]
    assert samples == {"ours": [1.0, 2.0, 3.0, 4.0], "reference": [5.0, 6.0, 7.0, 8.0]}


def test_min_median_and_speedups_survive_a_noisy_repetition(bench):
    # one repetition of ours ran while the machine was busy (5.0 s/image): min and median ignore it
    ours, reference = [1.0, 5.0, 1.2], [2.0, 2.4, 9.0]
    assert bench.summary(ours) == {"min": 1.0, "median": 1.2}
    ratio = bench.speedups(ours, reference)
    assert ratio["min"] == pytest.approx(2.0 / 1.0) and ratio["median"] == pytest.approx(2.4 / 1.2)
