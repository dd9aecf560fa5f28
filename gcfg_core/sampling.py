"""k-diffusion samplers under the WebUI's display names, their noise schedules, and seeded sampling.

Names, schedules and options follow the WebUI 1.10 sampler table (`modules/sd_samplers_kdiffusion.py`):
"Automatic" picks each sampler's preferred schedule; DPM2/DPM2 a/DPM++ 3M SDE drop the next-to-last sigma.
The pre-1.9 names with a schedule suffix ("DPM++ 2M Karras") are accepted as aliases.
"""

from __future__ import annotations

import enum
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gcfg_core.kdiff import k_diffusion_modules

logger = logging.getLogger("gcfg.sampling")


class Scheduler(str, enum.Enum):
    """Noise schedules by the WebUI's "Schedule type" labels."""

    AUTOMATIC = "Automatic"
    UNIFORM = "Uniform"
    KARRAS = "Karras"
    EXPONENTIAL = "Exponential"


@dataclass(frozen=True)
class SamplerSpec:
    """One k-diffusion sampler as the WebUI offers it."""

    name: str
    function: str
    scheduler: Scheduler = Scheduler.UNIFORM  # what "Automatic" means for this sampler
    second_order: bool = False
    discard_next_to_last_sigma: bool = False
    brownian_noise: bool = False  # SDE samplers: noise from a seeded Brownian tree
    ancestral: bool = False  # draws fresh noise each step through `noise_sampler`
    options: tuple[tuple[str, object], ...] = field(default=())


SAMPLERS: tuple[SamplerSpec, ...] = (
    SamplerSpec("DPM++ 2M", "sample_dpmpp_2m", Scheduler.KARRAS),
    SamplerSpec("DPM++ SDE", "sample_dpmpp_sde", Scheduler.KARRAS, second_order=True, brownian_noise=True),
    SamplerSpec("DPM++ 2M SDE", "sample_dpmpp_2m_sde", Scheduler.EXPONENTIAL, brownian_noise=True),
    SamplerSpec("DPM++ 2M SDE Heun", "sample_dpmpp_2m_sde", Scheduler.EXPONENTIAL, brownian_noise=True,
                options=(("solver_type", "heun"),)),
    SamplerSpec("DPM++ 2S a", "sample_dpmpp_2s_ancestral", Scheduler.KARRAS, second_order=True, ancestral=True),
    SamplerSpec("DPM++ 3M SDE", "sample_dpmpp_3m_sde", Scheduler.EXPONENTIAL, discard_next_to_last_sigma=True,
                brownian_noise=True),
    SamplerSpec("Euler a", "sample_euler_ancestral", ancestral=True),
    SamplerSpec("Euler", "sample_euler"),
    SamplerSpec("LMS", "sample_lms"),
    SamplerSpec("Heun", "sample_heun", second_order=True),
    SamplerSpec("DPM2", "sample_dpm_2", Scheduler.KARRAS, second_order=True, discard_next_to_last_sigma=True),
    SamplerSpec("DPM2 a", "sample_dpm_2_ancestral", Scheduler.KARRAS, second_order=True,
                discard_next_to_last_sigma=True, ancestral=True),
)
SAMPLER_NAMES: tuple[str, ...] = tuple(spec.name for spec in SAMPLERS)


def _aliases() -> dict[str, tuple[str, Scheduler]]:
    aliases = {}
    for spec in SAMPLERS:
        for scheduler in (Scheduler.KARRAS, Scheduler.EXPONENTIAL):
            aliases[f"{spec.name} {scheduler.value}"] = (spec.name, scheduler)
    return aliases


SAMPLER_ALIASES: dict[str, tuple[str, Scheduler]] = _aliases()


def resolve_sampler(name: str, scheduler: Scheduler | str = Scheduler.AUTOMATIC) -> tuple[SamplerSpec, Scheduler]:
    """The sampler and concrete schedule for a display name (or old-style alias such as "DPM++ 2M Karras")."""
    try:
        scheduler = Scheduler(scheduler)
    except ValueError:
        valid = ", ".join(s.value for s in Scheduler)
        raise ValueError(f"unknown schedule type {scheduler!r}; valid: {valid}") from None
    if name in SAMPLER_ALIASES:
        name, alias_scheduler = SAMPLER_ALIASES[name]
        scheduler = alias_scheduler if scheduler is Scheduler.AUTOMATIC else scheduler
    specs = {spec.name: spec for spec in SAMPLERS}
    if name not in specs:
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLER_NAMES + tuple(SAMPLER_ALIASES))}")
    spec = specs[name]
    return spec, spec.scheduler if scheduler is Scheduler.AUTOMATIC else scheduler


def schedule_sigmas(spec: SamplerSpec, scheduler: Scheduler, steps: int, denoiser) -> Tensor:
    """The `steps` + 1 sigmas (last 0) the WebUI would use; `denoiser` provides the model's discrete schedule."""
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    sampling, _ = k_diffusion_modules()
    n = steps + 1 if spec.discard_next_to_last_sigma else steps
    sigma_min, sigma_max = float(denoiser.sigma_min), float(denoiser.sigma_max)
    if scheduler is Scheduler.KARRAS:
        sigmas = sampling.get_sigmas_karras(n, sigma_min, sigma_max)
    elif scheduler is Scheduler.EXPONENTIAL:
        sigmas = sampling.get_sigmas_exponential(n, sigma_min, sigma_max)
    elif scheduler is Scheduler.UNIFORM:
        sigmas = denoiser.get_sigmas(n)
    else:
        raise ValueError(f"schedule {scheduler.value!r} must be resolved first (resolve_sampler)")
    if spec.discard_next_to_last_sigma:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas.float()


class ImageNoise:
    """Per-image seeded noise: image b's noise depends only on `seeds[b]` (one CPU `torch.Generator` each)."""

    def __init__(self, seeds: Sequence[int], shape: Sequence[int], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
        self.shape = tuple(shape)
        self.device = device
        self.dtype = dtype

    def next(self) -> Tensor:
        """The next noise tensor ``[B, *shape]``, drawn on the CPU so results do not depend on the device."""
        noise = torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])
        return noise.to(device=self.device, dtype=self.dtype)

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:  # k-diffusion noise_sampler signature
        return self.next()


def sample(
    denoiser: Callable[..., Tensor],
    noise: ImageNoise,
    sigmas: Tensor,
    sampler_name: str,
    *,
    seeds: Sequence[int],
    progress: bool = False,
    callback: Callable[[dict], None] | None = None,
) -> Tensor:
    """Run sampler `sampler_name` from ``noise.next()·sigmas[0]`` with k-diffusion; deterministic for the seeds.

    Ancestral samplers draw their step noise from `noise` (the per-image generators, after the initial
    noise), SDE samplers from a `BrownianTreeNoiseSampler` with one tree per image seeded by `seeds`. The
    progress bar (tqdm, stderr) is shown when `progress` is true.
    """
    spec, _ = resolve_sampler(sampler_name)
    sampling, _ = k_diffusion_modules()
    sigmas = sigmas.to(noise.device)
    x = noise.next() * sigmas[0]
    kwargs: dict = dict(spec.options)
    if spec.ancestral:
        kwargs["noise_sampler"] = noise
    if spec.brownian_noise:
        sigma_min, sigma_max = sigmas[sigmas > 0].min(), sigmas.max()
        kwargs["noise_sampler"] = sampling.BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=list(seeds))
    function = getattr(sampling, spec.function)
    logger.debug("sampling with %s (%s), %d sigmas", spec.name, spec.function, len(sigmas))
    with warnings.catch_warnings():
        # torchsde complains when a float32 sigma lies a rounding error outside the tree's float64 interval.
        warnings.filterwarnings("ignore", message="Should have t[ab]", category=UserWarning)
        return function(denoiser, x, sigmas, extra_args={}, callback=callback, disable=not progress, **kwargs)
