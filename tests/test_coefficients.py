"""The coefficient engine (`gcfg_core.coefficients`) against formulas written out independently here."""

from __future__ import annotations

import math

import pytest
import torch

from gcfg_core.coefficients import CFG_PLUS_PLUS_MULTIPLIER, GuidanceWeights, step_coefficients
from gcfg_core.guidance import combine_sources
from gcfg_core.plan import classic_plan, standard_plan
from gcfg_core.terms import GuidanceTerm, StepWindow


def one_image(weights, has_negative=False, parts=(1.0,), step=0, steps=10):
    coefficients = step_coefficients(weights, [parts], [has_negative], step, steps)
    return coefficients.images[0], dict((term.key, c) for term, c in coefficients.terms)


def test_one_prompt_term_is_classic_cfg():
    # classic CFG without a negative prompt: E₀ + s·(P − E₀) → E₀ gets 1 − s, P gets s
    image, terms = one_image(GuidanceWeights(7.5))
    assert (image.uncond, image.prompt, image.negative, terms) == (1 - 7.5, (7.5,), 0.0, {})


@pytest.mark.parametrize("scale", [7.0, 7.5, 3.3, 0.1, 12.345678, 1e-3, 29.9])
def test_classic_negative_has_weight_one_minus_s_and_the_prior_zero(scale):
    image, _ = one_image(GuidanceWeights(scale), has_negative=True)
    assert image.uncond == 0.0  # exactly: the prior must never run
    assert image.negative == 1.0 - scale and image.prompt == (scale,)


def test_numeric_negative_scale_of_one_minus_s_equals_classic():
    for scale in (7.0, 5.0, 2.5):
        classic, _ = one_image(GuidanceWeights(scale), has_negative=True)
        numeric, _ = one_image(GuidanceWeights(scale, negative_scale=1.0 - scale), has_negative=True)
        assert numeric == classic


def test_classic_negative_takes_the_uncond_role_for_every_term():
    terms = (GuidanceTerm("concept", None, 2.5), GuidanceTerm("main", "in Van Gogh style", 4.0))
    image, weights = one_image(GuidanceWeights(5.0, terms=terms), has_negative=True)
    assert image.uncond == 0.0 and image.negative == 1 - (5.0 + 2.5 + 4.0)
    assert weights == {("concept", None): 2.5, ("main", "in Van Gogh style"): 4.0}


def test_numeric_negative_with_terms_leaves_the_rest_to_the_prior():
    terms = (GuidanceTerm("concept", None, 2.5), GuidanceTerm("main", "b", 4.0))
    image, _ = one_image(GuidanceWeights(5.0, negative_scale=-2.0, terms=terms), has_negative=True)
    assert image.negative == -2.0 and image.uncond == 1 - (5.0 - 2.0 + 2.5 + 4.0)
    without, _ = one_image(GuidanceWeights(5.0, negative_scale=-2.0, terms=terms), has_negative=False)
    assert without.negative == 0.0 and without.uncond == 1 - (5.0 + 2.5 + 4.0)


def test_and_weights_per_image_and_mixed_negatives_in_one_batch():
    weights = GuidanceWeights(5.0, terms=(GuidanceTerm("main", "dog", 2.0),))
    coefficients = step_coefficients(weights, [(1.0, 0.5), (0.2,)], [True, False], 0, 4)
    first, second = coefficients.images
    assert first.prompt == (5.0, 2.5) and first.negative == 1 - 7.5 - 2.0 and first.uncond == 0.0
    assert second.prompt == (1.0,) and second.negative == 0.0 and second.uncond == 1 - 1.0 - 2.0
    assert coefficients.uncond_images == [1] and coefficients.negative_images == [0]


def test_cfg_plus_plus_scales_every_weight_the_user_typed():
    m = CFG_PLUS_PLUS_MULTIPLIER
    terms = (GuidanceTerm("concept", None, 2.5), GuidanceTerm("main", "dog", 2.0))
    image, coefficients = one_image(GuidanceWeights(7.0, negative_scale=-1.0, terms=terms, multiplier=m),
                                    has_negative=True)
    assert image.prompt == (m * 7.0,) and image.negative == m * -1.0
    assert coefficients == {("concept", None): m * 2.5, ("main", "dog"): m * 2.0}
    assert image.uncond == pytest.approx(1 - m * (7.0 - 1.0 + 2.5 + 2.0), abs=1e-15)
    # `+w text` is the AND prompt `text :w/s` on CFG++ too: both weigh the dog rows by m·w.
    and_image, _ = one_image(GuidanceWeights(7.0, multiplier=m), parts=(1.0, 2.0 / 7.0))
    term_image, term_weights = one_image(GuidanceWeights(7.0, terms=(GuidanceTerm("main", "dog", 2.0),),
                                                         multiplier=m))
    assert and_image.prompt[1] == pytest.approx(term_weights[("main", "dog")], rel=1e-15)
    assert and_image.uncond == pytest.approx(term_image.uncond, rel=1e-15)


def test_cfg_one_with_a_prior_gives_the_prior_coefficient_zero():
    image, _ = one_image(GuidanceWeights(1.0))
    assert image.uncond == 0.0
    weights_summing_to_one = GuidanceWeights(0.25, terms=(GuidanceTerm("main", "b", 0.75),))
    assert one_image(weights_summing_to_one)[0].uncond == 0.0


def test_windowed_terms_count_only_while_active_and_zero_weights_never():
    terms = (GuidanceTerm("main", "b", 2.0, StepWindow(0.0, 0.5)), GuidanceTerm("concept", None, 0.0))
    active, active_terms = one_image(GuidanceWeights(7.0, terms=terms), step=4, steps=10)
    later, later_terms = one_image(GuidanceWeights(7.0, terms=terms), step=5, steps=10)
    assert active.uncond == 1 - 9.0 and active_terms == {("main", "b"): 2.0}
    assert later.uncond == 1 - 7.0 and later_terms == {}


def test_step_out_of_range_and_bad_numbers_are_errors():
    with pytest.raises(ValueError, match="step must be in"):
        step_coefficients(GuidanceWeights(7.0), [(1.0,)], [False], 10, 10)
    with pytest.raises(ValueError, match="cfg_scale must be a finite number"):
        GuidanceWeights(math.nan)
    with pytest.raises(ValueError, match="2 images but has_negative 1"):
        step_coefficients(GuidanceWeights(7.0), [(1.0,), (1.0,)], [False], 0, 1)


def test_coefficients_sum_to_one_in_every_case():
    terms = (GuidanceTerm("concept", None, 2.5), GuidanceTerm("main", "b", -1.25, StepWindow(0.2, 0.6)))
    for negative_scale in (None, -3.0, 0.5):
        for multiplier in (1.0, CFG_PLUS_PLUS_MULTIPLIER):
            weights = GuidanceWeights(6.5, negative_scale, terms, multiplier)
            for step in range(5):
                coefficients = step_coefficients(weights, [(1.0, 0.3), (2.0,)], [True, False], step, 5)
                for image in coefficients.images:
                    total = math.fsum([image.uncond, image.negative, *image.prompt,
                                       *(c for _, c in coefficients.terms)])
                    assert total == pytest.approx(1.0, abs=1e-12)


# --- the plan's sources and their combination --------------------------------------------------------------


def predictions(batch=2):
    generator = torch.Generator().manual_seed(0)
    return {name: torch.randn(batch, 4, 2, 2, generator=generator) for name in ("E", "P", "N", "C", "T")}


def test_classic_plan_is_bit_identical_to_the_webuis_cfg():
    d = predictions()
    plan = classic_plan(7.0, "cat", "ugly")
    coefficients = step_coefficients(plan.weights, [(1.0,)] * 2, [True] * 2, 0, 1)
    sources = plan.source_coefficients(coefficients)
    assert list(sources) == [("main", "ugly"), ("main", "cat")]  # the negative prompt is the base
    named = {("main", "ugly"): d["N"], ("main", "cat"): d["P"]}
    result = combine_sources([(named[key], values) for key, values in sources.items()])
    expected = d["N"] + (d["P"] - d["N"]) * 7.0  # the WebUI's combine_denoised, in its order of operations
    assert torch.equal(result, expected)


def test_numeric_negative_with_a_prior_on_analytic_predictions():
    d = predictions()
    s, n, w = 5.0, -1.5, 2.5
    plan = standard_plan(s, "cat", "ugly", negative_scale=n, concept_weight=w)
    coefficients = step_coefficients(plan.weights, [(1.0,)] * 2, [True] * 2, 0, 1)
    named = {("prior", ""): d["E"], ("main", "cat"): d["P"], ("main", "ugly"): d["N"], ("concept", None): d["C"]}
    result = combine_sources([(named[key], values) for key, values in plan.source_coefficients(coefficients).items()])
    expected = (1 - s - n - w) * d["E"] + s * d["P"] + n * d["N"] + w * d["C"]
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-5)


def test_autoguidance_with_the_main_model_as_uncond_is_the_plain_prompt():
    # E₀ = the main model with the prompt itself: the guidance difference vanishes at every CFG scale
    plan = standard_plan(6.0, "cat", uncond_prompt="cat")
    plan = type(plan)(plan.weights, plan.prompt, uncond_model="main", uncond_prompt="cat")
    coefficients = step_coefficients(plan.weights, [(1.0,)], [False], 0, 1)
    assert plan.source_coefficients(coefficients) == {("main", "cat"): [1.0]}


def test_equal_sources_are_summed_and_zero_sources_dropped():
    plan = standard_plan(1.0, "cat", extra_terms=[GuidanceTerm("main", "cat", 2.0), GuidanceTerm("main", "x", 0.0)])
    coefficients = step_coefficients(plan.weights, [(1.0,)], [False], 0, 1)
    assert plan.source_coefficients(coefficients) == {("prior", ""): [-2.0], ("main", "cat"): [3.0]}
