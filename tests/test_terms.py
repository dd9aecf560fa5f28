"""Guidance terms and step windows."""

from __future__ import annotations

import math

import pytest

from gcfg_core.terms import GuidanceTerm, ModelSlot, StepWindow


@pytest.mark.parametrize(("start", "end"), [(0.5, 0.5), (-0.1, 0.5), (0.2, 1.1), (0.6, 0.4), (math.nan, 1.0)])
def test_step_window_rejects_bad_bounds(start, end):
    with pytest.raises(ValueError, match="step window"):
        StepWindow(start, end)


@pytest.mark.parametrize(("window", "steps", "active"), [
    (StepWindow(0.0, 0.5), 10, [0, 1, 2, 3, 4]),
    (StepWindow(0.5, 1.0), 10, [5, 6, 7, 8, 9]),
    (StepWindow(0.3, 0.7), 10, [3, 4, 5, 6]),  # 0.3·10 is 3.0000000000000004 in floats: must still start at 3
    (StepWindow(0.1, 0.2), 10, [1]),
    (StepWindow(0.0, 0.5), 3, [0, 1]),  # 1/3 < 0.5 ≤ 2/3
    (StepWindow(0.25, 0.75), 8, [2, 3, 4, 5]),
])
def test_window_switches_exactly_at_the_documented_step(window, steps, active):
    assert [i for i in range(steps) if window.is_active(i, steps)] == active


def test_complementary_windows_partition_the_steps():
    for steps in range(1, 40):
        first, second = StepWindow(0.0, 0.35), StepWindow(0.35, 1.0)
        assert all(first.is_active(i, steps) != second.is_active(i, steps) for i in range(steps))


def test_term_validation_and_normalisation():
    with pytest.raises(ValueError, match="weight"):
        GuidanceTerm("main", "x", math.inf)
    with pytest.raises(ValueError, match="weight"):
        GuidanceTerm("main", "x", True)
    with pytest.raises(ValueError, match="model"):
        GuidanceTerm(" ", "x", 1.0)
    term = GuidanceTerm(ModelSlot.PRIOR, "x", 2, StepWindow(0.0, 1.0))
    assert term.model == "prior" and type(term.model) is str and term.weight == 2.0 and term.window is None
