"""`UNetDenoiser` and `GCFGDenoiser`: the GCFG identities on tiny random UNets and analytic toy models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gcfg_core.coefficients import GuidanceWeights
from gcfg_core.configs import TINY, sd1_alphas_cumprod
from gcfg_core.denoiser import GCFGDenoiser, Prediction, UNetDenoiser, step_index
from gcfg_core.guidance import combine
from gcfg_core.kdiff import k_diffusion_modules
from gcfg_core.models import build_unet, dezero_
from gcfg_core.plan import GuidancePlan, classic_plan, standard_plan
from gcfg_core.terms import GuidanceTerm, StepWindow

CONTEXT_DIM = TINY.unet.context_dim
AC = sd1_alphas_cumprod()


def tiny_unet(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return dezero_(build_unet(TINY.unet), seed=seed).eval()


@pytest.fixture(scope="module")
def unets() -> dict[str, nn.Module]:
    return {"prior": tiny_unet(1), "main": tiny_unet(0)}


def contexts(*prompts: str, tokens: int = 77, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {p: torch.randn(tokens, CONTEXT_DIM, generator=g) for p in prompts}


class Counting:
    """Wraps a denoiser and records the rows of every call."""

    def __init__(self, inner):
        self.inner = inner
        self.rows: list[int] = []

    def __call__(self, x, sigma, *, context=None):
        self.rows.append(x.shape[0])
        return self.inner(x, sigma, context=context)


class ToyEps(nn.Module):
    """An analytic 'UNet': eps = a·x_t + mean(context) + t/1000, in any dtype."""

    def __init__(self, a: float):
        super().__init__()
        self.a = a

    def forward(self, x, t, context=None):
        shift = 0.0 if context is None else context.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return self.a * x + shift + t.view(-1, 1, 1, 1).to(x.dtype) / 1000


def sample_x(batch=2, sigma=2.0, seed=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 8, 8, generator=g) * sigma).to(dtype), torch.full((batch,), sigma, dtype=dtype)


SIGMAS = UNetDenoiser(nn.Identity(), AC).get_sigmas(10)


@torch.no_grad()
def test_one_main_term_is_classic_cfg_bit_for_bit(unets):
    main = UNetDenoiser(unets["main"], AC)
    conds = contexts("", "a cat")
    plan = classic_plan(7.5, "a cat")
    x, sigma = sample_x()
    result = GCFGDenoiser({"main": main}, plan, conds, SIGMAS)(x, sigma)
    # Classic CFG the WebUI way: one batched call, uncond + s·(cond − uncond). Same rows, same ops → equal.
    context = torch.cat([conds[""].expand(2, -1, -1), conds["a cat"].expand(2, -1, -1)])
    uncond, cond = main(torch.cat([x, x]), torch.cat([sigma, sigma]), context=context).split(2)
    assert torch.equal(result, uncond + 7.5 * (cond - uncond))


@torch.no_grad()
@pytest.mark.parametrize("scale", [7.0, 5.5, 3.3])
def test_classic_negative_is_weight_one_minus_s_and_the_prior_is_never_called(unets, scale):
    main, prior = UNetDenoiser(unets["main"], AC), Counting(UNetDenoiser(unets["prior"], AC))
    conds = contexts("", "a cat", "blurry")
    x, sigma = sample_x()
    denoiser = GCFGDenoiser({"prior": prior, "main": main}, standard_plan(scale, "a cat", "blurry"), conds, SIGMAS)
    result = denoiser(x, sigma)
    assert prior.rows == []
    context = torch.cat([conds["a cat"].expand(2, -1, -1), conds["blurry"].expand(2, -1, -1)])
    cond, negative = main(torch.cat([x, x]), torch.cat([sigma, sigma]), context=context).split(2)
    assert torch.equal(result, negative + scale * (cond - negative))  # the WebUI's classic formula, exactly
    # Another prior changes nothing.
    other = GCFGDenoiser({"prior": UNetDenoiser(unets["main"], AC), "main": main},
                         standard_plan(scale, "a cat", "blurry"), conds, SIGMAS)
    assert torch.equal(other(x, sigma), result)


@torch.no_grad()
def test_empty_negative_makes_the_prior_carry_one_minus_cfg(unets):
    main, prior = UNetDenoiser(unets["main"], AC), Counting(UNetDenoiser(unets["prior"], AC))
    conds = contexts("", "a cat")
    x, sigma = sample_x()
    result = GCFGDenoiser({"prior": prior, "main": main}, standard_plan(7.0, "a cat"), conds, SIGMAS)(x, sigma)
    assert prior.rows == [2]
    expected = combine(prior.inner(x, sigma, context=conds[""].expand(2, -1, -1)),
                       [main(x, sigma, context=conds["a cat"].expand(2, -1, -1))], [7.0])
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-6)


@torch.no_grad()
def test_x0_space_and_eps_space_combination_agree():
    # float64 analytic models: the identity x0 = x − σ·eps is exact up to float64 rounding.
    models = {"prior": UNetDenoiser(ToyEps(0.3), AC), "main": UNetDenoiser(ToyEps(-0.2), AC),
              "concept": UNetDenoiser(ToyEps(0.7), AC)}
    conds = {k: v.double() for k, v in contexts("", "a", "b").items()}
    plan = standard_plan(6.0, "a", extra_terms=[GuidanceTerm("main", "b", -2.0), GuidanceTerm("concept", None, 2.5)])
    x, sigma = sample_x(dtype=torch.float64, sigma=5.0)
    x0 = GCFGDenoiser(models, plan, conds, SIGMAS)(x, sigma)
    t = models["prior"].schedule.sigma_to_t(sigma.float()).double()
    c_in = (sigma**2 + 1).rsqrt().view(-1, 1, 1, 1)

    def eps(name, cond):
        context = None if cond is None else conds[cond].expand(2, -1, -1)
        return models[name].unet(x * c_in, t, context=context)

    eps_combined = combine(eps("prior", ""), [eps("main", "a"), eps("main", "b"), eps("concept", None)],
                           [6.0, -2.0, 2.5])
    torch.testing.assert_close(x0, x - sigma.view(-1, 1, 1, 1) * eps_combined, rtol=0, atol=1e-6)


@torch.no_grad()
def test_zero_weight_term_is_a_no_op_and_its_model_is_not_called(unets):
    main, prior = UNetDenoiser(unets["main"], AC), UNetDenoiser(unets["prior"], AC)
    concept = Counting(UNetDenoiser(tiny_unet(2), AC))
    conds = contexts("", "a cat")
    x, sigma = sample_x()
    base = standard_plan(7.0, "a cat")
    with_zero = standard_plan(7.0, "a cat", extra_terms=[GuidanceTerm("concept", None, 0.0)])
    models = {"prior": prior, "main": main, "concept": concept}
    assert torch.equal(GCFGDenoiser(models, with_zero, conds, SIGMAS)(x, sigma),
                       GCFGDenoiser(models, base, conds, SIGMAS)(x, sigma))
    assert concept.rows == []


@torch.no_grad()
def test_one_batched_call_per_distinct_model_equals_unbatched_calls(unets):
    main, prior = Counting(UNetDenoiser(unets["main"], AC)), Counting(UNetDenoiser(unets["prior"], AC))
    conds = contexts("", "sunflower", "in Van Gogh style", "blurry")
    plan = standard_plan(5.0, "sunflower", "blurry", negative_scale=-1.0,
                         extra_terms=[GuidanceTerm("main", "in Van Gogh style", 4.0)])
    x, sigma = sample_x(batch=2)
    denoiser = GCFGDenoiser({"prior": prior, "main": main}, plan, conds, SIGMAS)
    result = denoiser(x, sigma)
    assert prior.rows == [2] and main.rows == [6]  # 2 images × 3 prompts in one call
    assert denoiser.rows_per_call == 8

    def alone(model, prompt):
        return model.inner(x, sigma, context=conds[prompt].expand(2, -1, -1))

    expected = combine(alone(prior, ""), [alone(main, p) for p in ("sunflower", "blurry", "in Van Gogh style")],
                       [5.0, -1.0, 4.0])
    # Batch composition may change the kernels' blocking, hence the last few bits.
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-5)


@torch.no_grad()
def test_slots_sharing_one_model_share_one_call(unets):
    shared = Counting(UNetDenoiser(unets["main"], AC))
    conds = contexts("", "a cat")
    GCFGDenoiser({"prior": shared, "main": shared}, standard_plan(7.0, "a cat"), conds, SIGMAS)(*sample_x())
    assert shared.rows == [4]


@torch.no_grad()
def test_images_in_a_batch_are_independent(unets):
    main, prior = UNetDenoiser(unets["main"], AC), UNetDenoiser(unets["prior"], AC)
    conds = contexts("", "a cat", "a dog")
    conds["per image"] = torch.stack([conds["a cat"], conds["a dog"]])  # [B, T, C]: one prompt per image
    denoiser = GCFGDenoiser({"prior": prior, "main": main}, standard_plan(7.0, "per image"), conds, SIGMAS)
    x, sigma = sample_x(batch=2)
    changed = x.clone()
    changed[1] = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(9)) * 2
    first, second = denoiser(x, sigma), denoiser(changed, sigma)
    torch.testing.assert_close(first[0], second[0], rtol=0, atol=1e-6)
    assert not torch.allclose(first[1], second[1])
    alone = GCFGDenoiser({"prior": prior, "main": main}, standard_plan(7.0, "a cat"), conds, SIGMAS)
    # Batch 1 vs 2 may pick other kernel blockings; CFG 7 amplifies that rounding to ~1e-5 at values ~4.
    torch.testing.assert_close(alone(x[:1], sigma[:1])[0], first[0], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_prompts_of_different_token_lengths_go_to_separate_calls(unets):
    main = Counting(UNetDenoiser(unets["main"], AC))
    conds = {**contexts("", "short"), **contexts("long", tokens=154, seed=1)}
    plan = GuidancePlan(GuidanceWeights(3.0, terms=(GuidanceTerm("main", "long", 2.0),)), "short", uncond_model="main")
    x, sigma = sample_x(batch=1)
    result = GCFGDenoiser({"main": main}, plan, conds, SIGMAS)(x, sigma)
    assert sorted(main.rows) == [1, 2]
    parts = [main.inner(x, sigma, context=conds[p][None]) for p in ("", "short", "long")]
    torch.testing.assert_close(result, combine(parts[0], parts[1:], [3.0, 2.0]), rtol=0, atol=1e-5)


def test_step_index_follows_sigma_not_call_count():
    sigmas = SIGMAS
    for i in range(10):
        assert step_index(float(sigmas[i]), sigmas) == i
        between = float((sigmas[i] * sigmas[i + 1]).sqrt()) if i < 9 else float(sigmas[i]) / 2
        assert step_index(between, sigmas) == i  # 2nd-order / SDE intermediate evaluations
    assert step_index(float(sigmas[0]) * 1.5, sigmas) == 0


@torch.no_grad()
def test_windowed_term_switches_exactly_at_the_documented_step():
    models = {"prior": UNetDenoiser(ToyEps(0.1), AC), "main": UNetDenoiser(ToyEps(0.2), AC),
              "concept": Counting(UNetDenoiser(ToyEps(0.3), AC))}
    plan = standard_plan(4.0, "a", extra_terms=[GuidanceTerm("concept", None, 2.0, StepWindow(0.0, 0.5))])
    denoiser = GCFGDenoiser(models, plan, contexts("", "a"), SIGMAS)
    active = []
    for i in range(10):
        for sigma in (SIGMAS[i], (SIGMAS[i] + SIGMAS[i + 1]) / 2):
            before = len(models["concept"].rows)
            denoiser(*sample_x(batch=1, sigma=float(sigma)))
            active.append((i, len(models["concept"].rows) > before))
    assert [i for i, on in active if on] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


@torch.no_grad()
@pytest.mark.parametrize("prediction", [Prediction.EPS, Prediction.V])
def test_unet_denoiser_matches_k_diffusion_compvis_wrappers(unets, prediction):
    _, external = k_diffusion_modules()

    class Adapter(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("alphas_cumprod", AC)

        def apply_model(self, x, t, cond):
            return unets["main"](x, t, context=cond)

    wrapper = (external.CompVisDenoiser if prediction is Prediction.EPS else external.CompVisVDenoiser)(Adapter())
    ours = UNetDenoiser(unets["main"], AC, prediction)
    x, sigma = sample_x()
    context = contexts("a")["a"].expand(2, -1, -1)
    torch.testing.assert_close(ours(x, sigma, context=context), wrapper(x, sigma, cond=context), rtol=0, atol=1e-6)


@torch.no_grad()
def test_x0_prediction_returns_the_model_output():
    toy = ToyEps(0.5)
    x, sigma = sample_x()
    c_in = (sigma**2 + 1).rsqrt().view(-1, 1, 1, 1)
    t = UNetDenoiser(toy, AC).schedule.sigma_to_t(sigma)
    assert torch.equal(UNetDenoiser(toy, AC, Prediction.X0)(x, sigma), toy(x * c_in, t))


def test_missing_models_and_conditions_are_named():
    toy = UNetDenoiser(ToyEps(0.1), AC)
    with pytest.raises(ValueError, match=r"uses model\(s\) \['concept'\]"):
        GCFGDenoiser({"prior": toy, "main": toy}, standard_plan(7.0, "a", concept_weight=1.0), contexts("", "a"),
                     SIGMAS)
    with pytest.raises(ValueError, match="no encoded condition for model 'main' and prompt 'b'"):
        GCFGDenoiser({"prior": toy, "main": toy}, standard_plan(7.0, "b"), contexts("", "a"), SIGMAS)


def test_conditions_are_looked_up_per_model_first():
    models = {"prior": Counting(UNetDenoiser(ToyEps(0.1), AC)), "main": UNetDenoiser(ToyEps(0.1), AC)}
    conds = {**contexts("", "a"), ("prior", ""): torch.full((77, CONTEXT_DIM), 100.0)}
    x, sigma = sample_x(batch=1)
    with torch.no_grad():
        result = GCFGDenoiser(models, standard_plan(1.0, "a", "z", negative_scale=0.5, extra_terms=()),
                              {**conds, "z": conds["a"]}, SIGMAS)(x, sigma)
    prior_pred = models["prior"].inner(x, sigma, context=conds[("prior", "")][None])
    assert models["prior"].rows == [1] and prior_pred.mean() < -10  # the prior got its own "" encoding
    assert torch.isfinite(result).all()
