"""Standalone GCFG text-to-image generation: request → validated plan → k-diffusion sampling → PIL images + infotext.

Used by the CLI (`python -m gcfg_core sample`), by the trainer's preview grids and by tests. Every check runs
before the first UNet call, and each error names the bad value.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from gcfg_core.checkpoint import ModelFamily, base_family, short_hash
from gcfg_core.conditioning import SizeConditioning
from gcfg_core.configs import sd1_alphas_cumprod
from gcfg_core.denoiser import GCFGDenoiser, UNetDenoiser
from gcfg_core.models import SDModel
from gcfg_core.nulltext import is_sdxl_unet, nulltext_vector
from gcfg_core.params import GCFGSettings
from gcfg_core.plan import GuidancePlan, classic_plan, standard_plan
from gcfg_core.pngmeta import format_parameters
from gcfg_core.sampling import ImageNoise, resolve_sampler, sample, schedule_sigmas
from gcfg_core.syntax import format_number
from gcfg_core.terms import ModelSlot

logger = logging.getLogger("gcfg.pipeline")

MAX_SEED = 2**32 - 1
SIZE_MULTIPLE = 8  # the WebUI's width/height step: one latent pixel per 8×8 image pixels (every SD VAE)


@dataclass(frozen=True)
class GenerationRequest:
    """One txt2img request; `seed` −1 = random (the resolved seed is reported); image i uses seed + i."""

    prompt: str
    negative_prompt: str = ""
    cfg_scale: float = 7.0
    steps: int = 20
    sampler: str = "Euler"
    scheduler: str = "Automatic"
    seed: int = -1
    width: int = 512
    height: int = 512
    batch_size: int = 1
    clip_skip: int = 1
    gcfg: GCFGSettings = field(default_factory=lambda: GCFGSettings(enabled=True))
    # SDXL only: original size, crop and target size of every image; None = width×height, crop (0, 0).
    sdxl_size: SizeConditioning | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not isinstance(self.negative_prompt, str):
            raise ValueError("prompt and negative_prompt must be strings")
        if isinstance(self.cfg_scale, bool) or not math.isfinite(float(self.cfg_scale)):
            raise ValueError(f"cfg_scale must be a finite number, got {self.cfg_scale!r}")
        for name, low in (("steps", 1), ("batch_size", 1), ("clip_skip", 1), ("width", 1), ("height", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer ≥ {low}, got {value!r}")
        for name in ("width", "height"):
            if getattr(self, name) % SIZE_MULTIPLE:
                value = getattr(self, name)
                raise ValueError(f"{name} {value} is not a multiple of {SIZE_MULTIPLE} (the VAE maps 8×8 pixels to "
                                 f"one latent pixel), e.g. {value - value % SIZE_MULTIPLE or SIZE_MULTIPLE}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not -1 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be -1 (random) or an integer from 0 to {MAX_SEED}, got {self.seed!r}")
        if not isinstance(self.gcfg, GCFGSettings):
            raise ValueError(f"gcfg must be GCFGSettings, got {type(self.gcfg).__name__}")
        if self.sdxl_size is not None and not isinstance(self.sdxl_size, SizeConditioning):
            raise ValueError(f"sdxl_size must be SizeConditioning, got {type(self.sdxl_size).__name__}")
        resolve_sampler(self.sampler, self.scheduler)


@dataclass(frozen=True)
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    infotexts: list[str]
    unet_rows_per_step: float  # mean UNet rows (images × evaluated terms) per denoiser call


def size_multiple(model) -> int:
    """Pixel multiple the image size must have: the VAE's downsampling for SD 1.x, whose ldm UNets run off their
    own grid too (`gcfg_core.denoiser.UNetDenoiser`), as in the WebUI; × the UNet's own downsampling for SDXL."""
    downsample = model.architecture.vae.downsample
    if isinstance(model, SDModel):
        return downsample
    return downsample * 2 ** (len(model.architecture.unet.channel_mult) - 1)


def build_plan(request: GenerationRequest, *, has_concept: bool) -> GuidancePlan:
    """The guidance plan of a request: classic CFG when GCFG is disabled, else `standard_plan`."""
    if not request.gcfg.enabled:
        return classic_plan(request.cfg_scale, request.prompt, request.negative_prompt)
    settings = request.gcfg
    return standard_plan(
        request.cfg_scale, request.prompt, request.negative_prompt, settings.negative_scale,
        settings.concept_weight if has_concept else 0.0, settings.parsed_terms(),
        uncond_prompt=request.prompt if settings.uncond_prompt == "prompt" else "",
    )


def _check_plan(plan: GuidancePlan, available: Mapping[str, object]) -> None:
    for term in plan.weights.terms:
        if term.model not in available:
            hint = " (load a concept model)" if term.model == ModelSlot.CONCEPT.value else ""
            raise ValueError(f"term {term.weight:+g} uses model {term.model!r}, which is not loaded{hint}; "
                             f"available: {', '.join(sorted(available))}")
        if term.model == ModelSlot.CONCEPT.value and term.cond is not None:
            raise ValueError(f"term {term.weight:+g} @concept has the prompt {term.cond!r}, but the concept model "
                             "is text-free: leave its prompt empty")


def _encode_conds(plan: GuidancePlan, text_models: Mapping[str, SDModel], clip_skip: int,
                  sizes: SizeConditioning) -> dict:
    """Each (model, prompt) of the plan encoded by that model's own text encoder(s).

    E₀ and the negative prompt are encoded as the host encodes a negative prompt (for SDXL an empty one is zeros);
    a term with the same (model, prompt) is the same prediction and shares that encoding.
    """
    negatives = {plan.uncond_key, plan.negative_key}
    conds: dict[tuple[str, str], object] = {}
    encoded: dict[tuple[int, str, bool], object] = {}
    for model_name, cond in plan.keys():
        if cond is None:
            continue
        model = text_models[model_name]
        negative = (model_name, cond) in negatives
        cache_key = (id(model), cond, negative)
        if cache_key not in encoded:
            encoded[cache_key] = model.encode_condition(cond, clip_skip=clip_skip, negative=negative, sizes=sizes)
        conds[(model_name, cond)] = encoded[cache_key]
    return conds


def _check_families(main: SDModel, others: Mapping[str, SDModel]) -> None:
    for role, model in others.items():
        if model is not main and base_family(model.family) is not base_family(main.family):
            raise ValueError(f"the {role} model {model.name!r} is {model.family.label} ({model.family.value}), but the "
                             f"main model {main.name!r} is {main.family.label} ({main.family.value}): every model of a "
                             "GCFG run must be of the main model's family")


def _check_concept_family(concept_unet: nn.Module, main) -> None:
    concept = ModelFamily.SDXL if is_sdxl_unet(concept_unet) else ModelFamily.SD1
    if concept is not base_family(main.family):
        raise ValueError(f"the concept model is an {concept.label} UNet ({concept.value}), but the main model "
                         f"{main.name!r} is {main.family.label} ({main.family.value}): a concept model guides main "
                         "models of its own family")


class SizeConditionedUNet(nn.Module):
    """An SDXL null-text UNet with its `vector` input fixed for one generation: the stored pooled part and the
    images' size embeddings (one `SizeConditioning` for every image). Called like a text-free UNet."""

    def __init__(self, unet: nn.Module, sizes: SizeConditioning) -> None:
        super().__init__()
        self.unet = unet
        self.register_buffer("vector", nulltext_vector(unet, sizes), persistent=False)

    def forward(self, x: Tensor, timesteps: Tensor, context=None, **kwargs) -> Tensor:
        vector = self.vector.to(x.device).expand(x.shape[0], -1)
        return self.unet(x, timesteps, context=None, y=vector)


def _to_pil(images: Tensor) -> list[Image.Image]:
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(array)) for array in pixels]


def infotext_params(request: GenerationRequest, seed: int, main: SDModel, scheduler_label: str) -> dict[str, object]:
    """The `parameters` key/values of one image, in the WebUI's order, with the GCFG keys appended."""
    spec, _ = resolve_sampler(request.sampler, request.scheduler)
    params: dict[str, object] = {
        "Steps": request.steps,
        "Sampler": spec.name,
        "Schedule type": scheduler_label,
        "CFG scale": format_number(request.cfg_scale),
        "Seed": seed,
        "Size": f"{request.width}x{request.height}",
        "Model hash": short_hash(main.sha256) if main.sha256 else None,
        "Model": main.name or None,
        "Clip skip": request.clip_skip if request.clip_skip > 1 else None,
    }
    params.update(request.gcfg.changed_infotext())
    return params


def resolve_seed(seed: int) -> int:
    return random.randrange(MAX_SEED + 1) if seed == -1 else seed


def generate(
    request: GenerationRequest,
    *,
    prior: SDModel,
    main: SDModel | None = None,
    concept_unet: nn.Module | None = None,
    extra_models: Mapping[str, SDModel] | None = None,
    progress: bool = True,
) -> GenerationResult:
    """Sample `request.batch_size` images with GCFG: uncond from `prior`, prompts on `main` (default: `prior`).

    Models are `SDModel`s (SD 1.x) or `SDXLModel`s, all of the main model's family; each is run with its own
    parameterisation and schedule, and the sampler follows the main model's schedule. `extra_models` maps the
    checkpoint names that terms use (``+2 @name prompt``) to models. `concept_unet` is a text-free (null-text)
    UNet of the main model's family (an SDXL one gets its fixed pooled input and the images' size embeddings) on
    the SD 1 schedule; its term has weight ``request.gcfg.concept_weight``. For SDXL, every image
    is conditioned on `request.sdxl_size` (default: its own width and height, crop (0, 0)). Images are decoded
    with the main model's VAE (the prior's if it has none).
    """
    main = prior if main is None else main
    extra_models = dict(extra_models or {})
    _check_families(main, {ModelSlot.PRIOR.value: prior, **extra_models})
    multiple = size_multiple(main)
    for name in ("width", "height"):
        if getattr(request, name) % multiple:
            raise ValueError(f"{name} {getattr(request, name)} is not a multiple of {multiple} ("
                             f"{'the VAE' if multiple == 8 else 'the VAE and the UNet'}'s downsampling)")
    spec, scheduler = resolve_sampler(request.sampler, request.scheduler)
    plan = build_plan(request, has_concept=concept_unet is not None)
    text_models = {**extra_models, ModelSlot.PRIOR.value: prior, ModelSlot.MAIN.value: main}
    available: dict[str, object] = dict(text_models)
    if concept_unet is not None:
        _check_concept_family(concept_unet, main)
        available[ModelSlot.CONCEPT.value] = concept_unet
    _check_plan(plan, available)
    if main.vae is None and prior.vae is None:
        raise ValueError(f"neither {main.name!r} nor {prior.name!r} has a VAE to decode the images")

    denoisers: dict[str, UNetDenoiser] = {}
    by_model: dict[int, UNetDenoiser] = {}
    for slot, slot_model in text_models.items():
        if id(slot_model) not in by_model:
            by_model[id(slot_model)] = UNetDenoiser(slot_model.unet, slot_model.alphas_cumprod, slot_model.prediction)
        denoisers[slot] = by_model[id(slot_model)]
    sizes = request.sdxl_size or SizeConditioning.for_image(request.width, request.height)
    if concept_unet is not None:
        if is_sdxl_unet(concept_unet):
            # Trained as ε on the base's scaled-linear schedule, whatever the main model's parameterisation.
            denoisers[ModelSlot.CONCEPT.value] = UNetDenoiser(SizeConditionedUNet(concept_unet, sizes),
                                                              sd1_alphas_cumprod())
        else:
            denoisers[ModelSlot.CONCEPT.value] = UNetDenoiser(concept_unet, prior.alphas_cumprod)

    conds = _encode_conds(plan, text_models, request.clip_skip, sizes)
    sigmas = schedule_sigmas(spec, scheduler, request.steps, denoisers[ModelSlot.MAIN.value])
    model = GCFGDenoiser(denoisers, plan, conds, sigmas)

    seed = resolve_seed(request.seed)
    seeds = [(seed + index) % (MAX_SEED + 1) for index in range(request.batch_size)]
    parameter = next(main.unet.parameters())
    downsample = main.architecture.vae.downsample
    shape = (main.architecture.unet.in_channels, request.height // downsample, request.width // downsample)
    noise = ImageNoise(seeds, shape, device=parameter.device)
    logger.info("sampling %d image(s) %dx%d, %s, %d steps, seed %d", request.batch_size, request.width,
                request.height, spec.name, request.steps, seed)
    latents = sample(model, noise, sigmas, spec.name, seeds=seeds, progress=progress)
    vae_model = main if main.vae is not None else prior
    images = _to_pil(vae_model.decode_latents(latents))
    infotexts = [
        format_parameters(request.prompt, request.negative_prompt,
                          infotext_params(request, image_seed, main, scheduler.value))
        for image_seed in seeds
    ]
    return GenerationResult(images, seeds, infotexts, model.rows_per_call)
