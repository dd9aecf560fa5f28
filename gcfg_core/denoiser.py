"""k-diffusion denoisers: one ldm UNet (`UNetDenoiser`) and the GCFG combination of several (`GCFGDenoiser`).

Both follow the k-diffusion model contract ``model(x, sigma, **extra) -> denoised`` (Karras et al. 2022 notation:
``x = x₀ + σ·noise``), so every k-diffusion sampler can drive them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gcfg_core.coefficients import step_coefficients
from gcfg_core.conditioning import SDXLConditioning, condition_tokens, stack_conditions
from gcfg_core.guidance import combine_sources
from gcfg_core.kdiff import k_diffusion_modules
from gcfg_core.parameterization import Prediction, denoised_from_output
from gcfg_core.plan import GuidancePlan, SourceKey

logger = logging.getLogger("gcfg.denoiser")

# Two sigmas closer than this (relatively) are the same schedule point (float32 vs float64 copies of one value).
_SIGMA_RTOL = 1e-5


class Denoiser(Protocol):
    """A k-diffusion denoiser taking its model's condition as `context`: a cross-attention context tensor (SD 1.x),
    an `SDXLConditioning` (SDXL) or None (a text-free model)."""

    def __call__(self, x: Tensor, sigma: Tensor, *, context: Tensor | SDXLConditioning | None = None) -> Tensor: ...


def unet_size_multiple(unet: nn.Module) -> int | None:
    """The side multiple an ldm `UNetModel` needs for its plain forward: 2 ** (its downsampling layers); None for
    other modules."""
    from ldm.modules.diffusionmodules.openaimodel import Downsample, UNetModel

    if not isinstance(unet, UNetModel):
        return None
    return 2 ** sum(isinstance(m, Downsample) for block in unet.input_blocks for m in block)


def _resized_to(h: Tensor, skip: Tensor) -> Tensor:
    return h if h.shape[-2:] == skip.shape[-2:] else F.interpolate(h, size=skip.shape[-2:], mode="nearest")


def unet_forward_any_size(unet: nn.Module, x: Tensor, timesteps: Tensor, context: Tensor | None = None) -> Tensor:
    """An ldm `UNetModel`'s forward for latents of any size, e.g. 9×9 for a 72-px image.

    Each downsampling rounds odd sides up, so the upsampled features can come out one larger than the skip
    connection they are joined with (9 → 5 → 3 → 2 → 4, against a skip of 3). Here they are resized to the
    skip's size (nearest) before the join, which is what the WebUI does to accept image sides in multiples of
    8 rather than 64. For sides the plain forward handles, the result equals it.
    """
    from ldm.modules.diffusionmodules.util import timestep_embedding

    if getattr(unet, "num_classes", None) is not None:
        raise ValueError("class-conditional UNets are not supported at sizes off the 64-px grid")
    emb = unet.time_embed(timestep_embedding(timesteps, unet.model_channels, repeat_only=False))
    h, skips = x.type(unet.dtype), []
    for block in unet.input_blocks:
        h = block(h, emb, context)
        skips.append(h)
    h = unet.middle_block(h, emb, context)
    for block in unet.output_blocks:
        skip = skips.pop()
        h = block(torch.cat([_resized_to(h, skip), skip], dim=1), emb, context)
    return unet.out(h.type(x.dtype))


class UNetDenoiser(nn.Module):
    """k-diffusion wrapper of a UNet ``unet(x_t, t, context=...[, y=...])`` on its own DDPM schedule ``alphas_cumprod``.

    The output is converted to x₀ with the UNet's own `prediction` (`gcfg_core.parameterization`): EPS is
    k-diffusion's `CompVisDenoiser`, V its `CompVisVDenoiser` (same scalings, no `apply_model` needed); X0 returns
    the UNet output as is. The UNet sees ``x·c_in`` (= x_t) and the fractional timestep of σ on *its* schedule, so
    models on different schedules (zero terminal SNR or not) can serve one sampler; a σ outside the schedule's range
    is read at the range's end (`gcfg_core.parameterization.denoised_from_output`). An `SDXLConditioning` context
    is passed as ``context=crossattn, y=vector``.
    """

    def __init__(self, unet: nn.Module, alphas_cumprod: Tensor, prediction: Prediction = Prediction.EPS,
                 *, quantize: bool = False) -> None:
        super().__init__()
        _, external = k_diffusion_modules()
        self.unet = unet
        self.size_multiple = unet_size_multiple(unet)
        self.prediction = Prediction(prediction)
        alphas_cumprod = alphas_cumprod.detach().float().cpu()
        self.schedule = external.DiscreteSchedule(((1 - alphas_cumprod) / alphas_cumprod) ** 0.5, quantize)

    @property
    def sigma_min(self) -> Tensor:
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> Tensor:
        return self.schedule.sigma_max

    def get_sigmas(self, steps: int) -> Tensor:
        """The schedule's own `steps` sigmas, evenly spaced in t, plus a final 0 (the WebUI's "Uniform")."""
        return self.schedule.get_sigmas(steps)

    def forward(self, x: Tensor, sigma: Tensor, *, context: Tensor | SDXLConditioning | None = None) -> Tensor:
        sigma = sigma.to(self.schedule.sigmas.device)
        view = (-1,) + (1,) * (x.dim() - 1)
        sigma_x = sigma.to(x.dtype).reshape(view)
        c_in = (sigma_x**2 + 1) ** -0.5
        t = self.schedule.sigma_to_t(sigma).to(x.device)
        if isinstance(context, SDXLConditioning):
            output = self.unet(x * c_in, t, context=context.crossattn, y=context.vector)
        elif self.size_multiple and any(side % self.size_multiple for side in x.shape[-2:]):
            output = unet_forward_any_size(self.unet, x * c_in, t, context=context)
        else:
            output = self.unet(x * c_in, t, context=context)
        # The σ this model's own schedule can represent: beyond its range it sees (and is read at) the end of it.
        model_sigma = sigma.clamp(self.schedule.sigma_min, self.schedule.sigma_max).to(x.dtype).reshape(view)
        return denoised_from_output(self.prediction, output.to(x.dtype), x, sigma_x, model_sigma)


def step_index(sigma: float, sigmas: Tensor) -> int:
    """The 0-based sampler step that evaluates at `sigma`, for the descending schedule `sigmas` (last one 0).

    Step i covers ``sigmas[i] ≥ σ > sigmas[i+1]``: the step's first evaluation is at ``sigmas[i]`` and the
    midpoint evaluations of DPM2, DPM++ 2S a and DPM++ SDE lie strictly between. Heun's corrector evaluates at
    exactly ``sigmas[i+1]`` and so belongs to step i+1; that keeps the guided denoiser a function of (x, σ), as
    ODE solvers assume. The index comes from σ's position in the schedule, never from a call counter (samplers
    call the model once per step or more). σ above ``sigmas[0]`` counts as step 0.
    """
    count = int(sigmas.shape[0]) - 1
    inner = sigmas[1:count].tolist()  # sigmas[1] .. sigmas[n-1]
    return sum(1 for s in inner if sigma <= s * (1 + _SIGMA_RTOL))


def _lookup_cond(conds: Mapping, model: str, cond: str | None) -> Tensor | None:
    if cond is None:
        return None
    for key in ((model, cond), cond):
        if key in conds:
            return conds[key]
    raise ValueError(f"no encoded condition for model {model!r} and prompt {cond!r}")


class GCFGDenoiser:
    """A k-diffusion model evaluating a `GuidancePlan` with one batched call per distinct model (GCFG, Eq. 3).

    Args:
        models: model name → `Denoiser`. Names mapping to the same object share one call.
        plan: the sources and weights; at each step `gcfg_core.coefficients.step_coefficients` decides what is
            evaluated (a source whose coefficient is 0 is not).
        conds: encoded prompts, ``[T, C]`` (every image), ``[1, T, C]`` or ``[B, T, C]`` (one per image), looked up
            by ``(model, prompt)`` first and then by ``prompt``, so that models with different text encoders can
            each have their own encoding. A None prompt is called with ``context=None`` (text-free concept UNet).
            SDXL models take `SDXLConditioning` (context and vector, each with 1 or B rows) instead of a tensor.
        sigmas: the sampler's schedule (descending, last 0); the step index of each call is read from it
            (`step_index`) and `steps` is ``len(sigmas) − 1``.

    Per call: the (model, prompt) sources with a non-zero coefficient are grouped by model; each model runs
    once on ``[sources × B]`` rows (x repeated, the contexts stacked). Contexts of different token lengths
    (75-token chunks) for the same model go into separate calls instead of being padded, which is exact and is
    what the WebUI does by default. The x₀ predictions are combined with `gcfg_core.guidance.combine_sources`.
    Rows are per image, so images of a batch never influence each other.
    """

    def __init__(self, models: Mapping[str, Callable[..., Tensor]], plan: GuidancePlan, conds: Mapping,
                 sigmas: Tensor) -> None:
        if sigmas.dim() != 1 or sigmas.shape[0] < 2:
            raise ValueError(f"sigmas must be a 1-d schedule of at least 2 values, got shape {list(sigmas.shape)}")
        missing = sorted(plan.models() - set(models))
        if missing:
            raise ValueError(f"the plan uses model(s) {missing} but only {sorted(models)} are available")
        for model, cond in plan.keys():
            _lookup_cond(conds, model, cond)
        self.models = dict(models)
        self.plan = plan
        self.conds = conds
        self.sigmas = sigmas.detach().double().cpu()
        self.steps = int(sigmas.shape[0]) - 1
        self.calls = 0
        self.unet_rows = 0
        self.last_step: int | None = None
        self._contexts: dict[tuple, Tensor | None] = {}

    def step_index(self, sigma: Tensor) -> int:
        return step_index(float(sigma.reshape(-1)[0]), self.sigmas)

    def _context(self, keys: tuple[SourceKey, ...], batch: int, like: Tensor) -> Tensor | None:
        cache_key = (keys, batch, like.device)
        if cache_key not in self._contexts:
            parts = [_lookup_cond(self.conds, model, cond) for model, cond in keys]
            self._contexts[cache_key] = stack_conditions(parts, batch, like.device)
        return self._contexts[cache_key]

    def _call_groups(self, keys: list[SourceKey]) -> list[tuple[object, tuple]]:
        """(denoiser, keys) per call: keys grouped by denoiser object, then by context length."""
        groups: dict[tuple[int, int | None], tuple[object, list]] = {}
        for model, cond in keys:
            denoiser = self.models[model]
            length = condition_tokens(_lookup_cond(self.conds, model, cond))
            groups.setdefault((id(denoiser), length), (denoiser, []))[1].append((model, cond))
        return [(denoiser, tuple(group)) for denoiser, group in groups.values()]

    def __call__(self, x: Tensor, sigma: Tensor, **extra) -> Tensor:
        if extra:
            logger.debug("ignoring extra sampler arguments %s", sorted(extra))
        step = self.step_index(sigma)
        self.last_step = step
        batch = x.shape[0]
        plan = self.plan
        coefficients = step_coefficients(plan.weights, [(1.0,)] * batch, [plan.has_negative] * batch, step,
                                         self.steps)
        per_source = plan.source_coefficients(coefficients)
        if not per_source:
            raise ValueError(f"every guidance coefficient is 0 at step {step}: nothing to evaluate")

        predictions: dict[SourceKey, Tensor] = {}
        for denoiser, group in self._call_groups(list(per_source)):
            n = len(group)
            x_in = x if n == 1 else x.repeat(n, *([1] * (x.dim() - 1)))
            sigma_in = sigma if n == 1 else sigma.repeat(n)
            output = denoiser(x_in, sigma_in, context=self._context(group, batch, x))
            predictions.update(zip(group, output.split(batch), strict=True))
            self.unet_rows += n * batch
        self.calls += 1
        return combine_sources([(predictions[key], values) for key, values in per_source.items()])

    @property
    def rows_per_call(self) -> float:
        """Mean UNet rows (images × evaluated terms) per denoiser call so far."""
        return self.unet_rows / self.calls if self.calls else 0.0
