"""What a UNet predicts (ε, v or x₀), its noise schedule (optionally rescaled to zero terminal SNR), and conversions.

Two notations for the same diffusion (Karras et al. 2022 and DDPM, Ho et al. 2020)::

    k-diffusion:  x = x₀ + σ·ε                          (what samplers and denoisers see)
    DDPM:         x_t = √ᾱ·x₀ + √(1−ᾱ)·ε = x / √(σ²+1)   with σ² = (1−ᾱ)/ᾱ
    v:            v = √ᾱ·ε − √(1−ᾱ)·x₀                  (Salimans & Ho 2022; diffusers' "v_prediction")

Each model's output is turned into x₀ with its *own* prediction type and its *own* schedule before GCFG combines
terms, so models with different parameterisations (an ε SDXL base as the prior of a v-prediction, zero-terminal-SNR
fine-tune) can be mixed. Zero terminal SNR follows Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample
Steps are Flawed", Algorithm 1) with the final ᾱ the WebUI and ComfyUI substitute for 0 so that σ stays finite.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from torch import Tensor

# ᾱ_T after the rescale is exactly 0 (σ = ∞); the WebUI (`rescale_zero_terminal_snr_abar`) and ComfyUI put this
# value there instead, which makes σ_max ≈ 4518.8.
ZTSNR_LAST_ALPHA_CUMPROD = 4.8973451890853435e-08
_SAME_SIGMA_RTOL = 1e-5


class Prediction(str, enum.Enum):
    """What a UNet predicts (the names are diffusers' `prediction_type` values)."""

    EPS = "epsilon"
    X0 = "sample"
    V = "v_prediction"


_PREDICTION_NAMES = {"eps": Prediction.EPS, "v": Prediction.V, "x0": Prediction.X0}


@dataclass(frozen=True)
class Parameterization:
    """A model's prediction type and whether its schedule is rescaled to zero terminal SNR."""

    prediction: Prediction = Prediction.EPS
    zero_terminal_snr: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "prediction", Prediction(self.prediction))

    @property
    def label(self) -> str:
        """Short name: "eps", "v", "x0", with "-ztsnr" appended for a zero-terminal-SNR schedule."""
        short = {value: key for key, value in _PREDICTION_NAMES.items()}[self.prediction]
        return short + ("-ztsnr" if self.zero_terminal_snr else "")

    @classmethod
    def parse(cls, text: str) -> Parameterization:
        """The inverse of `label`: "eps", "v", "x0", "eps-ztsnr", "v-ztsnr" or "x0-ztsnr" (case-insensitive)."""
        name = text.strip().lower() if isinstance(text, str) else ""
        base, _, suffix = name.partition("-")
        if base not in _PREDICTION_NAMES or suffix not in ("", "ztsnr"):
            choices = ", ".join(f"{p}{s}" for p in _PREDICTION_NAMES for s in ("", "-ztsnr"))
            raise ValueError(f"unknown parameterisation {text!r}; choose from {choices}")
        return cls(_PREDICTION_NAMES[base], suffix == "ztsnr")

    def schedule(self, alphas_cumprod: Tensor) -> Tensor:
        """The ᾱ_t this model was trained with: `alphas_cumprod` itself or its zero-terminal-SNR rescale."""
        return rescale_zero_terminal_snr(alphas_cumprod) if self.zero_terminal_snr else alphas_cumprod


EPS = Parameterization()
V_PREDICTION = Parameterization(Prediction.V)


def rescale_zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """ᾱ rescaled so that √ᾱ keeps its first value and reaches 0 at the last step (then `ZTSNR_LAST_ALPHA_CUMPROD`).

    √ᾱ'_t = (√ᾱ_t − √ᾱ_T) · √ᾱ_0 / (√ᾱ_0 − √ᾱ_T). Computed in the input's dtype with the WebUI's order of
    operations, so that a float32 schedule gives the WebUI's float32 values.
    """
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    rescaled = root**2
    rescaled[-1] = ZTSNR_LAST_ALPHA_CUMPROD
    return rescaled


def _column(sigma: Tensor, like: Tensor) -> Tensor:
    return sigma.to(like.dtype).reshape((-1,) + (1,) * (like.dim() - 1))


def denoised_from_output(prediction: Prediction, output: Tensor, x: Tensor, sigma: Tensor,
                         model_sigma: Tensor | None = None) -> Tensor:
    """x₀ from a model output at the k-diffusion point (x, σ); the model saw x_t = x/√(σ²+1).

    `model_sigma` is the noise level the model's own schedule assigns to the point, when it differs from σ: a
    model asked beyond its schedule's range (an ε model at a zero-terminal-SNR σ of 4500, say) sees the timestep
    of its own end of range, so its output is read with that end's ᾱ, ``x₀ = (x_t − √(1−ᾱ_m)·ε)/√ᾱ_m``, which
    stays bounded where ``x − σ·ε`` would multiply the ε error by σ. Rows where it equals σ (to 1e-5) take the
    plain formulas.
    """
    sigma = _column(sigma, x)
    if prediction is Prediction.X0:
        return output
    c_in = (sigma**2 + 1) ** -0.5
    exact = x - sigma * output if prediction is Prediction.EPS else x * c_in**2 - output * sigma * c_in
    if model_sigma is None:
        return exact
    model_sigma = _column(model_sigma, x)
    # A sampler's first σ can exceed the schedule's own σ_max by a rounding error; that is no change of level.
    changed = (model_sigma - sigma).abs() > _SAME_SIGMA_RTOL * sigma
    root_alpha = (model_sigma**2 + 1) ** -0.5  # √ᾱ_m
    root_one_minus = model_sigma * root_alpha  # √(1−ᾱ_m)
    x_t = x * c_in
    if prediction is Prediction.EPS:
        clamped = (x_t - root_one_minus * output) / root_alpha
    else:
        clamped = root_alpha * x_t - root_one_minus * output
    return torch.where(changed, clamped, exact)


def output_from_denoised(prediction: Prediction, denoised: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
    """The model output that `denoised_from_output` maps to `denoised` (σ > 0 for ε)."""
    sigma = _column(sigma, x)
    if prediction is Prediction.EPS:
        return (x - denoised) / sigma
    if prediction is Prediction.V:
        c_in = (sigma**2 + 1) ** -0.5
        return (x * c_in**2 - denoised) / (sigma * c_in)
    return denoised


def convert_prediction(output: Tensor, x_t: Tensor, alpha_cumprod: Tensor | float, source: Prediction,
                       target: Prediction) -> Tensor:
    """A model output in DDPM terms (x_t, ᾱ) re-expressed as another prediction type (ε, v or x₀) at the same point.

    For samplers that combine model outputs rather than x₀ (the WebUI's DDIM/PLMS/UniPC combine ε, or v for a
    v-prediction model): a term from a model of another type is converted with this before the combination.
    """
    alpha = torch.as_tensor(alpha_cumprod, dtype=torch.float64, device=x_t.device)
    if alpha.dim() == 1:
        alpha = alpha.reshape((-1,) + (1,) * (x_t.dim() - 1))
    a, s = alpha.sqrt().to(x_t.dtype), (1 - alpha).sqrt().to(x_t.dtype)
    source, target = Prediction(source), Prediction(target)
    if source is target:
        return output
    if source is Prediction.EPS:
        eps, x0 = output, (x_t - s * output) / a
    elif source is Prediction.V:
        eps, x0 = a * output + s * x_t, a * x_t - s * output
    else:
        eps, x0 = (x_t - a * output) / s, output
    if target is Prediction.EPS:
        return eps
    if target is Prediction.V:
        return a * eps - s * x0
    return x0
