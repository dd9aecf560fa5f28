"""A1111 generations and passes: model checks and side models (`load`), then one controller per sampler run.

`load` runs in `process()` (errors are kept in the generation); `begin_pass` in `process_before_every_sampling`,
once for the first pass and again for the hires pass, each with its own sampler object.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from modules import (
    prompt_parser,
    sd_samplers_kdiffusion,
    sd_samplers_lcm,
    sd_samplers_timesteps,
    sd_unet,
    shared,
)

from gcfg_core.checkpoint import CheckpointError, ModelFamily, base_family
from gcfg_core.coefficients import GuidanceWeights
from gcfg_core.conditioning import SDXLConditioning, SizeConditioning
from gcfg_core.model_files import file_family
from gcfg_core.terms import ModelSlot
from gcfg_webui import model_files
from gcfg_webui.a1111 import install, side_models
from gcfg_webui.a1111.passes import CurrentModel, PassController, PassPlan
from gcfg_webui.a1111.rows import ModelRunner, RowSource, SamplerSpace, condition_dict, unique_keys
from gcfg_webui.errors import GCFGRequestError
from gcfg_webui.generation import Generation
from gcfg_webui.pass_prompts import main_conds as _main_conds
from gcfg_webui.pass_prompts import pass_negative_prompts as _pass_negative_prompts
from gcfg_webui.pass_prompts import pass_prompts as _pass_prompts
from gcfg_webui.pass_prompts import pass_size as _pass_size

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


_GUIDABLE = (ModelFamily.SD1, ModelFamily.SDXL)  # main-model families GCFG's side models can guide


def _checkpoint_family(info) -> ModelFamily | None:
    filename = getattr(info, "filename", "")
    if not filename or not os.path.isfile(filename):
        return None
    return file_family(filename)


def main_family() -> ModelFamily:
    """The current model's family: from its checkpoint file when the WebUI has one, else from its flags."""
    model = shared.sd_model
    try:
        family = _checkpoint_family(getattr(model, "sd_checkpoint_info", None))
    except CheckpointError:
        family = None
    if family is not None and family is not ModelFamily.UNKNOWN:
        return family
    if getattr(model, "is_sdxl", False):
        return ModelFamily.SDXL
    return ModelFamily.SD1 if getattr(model, "is_sd1", False) else ModelFamily.UNKNOWN


def _main_title() -> str:
    info = getattr(shared.sd_model, "sd_checkpoint_info", None)
    return getattr(info, "title", None) or "the main model"


def check_main_model(generation: Generation) -> None:
    """Refuse what cannot give a correct image: edit models, unCLIP, and side models with a main model they cannot
    guide (SD 2.x, an SDXL refiner)."""
    model = shared.sd_model
    if getattr(model, "cond_stage_key", None) == "edit":
        raise GCFGRequestError("enabled", "InstructPix2Pix/edit checkpoints are not supported (their CFG uses an "
                                          "image term the WebUI combines separately); disable GCFG for this model")
    if getattr(model.model, "conditioning_key", "crossattn") == "crossattn-adm":
        raise GCFGRequestError("enabled", "unCLIP checkpoints are not supported")
    if generation.uses_side_models:
        family = main_family()
        if base_family(family) not in _GUIDABLE or family is ModelFamily.SDXL_REFINER:
            kind = family.label if family is not ModelFamily.UNKNOWN else _model_kind(model)
            raise GCFGRequestError("prior" if generation.settings.prior else "terms",
                                   f"the main model {_main_title()!r} is {kind}; "
                                   "GCFG's prior, concept and checkpoint models guide SD 1.x and SDXL (base-layout) "
                                   "main models")
        if getattr(sd_unet, "current_unet", None) is not None:
            raise GCFGRequestError("enabled", "an alternative 'SD Unet' (e.g. TensorRT) is active; set Settings > "
                                              "SD Unet to Automatic/None to use GCFG side models")


def check_side_family(argument: str, title: str, filename: str) -> None:
    """A side checkpoint must be of the main model's family (same latent space and conditioning), checked from the
    file's header before its weights load; the message names both files and both families."""
    try:
        family = file_family(filename)
    except CheckpointError as error:
        raise GCFGRequestError(argument, str(error)) from error
    main = main_family()
    if base_family(family) is not base_family(main) or family is ModelFamily.SDXL_REFINER:
        raise GCFGRequestError(argument, f"{title!r} is {family.label} but the main model {_main_title()!r} is "
                                         f"{main.label}; a side model must be of the main model's family "
                                         f"(e.g. SD 1.5 for SD 1.x fine-tunes, SDXL base for SDXL fine-tunes)")


def check_refiner(p, generation: Generation) -> None:
    """A refiner GCFG's side models cannot follow is refused before sampling (its family read from the file)."""
    info = getattr(p, "refiner_checkpoint_info", None)
    if info is None or not generation.uses_side_models:
        return
    try:
        family = _checkpoint_family(info)
    except CheckpointError as error:
        raise GCFGRequestError("refiner", str(error)) from error
    if family is None:
        return
    main = main_family()
    if base_family(family) is not base_family(main) or family is ModelFamily.SDXL_REFINER:
        raise GCFGRequestError("refiner", f"the refiner {getattr(info, 'title', info.filename)!r} is {family.label}; "
                                          f"GCFG's {base_family(main).label} prior/concept/checkpoint models cannot "
                                          "be combined with it — choose a refiner of the main model's family, no "
                                          "refiner, or no GCFG side models")


def _load_side_checkpoint(name: str, argument: str):
    info = model_files.resolve_checkpoint(name, argument)
    check_side_family(argument, info.title, info.filename)
    return side_models.load_checkpoint_model(name, argument)


def load(generation: Generation, p) -> None:
    """`process()` work for a generation that changes something: model checks, then the side models."""
    check_main_model(generation)
    check_refiner(p, generation)
    settings = generation.settings
    if settings.prior:
        generation.prior = _load_side_checkpoint(settings.prior, "prior")
    if any(term.model == ModelSlot.CONCEPT.value for term in generation.terms):
        if not settings.concept:
            raise GCFGRequestError("terms", "an @concept term needs a concept model")
        generation.concept = side_models.load_concept(settings.concept, main_family(), _main_title())
    for term in generation.terms:
        if term.model not in (ModelSlot.MAIN.value, ModelSlot.PRIOR.value, ModelSlot.CONCEPT.value):
            generation.checkpoints[term.model] = _load_side_checkpoint(term.model, "terms")
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


def _size_conditioning(p) -> SizeConditioning:
    """SDXL's size conditioning of this pass, as the WebUI's SDXL conditioner builds it (crop from Settings)."""
    width, height = _pass_size(p)
    crop = (int(getattr(shared.opts, "sdxl_crop_top", 0) or 0), int(getattr(shared.opts, "sdxl_crop_left", 0) or 0))
    return SizeConditioning((height, width), crop, (height, width))


def _host_empty_negative(p) -> SDXLConditioning:
    """The empty negative prompt as the WebUI encodes it for SDXL: zero context and pooled part, this pass's size
    embeddings kept. It is the same for every SDXL model, so the prior's E₀ reproduces the WebUI's own uncond."""
    width, height = _pass_size(p)
    texts = prompt_parser.SdConditioning([""], is_negative_prompt=True, width=width, height=height)
    cond = shared.sd_model.get_learned_conditioning(texts)
    return SDXLConditioning(cond["crossattn"][:1].float().cpu(), cond["vector"][:1].float().cpu())


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
        self.family = base_family(main_family())  # the side models' family, which a refiner must share

    def _side_runner(self, name: str, model) -> ModelRunner:
        if name not in self._side_runners:
            self._side_runners[name] = side_models.side_runner(self.space, self.denoiser.inner_model, model, name)
        return self._side_runners[name]

    def _encoded(self, model, prompt: str):
        return model.encoded(prompt, _size_conditioning(self.p) if model.is_sdxl else None)

    def _source(self, key) -> RowSource:
        generation = self.generation
        model_name, prompt = key
        if model_name == ModelSlot.CONCEPT.value:
            concept = generation.concept
            encoded = side_models.concept_conditioning(concept, _size_conditioning(self.p)) if concept.is_sdxl else None
            return side_models.context_source(model_name, self._side_runner(model_name, concept), encoded)
        if model_name == ModelSlot.PRIOR.value and generation.prior is not None:
            return side_models.context_source(model_name, self._side_runner(model_name, generation.prior),
                                              self._encoded(generation.prior, prompt or ""))
        if model_name in generation.checkpoints:
            model = generation.checkpoints[model_name]
            return side_models.context_source(model_name, self._side_runner(model_name, model),
                                              self._encoded(model, prompt or ""))
        # main, and @prior without a prior checkpoint (the current model is the prior then)
        return _main_source(model_name, self.current.runner,
                            _main_conds(self.p, generation, [prompt or ""] * self.p.batch_size))

    def _prior_uncond(self, autoguidance: bool) -> RowSource:
        """E₀ from the prior: the empty prompt as the host encodes an empty negative, or each image's prompt."""
        prior = self.generation.prior
        runner = self._side_runner(ModelSlot.PRIOR.value, prior)
        if autoguidance:
            rows = [self._encoded(prior, prompt) for prompt in _pass_prompts(self.p)]
            if prior.is_sdxl:
                encoded = SDXLConditioning(torch.cat([row.crossattn for row in rows]),
                                           torch.cat([row.vector for row in rows]))
            else:
                encoded = torch.cat(rows)
        elif prior.is_sdxl:
            encoded = _host_empty_negative(self.p)
        else:
            encoded = side_models.empty_context(prior)
        return side_models.context_source(ModelSlot.PRIOR.value, runner, encoded)

    def build(self, has_negative: tuple[bool, ...]) -> PassPlan:
        self.has_negative = has_negative
        generation = self.generation
        settings = generation.settings
        autoguidance = settings.uncond_prompt == "prompt"
        prior = self._prior_uncond(autoguidance) if generation.prior is not None else None
        sources = {key: self._source(key) for key in unique_keys(generation.terms)}
        main_empty = None
        if prior is None and (autoguidance or (settings.negative_scale is not None and any(has_negative))):
            prompts = _pass_prompts(self.p) if autoguidance else [""] * self.p.batch_size
            main_empty = _main_source("main", self.current.runner, _main_conds(self.p, generation, prompts))
        weights = GuidanceWeights(float(self.p.cfg_scale), settings.negative_scale, generation.terms)
        return PassPlan(weights, has_negative, sources, prior, main_empty, generation.uses_side_models,
                        host_row_is_uncond=not autoguidance)

    def rebuild(self) -> PassPlan:
        """The plan again for the model the WebUI switched to (its refiner), or a 422 naming it."""
        info = getattr(shared.sd_model, "sd_checkpoint_info", None)
        family = main_family()
        if self.generation.uses_side_models and (base_family(family) is not self.family
                                                 or family is ModelFamily.SDXL_REFINER):
            raise GCFGRequestError("refiner", f"the WebUI switched to the refiner "
                                              f"{getattr(info, 'title', 'model')!r} ({family.label}), which GCFG's "
                                              f"{self.family.label} side models cannot be combined with")
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
        settings = generation.settings
        if not generation.terms and settings.negative_scale is None and (
                all(has_negative) or (generation.prior is None and settings.uncond_prompt == "empty")):
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
