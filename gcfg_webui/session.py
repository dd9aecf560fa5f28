"""Per-generation and per-sampler-run setup: settings → models and terms (`process`), → row evaluators (every pass).

A `Generation` is created in `process()` and attached to `p`; it never raises there (the WebUI would swallow it)
but keeps the error, which `begin_pass` turns into a failing denoiser so the request stops before any UNet row.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from modules import (
    prompt_parser,
    sd_samplers,
    sd_samplers_kdiffusion,
    sd_samplers_lcm,
    sd_samplers_timesteps,
    sd_unet,
    shared,
)

from gcfg_core.params import GCFGSettings
from gcfg_core.terms import GuidanceTerm, ModelSlot
from gcfg_webui import extra_models, hook
from gcfg_webui.args import settings_from_args
from gcfg_webui.errors import GCFGRequestError
from gcfg_webui.extra_models import ExtraModel
from gcfg_webui.hook import PassRun, SamplerSpace

logger = logging.getLogger("gcfg.session")

GENERATION_ATTRIBUTE = "gcfg_generation"
OVERRIDES_ATTRIBUTE = "gcfg_overrides"  # {param name: value}, set by the XYZ-plot axes


@dataclass
class Generation:
    """One generation's GCFG state: validated settings, the terms, the loaded side models, or the error."""

    settings: GCFGSettings
    terms: tuple[GuidanceTerm, ...] = ()
    prior: ExtraModel | None = None
    concept: ExtraModel | None = None
    checkpoints: dict[str, ExtraModel] = field(default_factory=dict)
    error: Exception | None = None
    stats: list[hook.RowStats] = field(default_factory=list)
    cond_caches: dict[tuple, list] = field(default_factory=dict)


def generation_terms(settings: GCFGSettings) -> tuple[GuidanceTerm, ...]:
    """The concept term (when a concept model is chosen and its weight ≠ 0) followed by the extra terms."""
    terms = []
    if settings.concept and settings.concept_weight != 0.0:
        terms.append(GuidanceTerm(ModelSlot.CONCEPT.value, None, settings.concept_weight, label="concept"))
    terms.extend(settings.parsed_terms())
    return tuple(terms)


def _needs_side_models(settings: GCFGSettings, terms: Sequence[GuidanceTerm]) -> bool:
    return bool(settings.prior) or any(term.model != ModelSlot.MAIN.value for term in terms)


def check_main_model(settings: GCFGSettings, terms: Sequence[GuidanceTerm]) -> None:
    """Refuse what cannot give a correct image: edit models, unCLIP, non-SD1 models with SD1 side models."""
    model = shared.sd_model
    if getattr(model, "cond_stage_key", None) == "edit":
        raise GCFGRequestError("enabled", "InstructPix2Pix/edit checkpoints are not supported (their CFG uses an "
                                          "image term the WebUI combines separately); disable GCFG for this model")
    if getattr(model.model, "conditioning_key", "crossattn") == "crossattn-adm":
        raise GCFGRequestError("enabled", "unCLIP checkpoints are not supported")
    if _needs_side_models(settings, terms):
        if not getattr(model, "is_sd1", False):
            kind = "SDXL" if getattr(model, "is_sdxl", False) else "SD 2.x" if getattr(model, "is_sd2", False) \
                else "this"
            raise GCFGRequestError("prior" if settings.prior else "terms",
                                   f"a {kind} main model cannot be combined with SD 1.x prior/concept/checkpoint "
                                   "models (different latent space); choose an SD 1.x checkpoint")
        if getattr(sd_unet, "current_unet", None) is not None:
            raise GCFGRequestError("enabled", "an alternative 'SD Unet' (e.g. TensorRT) is active; set Settings > "
                                              "SD Unet to Automatic/None to use GCFG side models")


def _load_models(generation: Generation) -> None:
    settings = generation.settings
    if settings.prior:
        generation.prior = extra_models.load_checkpoint_model(settings.prior, "prior")
    if any(term.model == ModelSlot.CONCEPT.value for term in generation.terms):
        if not settings.concept:
            raise GCFGRequestError("terms", "an @concept term needs a concept model")
        generation.concept = extra_models.load_concept(settings.concept)
    for term in generation.terms:
        if term.model not in (ModelSlot.MAIN.value, ModelSlot.PRIOR.value, ModelSlot.CONCEPT.value):
            generation.checkpoints[term.model] = extra_models.load_checkpoint_model(term.model, "terms")
        if term.model == ModelSlot.CONCEPT.value and term.cond:
            raise GCFGRequestError("terms", f"the concept model is text-free; remove the prompt {term.cond!r}")


def start_generation(p, args: Sequence[object]) -> Generation | None:
    """`process()` work: unpack and validate args, check the model, load side models. None when disabled."""
    try:
        settings = settings_from_args(args)
        overrides = getattr(p, OVERRIDES_ATTRIBUTE, None)
        if overrides:
            settings = settings_from_args([{**{k: getattr(settings, k) for k in settings.__dataclass_fields__},
                                            **overrides}])
    except GCFGRequestError as error:
        return Generation(GCFGSettings(), error=error)
    if not settings.enabled:
        return None
    generation = Generation(settings, terms=generation_terms(settings))
    if not generation.terms and not settings.prior and settings.negative_scale is None:
        return generation  # nothing to change: no model checks either, so "enabled" equals "disabled" everywhere
    try:
        check_main_model(settings, generation.terms)
        _load_models(generation)
    except GCFGRequestError as error:
        generation.error = error
    return generation


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


def uncond_skipped(denoiser, sigma) -> bool:
    """Whether the WebUI skips the uncond rows at this call (Skip Early CFG / NGMS; webui-internals §3.3 step 9)."""
    opts = shared.opts
    skip_early = getattr(opts, "skip_early_cond", 0.0) or 0.0
    if skip_early != 0 and denoiser.step / max(denoiser.total_steps or 1, 1) <= skip_early:
        return True
    s_min_uncond = getattr(denoiser.p, "s_min_uncond", 0.0) or 0.0
    return bool((denoiser.step % 2 or getattr(opts, "s_min_uncond_all", False)) and s_min_uncond > 0
                and float(sigma[0]) < s_min_uncond)


def _main_source(model_name: str, runner: hook.ModelRunner, conds) -> hook.RowSource:
    """A prompt of the current model: its schedules at the denoiser step, for the first `rows` images."""

    def condition(step: int, rows: int, image_cond):
        cond = prompt_parser.reconstruct_cond_batch(conds, step)
        cond = {key: value[:rows] for key, value in cond.items()} if isinstance(cond, dict) else cond[:rows]
        return hook.condition_dict(cond, image_cond)

    return hook.RowSource(model_name, runner, condition)


def _main_conds(p, generation: Generation, prompt: str):
    """The current model's schedules for `prompt`, one per image, encoded as the WebUI encodes the pass's prompts."""
    texts = prompt_parser.SdConditioning([prompt] * p.batch_size, width=p.width, height=p.height)
    if getattr(p, "is_hr_pass", False):
        config = sd_samplers.find_sampler_config(p.hr_sampler_name or p.sampler_name)
        steps = p.hr_second_pass_steps or p.steps
        hires_steps = config.total_steps(steps) if config else steps
        texts = prompt_parser.SdConditioning([prompt] * p.batch_size, width=p.hr_upscale_to_x,
                                             height=p.hr_upscale_to_y)
        network_data = p.hr_extra_network_data
    else:
        hires_steps, network_data = None, p.extra_network_data
    cache = generation.cond_caches.setdefault((prompt, hires_steps), [None, None])
    return p.get_conds_with_caching(prompt_parser.get_learned_conditioning, texts, p.firstpass_steps, [cache],
                                    network_data, hires_steps)


@dataclass
class _Runners:
    """One runner per UNet of a pass, so that all rows of one model can share a call."""

    space: SamplerSpace
    denoiser: object
    main: hook.ModelRunner
    side: dict[str, hook.ModelRunner] = field(default_factory=dict)

    def side_runner(self, name: str, model: ExtraModel) -> hook.ModelRunner:
        if name not in self.side:
            self.side[name] = extra_models.side_runner(self.space, self.denoiser.inner_model, model, name)
        return self.side[name]


def _source(p, generation: Generation, runners: _Runners, term_key) -> hook.RowSource:
    model_name, prompt = term_key
    if model_name == ModelSlot.CONCEPT.value:
        return extra_models.context_source(model_name, runners.side_runner(model_name, generation.concept), None)
    if model_name == ModelSlot.PRIOR.value and generation.prior is not None:
        runner = runners.side_runner(model_name, generation.prior)
        return extra_models.context_source(model_name, runner, generation.prior.context(prompt or ""))
    if model_name in generation.checkpoints:
        model = generation.checkpoints[model_name]
        return extra_models.context_source(model_name, runners.side_runner(model_name, model),
                                           model.context(prompt or ""))
    # main, and @prior without a prior checkpoint (the current model is the prior then)
    return _main_source(model_name, runners.main, _main_conds(p, generation, prompt or ""))


def _pass_negative_prompts(p) -> list[str]:
    prompts = p.hr_negative_prompts if getattr(p, "is_hr_pass", False) else p.negative_prompts
    return list(prompts)


def begin_pass(p, generation: Generation) -> None:
    """`process_before_every_sampling` work: build this sampler run's row sources and wrap its denoiser."""
    denoiser = p.sampler.model_wrap_cfg
    hook.remove_failure(denoiser)
    try:
        if generation.error is not None:
            raise generation.error
        run = build_pass(p, generation, denoiser)
    except GCFGRequestError as error:
        generation.error = error
        hook.install_failure(denoiser, error)
        return
    if run.is_noop:
        hook.remove(denoiser)
        return
    generation.stats.append(run.stats)
    hook.install(denoiser, run)


def build_pass(p, generation: Generation, denoiser) -> PassRun:
    settings = generation.settings
    has_negative = tuple(bool(text.strip()) for text in _pass_negative_prompts(p))
    if not generation.terms and settings.negative_scale is None and (generation.prior is None or all(has_negative)):
        # Nothing to change on this pass: no sampler checks either, so "enabled" equals "disabled" everywhere.
        return PassRun(has_negative=has_negative, negative_scale=None, terms=(), uncond=None, sources={})
    runners = _Runners(sampler_space(p.sampler), denoiser, hook.main_runner(denoiser))
    uncond = None
    if generation.prior is not None:
        runner = runners.side_runner(ModelSlot.PRIOR.value, generation.prior)
        context = extra_models.empty_context(generation.prior)
        uncond = extra_models.context_source(ModelSlot.PRIOR.value, runner, context)
    keys = hook.unique_keys(generation.terms)
    needs_main_empty = uncond is None and settings.negative_scale is not None and any(has_negative)
    if needs_main_empty and (ModelSlot.MAIN.value, "") not in keys:
        keys.append((ModelSlot.MAIN.value, ""))
    sources = {key: _source(p, generation, runners, key) for key in keys}
    return PassRun(has_negative=has_negative, negative_scale=settings.negative_scale, terms=generation.terms,
                   uncond=uncond, sources=sources, main_runner=runners.main, skip_uncond=uncond_skipped)


def end_generation(p) -> Generation | None:
    """Undo the wrapper on a sampler still held by `p` and detach the generation."""
    generation = getattr(p, GENERATION_ATTRIBUTE, None)
    sampler = getattr(p, "sampler", None)
    if sampler is not None and getattr(sampler, "model_wrap_cfg", None) is not None:
        hook.remove(sampler.model_wrap_cfg)
        hook.remove_failure(sampler.model_wrap_cfg)
    setattr(p, GENERATION_ATTRIBUTE, None)
    return generation


_last_run: dict = {}


def record_last_run(generation: Generation | None) -> None:
    """Keep the row counts of the latest generation for GET /gcfg/v1/last-run (diagnostics only)."""
    _last_run.clear()
    if generation is None:
        _last_run.update({"enabled": False})
        return
    _last_run.update({
        "enabled": True,
        "error": None if generation.error is None else str(generation.error),
        "passes": [{"calls": stats.calls, "skipped_calls": stats.skipped_calls, "routed_calls": stats.routed_calls,
                    "rows_per_call": stats.per_call(), "model_calls_per_call": stats.calls_per_call()}
                   for stats in generation.stats],
    })


def last_run() -> dict:
    return dict(_last_run)
