"""Guidance terms, step windows and plans (coefficients 1 − Σw, dropped zeros, the standard plan)."""

from __future__ import annotations

import math

import pytest

from gcfg_core.terms import GuidancePlan, GuidanceTerm, ModelSlot, StepWindow, standard_plan


def coefficient_map(plan: GuidancePlan, step: int, steps: int) -> dict[tuple[str, str | None, str], float]:
    return {(term.model, term.cond, term.label): c for term, c in plan.coefficients(step, steps)}


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


def test_coefficients_sum_to_one_and_uncond_is_one_minus_sum():
    plan = GuidancePlan("prior", (GuidanceTerm("main", "a", 5.0), GuidanceTerm("main", "b", 4.0),
                                  GuidanceTerm("concept", None, -1.5)))
    pairs = plan.coefficients(0, 10)
    assert pairs[0][0] == plan.uncond_term and pairs[0][1] == 1 - 7.5
    assert math.fsum(c for _, c in pairs) == 1.0


def test_zero_coefficients_are_dropped():
    plan = GuidancePlan("prior", (GuidanceTerm("main", "a", 1.0), GuidanceTerm("concept", None, 0.0)))
    assert coefficient_map(plan, 0, 4) == {("main", "a", ""): 1.0}  # uncond 1 − 1 = 0 and the 0-weight term


def test_windowed_term_changes_the_uncond_coefficient_only_while_active():
    plan = GuidancePlan("prior", (GuidanceTerm("main", "a", 7.0),
                                  GuidanceTerm("main", "b", 2.0, StepWindow(0.0, 0.5))))
    assert coefficient_map(plan, 4, 10)[("prior", "", "uncond")] == 1 - 9.0
    assert ("main", "b", "") in coefficient_map(plan, 4, 10)
    assert coefficient_map(plan, 5, 10) == {("prior", "", "uncond"): -6.0, ("main", "a", ""): 7.0}


@pytest.mark.parametrize("scale", [7.0, 7.5, 3.3, 0.1, 12.345678, 1e-3, 29.9])
def test_classic_negative_gives_the_prior_coefficient_exactly_zero(scale):
    plan = standard_plan(scale, "cat", "blurry")
    pairs = coefficient_map(plan, 0, 20)
    assert pairs == {("main", "cat", "prompt"): scale, ("main", "blurry", "uncond"): 1.0 - scale}
    assert "prior" not in plan.models()


def test_classic_negative_takes_the_uncond_role_for_every_term_so_the_prior_never_runs():
    extra = GuidanceTerm("main", "in Van Gogh style", 4.0)
    plan = standard_plan(5.0, "sunflower", "blurry", concept_weight=2.5, extra_terms=[extra])
    assert (plan.uncond_model, plan.uncond_cond) == ("main", "blurry")
    assert coefficient_map(plan, 0, 1)[("main", "blurry", "uncond")] == 1 - (5.0 + 2.5 + 4.0)
    assert plan.models() == {"main", "concept"}


def test_empty_negative_is_no_term_and_the_prior_carries_one_minus_cfg():
    plan = standard_plan(7.0, "cat", "")
    assert [t.label for t in plan.terms] == ["prompt"]
    assert coefficient_map(plan, 0, 20) == {("prior", "", "uncond"): -6.0, ("main", "cat", "prompt"): 7.0}


def test_standard_plan_with_negative_scale_concept_and_extra_terms():
    extra = GuidanceTerm("main", "in Van Gogh style", 4.0)
    plan = standard_plan(5.0, "sunflower", "blurry", negative_scale=-2.0, concept_weight=2.5, extra_terms=[extra])
    assert [(t.model, t.cond, t.weight) for t in plan.terms] == [
        ("main", "sunflower", 5.0), ("main", "blurry", -2.0), ("concept", None, 2.5),
        ("main", "in Van Gogh style", 4.0)]
    assert coefficient_map(plan, 0, 1)[("prior", "", "uncond")] == 1 - (5.0 - 2.0 + 2.5 + 4.0)
    assert plan.models() == {"prior", "main", "concept"}


def test_step_out_of_range_is_an_error():
    plan = standard_plan(7.0, "cat")
    with pytest.raises(ValueError, match="step must be in"):
        plan.coefficients(10, 10)
