"""ε / v / x₀ conversions and the zero-terminal-SNR schedule, against formulas written out here; analytic models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from gcfg_core.configs import sd1_alphas_cumprod
from gcfg_core.denoiser import GCFGDenoiser, UNetDenoiser
from gcfg_core.parameterization import (
    Parameterization,
    Prediction,
    convert_prediction,
    denoised_from_output,
    output_from_denoised,
    rescale_zero_terminal_snr,
)
from gcfg_core.plan import standard_plan

P = Prediction


def analytic_point(seed=0, shape=(3, 4, 5, 5)):
    """x₀, ε, ᾱ per row and the DDPM quantities x_t = √ᾱ x₀ + √(1−ᾱ) ε, v = √ᾱ ε − √(1−ᾱ) x₀ (float64)."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g, dtype=torch.float64)
    eps = torch.randn(shape, generator=g, dtype=torch.float64)
    alpha = torch.tensor([0.9991, 0.31, 0.0047], dtype=torch.float64)
    a, s = alpha.sqrt().view(-1, 1, 1, 1), (1 - alpha).sqrt().view(-1, 1, 1, 1)
    return x0, eps, alpha, a * x0 + s * eps, a * eps - s * x0


@pytest.mark.parametrize("source", list(P))
@pytest.mark.parametrize("target", list(P))
def test_convert_prediction_between_every_pair(source, target):
    x0, eps, alpha, x_t, v = analytic_point()
    values = {P.EPS: eps, P.V: v, P.X0: x0}
    converted = convert_prediction(values[source], x_t, alpha, source, target)
    assert torch.allclose(converted, values[target], atol=1e-10)


def test_k_diffusion_form_gives_x0_for_every_prediction_and_inverts():
    x0, eps, alpha, x_t, v = analytic_point(seed=1)
    sigma = ((1 - alpha) / alpha).sqrt()  # σ² = (1−ᾱ)/ᾱ
    x = x0 + sigma.view(-1, 1, 1, 1) * eps  # k-diffusion's x, = x_t·√(σ²+1)
    assert torch.allclose(x, x_t * (sigma.view(-1, 1, 1, 1) ** 2 + 1).sqrt(), atol=1e-10)
    for prediction, output in ((P.EPS, eps), (P.V, v), (P.X0, x0)):
        assert torch.allclose(denoised_from_output(prediction, output, x, sigma), x0, atol=1e-9)
        assert torch.allclose(output_from_denoised(prediction, x0, x, sigma), output, atol=1e-9)


def test_zero_terminal_snr_matches_the_closed_form():
    alphas = sd1_alphas_cumprod()
    rescaled = rescale_zero_terminal_snr(alphas)
    root = alphas.double().sqrt()
    expected = ((root - root[-1]) * root[0] / (root[0] - root[-1])) ** 2
    expected[-1] = 4.8973451890853435e-08
    assert rescaled.dtype == torch.float32
    assert torch.allclose(rescaled.double(), expected, rtol=1e-5, atol=1e-9)
    assert rescaled[0] == alphas[0]  # the first step keeps its value
    assert bool((rescaled[1:] < rescaled[:-1]).all())  # still a decreasing ᾱ
    sigma_max = math.sqrt((1 - rescaled[-1].item()) / rescaled[-1].item())
    assert 4518 < sigma_max < 4520 and alphas[-1].item() > 1e-3  # the SD schedule alone ends near σ 14.6


def test_parameterization_labels_round_trip_and_bad_names_are_named():
    for text in ("eps", "v", "x0", "eps-ztsnr", "v-ztsnr"):
        assert Parameterization.parse(text).label == text
    assert Parameterization.parse(" V-ZTSNR ") == Parameterization(P.V, True)
    with pytest.raises(ValueError, match="'vpred'"):
        Parameterization.parse("vpred")
    schedule = sd1_alphas_cumprod()
    assert Parameterization(P.V, True).schedule(schedule)[-1].item() == pytest.approx(4.8973451890853435e-08)
    assert Parameterization(P.V).schedule(schedule) is schedule


class AnalyticUNet(nn.Module):
    """Predicts, in its own parameterisation and on its own schedule, the output whose x₀ is `x0` exactly."""

    def __init__(self, x0: torch.Tensor, prediction: Prediction, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.x0, self.prediction = x0, prediction
        self.log_sigmas = np.log(((1 - alphas_cumprod.double()) / alphas_cumprod.double()).sqrt().numpy())

    def forward(self, x_t, t, context=None):
        # σ at a fractional timestep: linear in log σ between the neighbouring steps.
        sigma = torch.tensor(np.exp(np.interp(t.double().numpy(), np.arange(1000), self.log_sigmas)))
        alpha = (1 / (1 + sigma**2)).view(-1, 1, 1, 1)
        a, s = alpha.sqrt(), (1 - alpha).sqrt()
        x_t, x0 = x_t.double(), self.x0.double()
        eps = (x_t - a * x0) / s
        output = {P.EPS: eps, P.V: a * eps - s * x0, P.X0: x0}[self.prediction]
        return output.float()


def test_models_with_different_parameterisations_and_schedules_agree_on_x0():
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(2, 4, 6, 6, generator=g)
    base = sd1_alphas_cumprod()
    ztsnr = rescale_zero_terminal_snr(base)
    sigma = torch.tensor([3.7, 0.42])  # inside both schedules' ranges, at different (fractional) timesteps
    x = x0 + sigma.view(-1, 1, 1, 1) * torch.randn(2, 4, 6, 6, generator=g)
    for prediction in P:
        for schedule in (base, ztsnr):
            denoiser = UNetDenoiser(AnalyticUNet(x0, prediction, schedule), schedule, prediction)
            assert torch.allclose(denoiser(x, sigma), x0, atol=2e-4), (prediction, schedule is ztsnr)
    eps_on_base = UNetDenoiser(nn.Identity(), base).schedule.sigma_to_t(sigma)
    v_on_ztsnr = UNetDenoiser(nn.Identity(), ztsnr).schedule.sigma_to_t(sigma)
    assert (v_on_ztsnr - eps_on_base).abs().min() > 1  # the same σ is another timestep on each schedule


def test_gcfg_combines_an_eps_prior_and_a_v_ztsnr_main_in_x0():
    g = torch.Generator().manual_seed(5)
    x0_prior, x0_main = torch.randn(2, 1, 4, 6, 6, generator=g)
    base = sd1_alphas_cumprod()
    ztsnr = rescale_zero_terminal_snr(base)
    denoisers = {"prior": UNetDenoiser(AnalyticUNet(x0_prior, P.EPS, base), base, P.EPS),
                 "main": UNetDenoiser(AnalyticUNet(x0_main, P.V, ztsnr), ztsnr, P.V)}
    sigmas = denoisers["main"].get_sigmas(10)
    conds = {"": torch.zeros(77, 8), "a cat": torch.ones(77, 8)}
    plan = standard_plan(6.0, "a cat")
    sigma = sigmas[4].reshape(1)
    x = x0_main + sigma * torch.randn(1, 4, 6, 6, generator=g)
    result = GCFGDenoiser(denoisers, plan, conds, sigmas)(x, sigma)
    assert torch.allclose(result, x0_prior + 6.0 * (x0_main - x0_prior), atol=2e-3)


def test_a_sigma_beyond_a_models_schedule_is_read_at_the_schedules_end():
    g = torch.Generator().manual_seed(6)
    x0 = torch.randn(2, 4, 6, 6, generator=g)
    base = sd1_alphas_cumprod()
    sigma_max = float(((1 - base[-1]) / base[-1]).sqrt())
    sigma = torch.tensor([4518.8, 1000.0])  # zero-terminal-SNR noise levels, far above the ε model's σ_max ≈ 14.6
    x = x0 + sigma.view(-1, 1, 1, 1) * torch.randn(2, 4, 6, 6, generator=g)
    for prediction in (P.EPS, P.V):
        unet = AnalyticUNet(x0, prediction, base)  # answers for its own t = 999, i.e. σ_max
        assert torch.allclose(UNetDenoiser(unet, base, prediction)(x, sigma), x0, atol=1e-3)
    eps = AnalyticUNet(x0, P.EPS, base)(x / (sigma.view(-1, 1, 1, 1) ** 2 + 1).sqrt(), torch.full((2,), 999.0))
    naive = x - sigma.view(-1, 1, 1, 1) * eps  # x − σ·ε with the sampler's σ: the ε error times 4500
    assert (naive - x0).abs().max() > 10 * sigma_max
