"""Sampler registry, schedules, seeded determinism and per-image independence."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gcfg_core.coefficients import GuidanceWeights
from gcfg_core.configs import sd1_alphas_cumprod
from gcfg_core.denoiser import GCFGDenoiser, UNetDenoiser
from gcfg_core.kdiff import k_diffusion_modules
from gcfg_core.plan import GuidancePlan
from gcfg_core.sampling import SAMPLER_NAMES, SAMPLERS, ImageNoise, Scheduler, resolve_sampler, sample, schedule_sigmas
from gcfg_core.terms import GuidanceTerm, StepWindow

AC = sd1_alphas_cumprod()


class ToyEps(nn.Module):
    def __init__(self, a: float):
        super().__init__()
        self.a = a

    def forward(self, x, t, context=None):
        shift = 0.0 if context is None else context.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return torch.tanh(self.a * x) + shift


class StepRecorder:
    def __init__(self, inner):
        self.inner = inner
        self.steps: list[int] = []

    def __call__(self, x, sigma, **extra):
        result = self.inner(x, sigma, **extra)
        self.steps.append(self.inner.last_step)
        return result


def toy_gcfg(sigmas, window=None):
    models = {"prior": UNetDenoiser(ToyEps(0.5), AC), "main": UNetDenoiser(ToyEps(-0.3), AC)}
    # the prompt at weight 0 is not evaluated: the main model runs for the (windowed) term only
    plan = GuidancePlan(GuidanceWeights(0.0, terms=(GuidanceTerm("main", "a", 3.0, window),)), "a")
    conds = {"": torch.zeros(77, 8), "a": torch.full((77, 8), 0.1)}
    return GCFGDenoiser(models, plan, conds, sigmas)


def run(name, seeds, steps=6):
    spec, scheduler = resolve_sampler(name)
    sigmas = schedule_sigmas(spec, scheduler, steps, UNetDenoiser(nn.Identity(), AC))
    model = StepRecorder(toy_gcfg(sigmas))
    return sample(model, ImageNoise(seeds, (4, 8, 8)), sigmas, name, seeds=seeds), model.steps


def test_unknown_sampler_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"unknown sampler 'Eulr'; valid: DPM\+\+ 2M, .*Euler a, Euler"):
        resolve_sampler("Eulr")
    with pytest.raises(ValueError, match="unknown schedule type 'Linear'"):
        resolve_sampler("Euler", "Linear")


def test_issue_samplers_and_aliases_resolve():
    for name in ("Euler", "Euler a", "DPM++ 2M", "DPM++ SDE"):
        assert name in SAMPLER_NAMES
    assert resolve_sampler("DPM++ 2M Karras") == (resolve_sampler("DPM++ 2M")[0], Scheduler.KARRAS)
    assert resolve_sampler("Euler")[1] is Scheduler.UNIFORM
    assert resolve_sampler("DPM++ 2M")[1] is Scheduler.KARRAS
    assert resolve_sampler("DPM++ 2M", "Exponential")[1] is Scheduler.EXPONENTIAL


def test_schedules_match_k_diffusion_and_the_webui_rules():
    sampling, _ = k_diffusion_modules()
    den = UNetDenoiser(nn.Identity(), AC)
    for spec in SAMPLERS:
        for scheduler in (Scheduler.UNIFORM, Scheduler.KARRAS, Scheduler.EXPONENTIAL):
            sigmas = schedule_sigmas(spec, scheduler, 7, den)
            assert sigmas.shape == (8,) and sigmas[-1] == 0 and bool((sigmas[:-1] > 0).all())
    karras = schedule_sigmas(resolve_sampler("DPM++ 2M")[0], Scheduler.KARRAS, 7, den)
    torch.testing.assert_close(karras, sampling.get_sigmas_karras(7, float(den.sigma_min), float(den.sigma_max)))
    dpm2 = schedule_sigmas(resolve_sampler("DPM2")[0], Scheduler.KARRAS, 7, den)
    eight = sampling.get_sigmas_karras(8, float(den.sigma_min), float(den.sigma_max))
    torch.testing.assert_close(dpm2, torch.cat([eight[:-2], eight[-1:]]))  # next-to-last sigma dropped
    torch.testing.assert_close(schedule_sigmas(resolve_sampler("Euler")[0], Scheduler.UNIFORM, 7, den),
                               den.get_sigmas(7))


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_every_sampler_runs_and_sees_every_step_in_order(name):
    result, steps = run(name, [1, 2])
    assert result.shape == (2, 4, 8, 8) and torch.isfinite(result).all()
    assert steps == sorted(steps) and set(steps) == set(range(6))
    if resolve_sampler(name)[0].second_order:
        assert len(steps) > 6  # several calls per step, still mapped to the right step


@pytest.mark.parametrize("name", ["Euler a", "DPM++ SDE", "DPM++ 2M SDE", "DPM2 a"])
def test_stochastic_samplers_are_deterministic_for_a_seed(name):
    first, _ = run(name, [11, 12])
    again, _ = run(name, [11, 12])
    other, _ = run(name, [13, 12])
    assert torch.equal(first, again)
    assert not torch.allclose(first[0], other[0])
    # Image 1 depends on its own seed only (WebUI-style per-image seeds).
    torch.testing.assert_close(first[1], other[1], rtol=0, atol=1e-6)


def test_windowed_term_with_a_second_order_sampler():
    spec, scheduler = resolve_sampler("Heun")
    sigmas = schedule_sigmas(spec, scheduler, 8, UNetDenoiser(nn.Identity(), AC))
    model = StepRecorder(toy_gcfg(sigmas, StepWindow(0.0, 0.5)))
    counter = model.inner.models["main"] = _Counting(model.inner.models["main"], model.inner)
    sample(model, ImageNoise([0], (4, 8, 8)), sigmas, "Heun", seeds=[0])
    # Heun evaluates step i at σᵢ and its corrector at σᵢ₊₁, which belongs to step i+1 (documented rule):
    # the term runs for σ in steps 0-3 only.
    assert counter.steps == [0, 1, 1, 2, 2, 3, 3]


class _Counting:
    def __init__(self, inner, owner):
        self.inner, self.owner, self.steps = inner, owner, []

    def __call__(self, x, sigma, *, context=None):
        self.steps.append(self.owner.last_step)
        return self.inner(x, sigma, context=context)


def test_image_noise_is_per_image():
    a, b = ImageNoise([5, 6], (3,)), ImageNoise([5, 7], (3,))
    first_a, first_b = a.next(), b.next()
    assert torch.equal(first_a[0], first_b[0]) and not torch.equal(first_a[1], first_b[1])
    assert torch.equal(first_a[0], torch.randn(3, generator=torch.Generator().manual_seed(5)))
