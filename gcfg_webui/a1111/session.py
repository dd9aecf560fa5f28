"""A1111 generations and passes: model checks and side models (`load`), then one controller per sampler run.

`load` runs in `process()` (errors are kept in the generation); `begin_pass` in `process_before_every_sampling`,
once for the first pass and again for the hires pass, each with its own sampler object.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from modules import (
    prompt_parser,
    sd_samplers_kdiffusion,
    sd_samplers_lcm,
    sd_samplers_timesteps,
    sd_unet,
    shared,
)

from gcfg_core.checkpoint import CheckpointError, ModelFamily, detect_family, read_state_dict_shapes
from gcfg_core.coefficients import GuidanceWeights
from gcfg_core.terms import ModelSlot
from gcfg_webui.a1111 import install, side_models
from gcfg_webui.a1111.passes import CurrentModel, PassController, PassPlan
from gcfg_webui.a1111.rows import ModelRunner, RowSource, SamplerSpace, condition_dict, unique_keys
from gcfg_webui.errors import GCFGRequestError
from gcfg_webui.generation import Generation
from gcfg_webui.pass_prompts import main_conds as _main_conds
from gcfg_webui.pass_prompts import pass_negative_prompts as _pass_negative_prompts

logger = logging.getLogger("gcfg.a1111.session")

ROUTING_OPTION = "gcfg_routing"

# UNet-forward patches known to read rows by their ControlNet marks rather than by their position, so that
# routing the uncond rows (which changes the batch layout) is safe for them.
_LAYOUT_FREE_UNET_PATCHES = ("scripts.hook",)  # sd-webui-controlnet's UnetHook.hook (forward_webui)


def _model_kind(model) -> str:
    if getattr(model, "is_sdxl", False):
        return "SDXL"
    if getattr(model, "is_sd2", False):
        return "SD 2.x"
    if getattr(model, "is_sd1", False):
        return "SD 1.x"
    return "this"


def check_main_model(generation: Generation) -> None:
    """Refuse what cannot give a correct image: edit models, unCLIP, non-SD1 models with SD1 side models."""
    model = shared.sd_model
    if getattr(model, "cond_stage_key", None) == "edit":
        raise GCFGRequestError("enabled", "InstructPix2Pix/edit checkpoints are not supported (their CFG uses an "
                                          "image term the WebUI combines separately); disable GCFG for this model")
    if getattr(model.model, "conditioning_key", "crossattn") == "crossattn-adm":
        raise GCFGRequestError("enabled", "unCLIP checkpoints are not supported")
    if generation.uses_side_models:
        if not getattr(model, "is_sd1", False):
            raise GCFGRequestError("prior" if generation.settings.prior else "terms",
                                   f"a {_model_kind(model)} main model cannot be combined with SD 1.x prior/concept/"
                                   "checkpoint models (different latent space); choose an SD 1.x checkpoint")
        if getattr(sd_unet, "current_unet", None) is not None:
            raise GCFGRequestError("enabled", "an alternative 'SD Unet' (e.g. TensorRT) is active; set Settings > "
                                              "SD Unet to Automatic/None to use GCFG side models")


def check_refiner(p, generation: Generation) -> None:
    """A refiner GCFG's side models cannot follow is refused before sampling (its family read from the file)."""
    info = getattr(p, "refiner_checkpoint_info", None)
    if info is None or not generation.uses_side_models:
        return
    filename = getattr(info, "filename", "")
    try:
        family = detect_family(read_state_dict_shapes(filename)) if filename and os.path.isfile(filename) else None
    except CheckpointError as error:
        raise GCFGRequestError("refiner", str(error)) from error
    if family is not None and family not in (ModelFamily.SD1, ModelFamily.SD1_INPAINT):
        raise GCFGRequestError("refiner", f"the refiner {getattr(info, 'title', filename)!r} is {family.label}; "
                                          "GCFG's SD 1.x prior/concept/checkpoint models cannot be combined with it "
                                          "— choose an SD 1.x refiner, no refiner, or no GCFG side models")


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


def sampler_space(sampler) -> SamplerSpace:
    """x₀ for k-diffusion samplers, ε for DDIM/PLMS/UniPC; LCM and unknown samplers are refused."""
    name = getattr(getattr(sampler, "config", None), "name", type(sampler).__name__)
    if isinstance(sampler, sd_samplers_lcm.LCMSampler):  # a KDiffusionSampler subclass with its own scaling
        raise GCFGRequestError("enabled", f"sampler {name!r} (LCM) is not supported; choose another sampler")
    if isinstance(sampler, sd_samplers_kdiffusion.KDiffusionSampler):
        return SamplerSpace.DENOISED
    if isinstance(sampler, sd_samplers_timesteps.CompVisSampler):
        return SamplerSpace.NOISE
    raise GCFGRequestError("enabled", f"sampler {name!r} is not supported")


def _main_source(model_name: str, runner: ModelRunner, conds) -> RowSource:
    """A prompt of the current model: its schedules at the WebUI's prompt step, for the given images."""

    def condition(step: int, images: Sequence[int], image_cond):
        cond = prompt_parser.reconstruct_cond_batch(conds, step)
        cond = {key: value[images] for key, value in cond.items()} if isinstance(cond, dict) else cond[images]
        return condition_dict(cond, image_cond)

    return RowSource(model_name, runner, condition)


def unet_forward_patched() -> bool:
    """Whether another extension replaced the current UNet's forward with one that may assume the WebUI's
    ``[cond…, uncond…]`` batch layout (ControlNet's hook reads its row marks instead and is safe)."""
    unet = getattr(getattr(shared.sd_model, "model", None), "diffusion_model", None)
    patched = None if unet is None else unet.__dict__.get("forward")
    if patched is None:
        return False
    module = getattr(getattr(patched, "__func__", patched), "__module__", "") or ""
    return not module.endswith(_LAYOUT_FREE_UNET_PATCHES)


def routing_allowed() -> tuple[bool, str]:
    if not shared.opts.data.get(ROUTING_OPTION, True):
        return False, "off in Settings > GCFG"
    if unet_forward_patched():
        return False, "another extension patched the UNet's forward"
    return True, ""


class _PassBuilder:
    """Builds a pass's plan; kept so that a refiner switch can build it again for the new model."""

    def __init__(self, p, generation: Generation, denoiser, current: CurrentModel) -> None:
        self.p, self.generation, self.denoiser = p, generation, denoiser
        self.space = sampler_space(p.sampler)
        self.current = current
        self._side_runners: dict[str, ModelRunner] = {}
        self.has_negative: tuple[bool, ...] = ()

    def _side_runner(self, name: str, model) -> ModelRunner:
        if name not in self._side_runners:
            self._side_runners[name] = side_models.side_runner(self.space, self.denoiser.inner_model, model, name)
        return self._side_runners[name]

    def _source(self, key) -> RowSource:
        generation = self.generation
        model_name, prompt = key
        if model_name == ModelSlot.CONCEPT.value:
            return side_models.context_source(model_name, self._side_runner(model_name, generation.concept), None)
        if model_name == ModelSlot.PRIOR.value and generation.prior is not None:
            return side_models.context_source(model_name, self._side_runner(model_name, generation.prior),
                                              generation.prior.context(prompt or ""))
        if model_name in generation.checkpoints:
            model = generation.checkpoints[model_name]
            return side_models.context_source(model_name, self._side_runner(model_name, model),
                                              model.context(prompt or ""))
        # main, and @prior without a prior checkpoint (the current model is the prior then)
        return _main_source(model_name, self.current.runner, _main_conds(self.p, self.generation, prompt or ""))

    def build(self, has_negative: tuple[bool, ...]) -> PassPlan:
        self.has_negative = has_negative
        generation = self.generation
        settings = generation.settings
        prior = None
        if generation.prior is not None:
            prior = side_models.context_source(ModelSlot.PRIOR.value,
                                               self._side_runner(ModelSlot.PRIOR.value, generation.prior),
                                               side_models.empty_context(generation.prior))
        sources = {key: self._source(key) for key in unique_keys(generation.terms)}
        main_empty = None
        if prior is None and settings.negative_scale is not None and any(has_negative):
            main_empty = _main_source("main", self.current.runner, _main_conds(self.p, generation, ""))
        weights = GuidanceWeights(float(self.p.cfg_scale), settings.negative_scale, generation.terms)
        return PassPlan(weights, has_negative, sources, prior, main_empty, generation.uses_side_models)

    def rebuild(self) -> PassPlan:
        """The plan again for the model the WebUI switched to (its refiner), or a 422 naming it."""
        model = shared.sd_model
        info = getattr(model, "sd_checkpoint_info", None)
        if self.generation.uses_side_models and not getattr(model, "is_sd1", False):
            raise GCFGRequestError("refiner", f"the WebUI switched to the refiner "
                                              f"{getattr(info, 'title', 'model')!r} ({_model_kind(model)}), which "
                                              "GCFG's SD 1.x side models cannot be combined with")
        self._side_runners.clear()
        return self.build(self.has_negative)


def begin_pass(p, generation: Generation) -> None:
    """`process_before_every_sampling` work: build this sampler run's plan and install its controller."""
    sampler = p.sampler
    denoiser = sampler.model_wrap_cfg
    install.remove_failure(denoiser)
    try:
        if generation.error is not None:
            raise generation.error
        has_negative = tuple(bool(text.strip()) for text in _pass_negative_prompts(p))
        if not generation.terms and generation.settings.negative_scale is None and (
                generation.prior is None or all(has_negative)):
            install.remove(denoiser, sampler)  # nothing to change on this pass: no sampler checks either
            return
        current = CurrentModel(denoiser.inner_model.forward)
        builder = _PassBuilder(p, generation, denoiser, current)
        routing, reason = routing_allowed()
        controller = PassController(denoiser, builder.build(has_negative), current, routing, rebuild=builder.rebuild)
        if not routing:
            logger.info("GCFG: routing the uncond rows is off (%s); using the overwrite path", reason)
    except GCFGRequestError as error:
        generation.error = error
        install.install_failure(denoiser, error)
        return
    generation.stats.append(controller.stats)
    install.install(denoiser, sampler, controller)


def end_generation(p) -> Generation | None:
    """Undo every wrapper on a sampler still held by `p` and detach the generation."""
    from gcfg_webui.generation import GENERATION_ATTRIBUTE

    generation = getattr(p, GENERATION_ATTRIBUTE, None)
    sampler = getattr(p, "sampler", None)
    if sampler is not None and getattr(sampler, "model_wrap_cfg", None) is not None:
        install.remove(sampler.model_wrap_cfg, sampler)
        install.remove_failure(sampler.model_wrap_cfg)
    setattr(p, GENERATION_ATTRIBUTE, None)
    return generation
