"""Forge generations and passes: model checks and side models (`load`), then one controller per sampler run.

`load` runs in `process()` (errors are kept in the generation); `begin_pass` in `process_before_every_sampling`,
once for the first pass and again for the hires pass (Forge calls that hook twice for the hires pass: the first
call's clone is discarded by Forge, and so is its controller).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from modules import prompt_parser, shared

from gcfg_core.coefficients import GuidanceWeights
from gcfg_core.terms import ModelSlot
from gcfg_webui import schedule_capture
from gcfg_webui.errors import GCFGRequestError
from gcfg_webui.forge import install, side_models
from gcfg_webui.forge.batching import common_length, repeat_to
from gcfg_webui.forge.passes import PassController, PassPlan, Source
from gcfg_webui.generation import GENERATION_ATTRIBUTE, Generation
from gcfg_webui.pass_prompts import main_conds, pass_negative_prompts, pass_prompts
from gcfg_webui.sampling_pass import unique_keys

logger = logging.getLogger("gcfg.forge.session")

ROUTING_OPTION = "gcfg_routing"
_PASS_ATTRIBUTE = "_gcfg_forge_pass"


def _model_kind(model) -> str:
    for flag, name in (("is_sdxl", "SDXL"), ("is_sd2", "SD 2.x"), ("is_sd1", "SD 1.x"), ("is_sd3", "SD 3")):
        if getattr(model, flag, False):
            return name
    return type(model).__name__


def check_main_model(generation: Generation) -> None:
    """Refuse what cannot give a correct image: models without Forge's patcher, families GCFG was not made for,
    non-SD1 main models with SD1 side models."""
    model = shared.sd_model
    if getattr(getattr(model, "forge_objects", None), "unet", None) is None:
        raise GCFGRequestError("enabled", "the main model has no Forge UNet patcher; GCFG cannot guide it")
    if not any(getattr(model, flag, False) for flag in ("is_sd1", "is_sd2", "is_sdxl")):
        raise GCFGRequestError("enabled", f"GCFG guides SD 1.x, SD 2.x and SDXL main models; this one is "
                                          f"{_model_kind(model)}")
    if generation.uses_side_models and not getattr(model, "is_sd1", False):
        raise GCFGRequestError("prior" if generation.settings.prior else "terms",
                               f"a {_model_kind(model)} main model cannot be combined with SD 1.x prior/concept/"
                               "checkpoint models (different latent space); choose an SD 1.x checkpoint")


def check_refiner(p, generation: Generation) -> None:
    """Forge's refiner switch loads another model whose UNet patcher GCFG's hooks are not on: refused."""
    info = getattr(p, "refiner_checkpoint_info", None)
    switch_at = getattr(p, "refiner_switch_at", None)
    if info is None or (switch_at is not None and switch_at >= 1):
        return
    if info == getattr(shared.sd_model, "sd_checkpoint_info", None):
        return
    raise GCFGRequestError("refiner", f"GCFG does not follow Forge's switch to the refiner "
                                      f"{getattr(info, 'title', info)!r} (the refiner's UNet would run without "
                                      "GCFG); choose no refiner, or disable GCFG")


def load(generation: Generation, p) -> None:
    """`process()` work for a generation that changes something: model checks, then the side models."""
    check_main_model(generation)
    check_refiner(p, generation)
    settings = generation.settings
    if settings.prior:
        generation.prior = side_models.load_checkpoint_model(settings.prior, "prior")
    if any(term.model == ModelSlot.CONCEPT.value for term in generation.terms):
        if not settings.concept:
            raise GCFGRequestError("terms", "an @concept term needs a concept model")
        generation.concept = side_models.load_concept(settings.concept)
    for term in generation.terms:
        if term.model not in (ModelSlot.MAIN.value, ModelSlot.PRIOR.value, ModelSlot.CONCEPT.value):
            generation.checkpoints[term.model] = side_models.load_checkpoint_model(term.model, "terms")
        if term.model == ModelSlot.CONCEPT.value and term.cond:
            raise GCFGRequestError("terms", f"the concept model is text-free; remove the prompt {term.cond!r}")


def _rows(conditioning, images: Sequence[int]):
    if isinstance(conditioning, dict):
        return {key: value[list(images)] for key, value in conditioning.items()}
    return conditioning[list(images)]


def _main_source(name: str, conds) -> Source:
    """A prompt of the main model: its schedules at the denoiser's prompt step, for the given images."""

    def condition(step: int, images: Sequence[int]):
        return _rows(prompt_parser.reconstruct_cond_batch(conds, step), images)

    return Source(name, None, condition)


def _side_source(name: str, side, context: torch.Tensor) -> Source:
    return Source(name, side, lambda step, images: context)


def _per_image_source(name: str, side, contexts: Sequence[torch.Tensor]) -> Source:
    """A side model's source with one context per image (autoguidance: each image's prompt), repeated to a common
    token length like Forge's own batching of prompts of different lengths."""
    length = common_length([context.shape[1] for context in contexts])
    if length is None:
        raise GCFGRequestError("uncond_prompt", "the images' prompts differ too much in length to batch their "
                                                "prior rows; use shorter prompts or the empty uncond prompt")
    stacked = torch.cat([repeat_to(context, length) for context in contexts])
    return Source(name, side, lambda step, images: stacked[list(images)])


def configured_scale(p) -> float:
    """The CFG scale the pass asks for (Forge's hires pass has its own, `hr_cfg`)."""
    if getattr(p, "is_hr_pass", False) and getattr(p, "hr_cfg", None) is not None:
        return float(p.hr_cfg)
    return float(p.cfg_scale)


def build_plan(p, generation: Generation, has_negative: tuple[bool, ...]) -> PassPlan:
    settings = generation.settings
    sources: dict = {}
    for key in unique_keys(generation.terms):
        model_name, prompt = key
        if model_name == ModelSlot.CONCEPT.value:
            concept = generation.concept
            sources[key] = _side_source(model_name, concept, side_models.concept_context(concept))
        elif model_name == ModelSlot.PRIOR.value and generation.prior is not None:
            sources[key] = _side_source(model_name, generation.prior, generation.prior.context(prompt or ""))
        elif model_name in generation.checkpoints:
            model = generation.checkpoints[model_name]
            sources[key] = _side_source(model_name, model, model.context(prompt or ""))
        else:  # main, and @prior without a prior checkpoint (the main model is the prior then)
            sources[key] = _main_source(model_name, main_conds(p, generation, [prompt or ""] * p.batch_size))
    autoguidance = settings.uncond_prompt == "prompt"
    prior = None
    main_empty = None
    if generation.prior is not None:
        if autoguidance:
            prior = _per_image_source(ModelSlot.PRIOR.value, generation.prior,
                                      [generation.prior.context(prompt) for prompt in pass_prompts(p)])
        else:
            prior = _side_source(ModelSlot.PRIOR.value, generation.prior, side_models.empty_context(generation.prior))
    else:
        prompts = pass_prompts(p) if autoguidance else [""] * p.batch_size
        main_empty = _main_source("main", main_conds(p, generation, prompts))
    weights = GuidanceWeights(float(p.cfg_scale), settings.negative_scale, generation.terms)
    return PassPlan(weights, has_negative, sources, prior, main_empty, configured_scale(p),
                    host_row_is_uncond=not autoguidance)


def routing_allowed(unet) -> tuple[bool, str]:
    if not shared.opts.data.get(ROUTING_OPTION, True):
        return False, "off in Settings > GCFG"
    if install.foreign_wrapper(unet) is not None:
        return False, "another extension wraps Forge's UNet call"
    return True, ""


def _side_patchers(generation: Generation) -> list:
    models = [generation.prior, generation.concept, *generation.checkpoints.values()]
    return [model.patcher for model in models if model is not None]


def _timestep_sigmas(sampler):
    """Forge's DDIM/PLMS/UniPC denoiser turns a timestep t into σ = √((1 − ᾱ)/ᾱ)[t] with ᾱ its model's
    alphas_cumprod; the schedule's timesteps map the same way. None for k-diffusion samplers."""
    denoiser = sampler.model_wrap_cfg
    if not getattr(denoiser, "classic_ddim_eps_estimation", False):
        return None
    alphas = sampler.model_wrap.inner_model.alphas_cumprod

    def convert(timesteps):
        fake_sigmas = ((1 - alphas) / alphas) ** 0.5
        index = torch.as_tensor(timesteps).round().long().clip(0, int(fake_sigmas.shape[0]) - 1)
        return fake_sigmas[index.to(fake_sigmas.device)]

    return convert


def begin_pass(p, generation: Generation) -> None:
    """`process_before_every_sampling` work: build this sampler run's plan and put GCFG on a UNet patcher clone."""
    sampler = p.sampler
    denoiser = sampler.model_wrap_cfg
    install.remove_failure(denoiser)
    _drop_unused_pass(p, generation)
    try:
        if generation.error is not None:
            raise generation.error
        has_negative = tuple(bool(text.strip()) for text in pass_negative_prompts(p))
        settings = generation.settings
        if not generation.terms and settings.negative_scale is None and (all(has_negative) or (
                generation.prior is None and settings.uncond_prompt == "empty")):
            return  # nothing to change on this pass: no hooks at all
        model = shared.sd_model
        unet = model.forge_objects.unet.clone()
        routing, reason = routing_allowed(unet)
        controller = PassController(p, build_plan(p, generation, has_negative), routing)
        controller.sigma_of_timestep = _timestep_sigmas(sampler)
        if not routing:
            logger.info("GCFG: routing the uncond rows is off (%s); using the overwrite path", reason)
    except GCFGRequestError as error:
        generation.error = error
        install.install_failure(denoiser, error)
        return
    holder = install.install(unet, controller, _side_patchers(generation))
    install.install_call_check(denoiser, holder)
    original = model.forge_objects.unet
    model.forge_objects.unet = unet
    schedule_capture.wrap_schedule(sampler, controller)
    generation.stats.append(controller.stats)
    setattr(p, _PASS_ATTRIBUTE, (holder, unet, original, sampler))


def _drop_unused_pass(p, generation: Generation) -> None:
    """Detach the previous pass's hooks; a pass Forge set up but never sampled leaves no statistics."""
    previous = getattr(p, _PASS_ATTRIBUTE, None)
    if previous is None:
        return
    holder, unet, original, sampler = previous
    controller = holder.controller
    if controller is not None and controller.stats.calls == 0 and controller.stats in generation.stats:
        generation.stats.remove(controller.stats)
    holder.controller = None
    schedule_capture.unwrap_schedule(sampler)
    model = shared.sd_model
    if getattr(getattr(model, "forge_objects", None), "unet", None) is unet:
        model.forge_objects.unet = original
    setattr(p, _PASS_ATTRIBUTE, None)


def end_generation(p) -> Generation | None:
    """Detach every hook of the generation and the generation itself."""
    generation = getattr(p, GENERATION_ATTRIBUTE, None)
    previous = getattr(p, _PASS_ATTRIBUTE, None)
    if previous is not None:
        holder, unet, original, sampler = previous
        holder.controller = None
        schedule_capture.unwrap_schedule(sampler)
        model = shared.sd_model
        if getattr(getattr(model, "forge_objects", None), "unet", None) is unet:
            model.forge_objects.unet = original
        setattr(p, _PASS_ATTRIBUTE, None)
    sampler = getattr(p, "sampler", None)
    if sampler is not None and getattr(sampler, "model_wrap_cfg", None) is not None:
        install.remove_failure(sampler.model_wrap_cfg)
    setattr(p, GENERATION_ATTRIBUTE, None)
    return generation
