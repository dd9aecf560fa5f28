"""A1111: prior, concept and other-checkpoint UNets beside the WebUI's model — loading and running them.

They are built by `gcfg_core` from the files (never through `sd_models.load_model`, never assigned to
`shared.sd_model`), so the WebUI's LoRA, which only patches layers of `shared.sd_model`, never reaches them.
Hypernetworks are different: the WebUI's cross-attention optimisations are class-level patches that apply the
loaded hypernetworks to every ldm CrossAttention, ours included (documented in the README). An SD 1.x UNet runs
through the original, unpatched `UNetModel.forward` (an active alternative "SD Unet" is refused before
sampling), an SDXL UNet (`gcfg_core.sdxl_unet`) through its own forward, both under the WebUI's dtype and
autocast.

Each side model predicts with its own parameterisation (ε, v, zero terminal SNR — from the file's markers or
the Settings override) on its own schedule, and its rows are converted to the sampler's space before they are
combined, so an ε SDXL base can be the prior of a v-prediction fine-tune.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from modules import devices, lowvram, sd_hijack, shared
from torch import Tensor, nn

from gcfg_core.checkpoint import (
    CheckpointError,
    ModelFamily,
    base_family,
    detect_parameterization,
    read_metadata,
    read_state_dict_shapes,
)
from gcfg_core.conditioning import SDXLConditioning, SizeConditioning
from gcfg_core.configs import sd1_alphas_cumprod
from gcfg_core.denoiser import UNetDenoiser
from gcfg_core.model_files import file_family, load_checkpoint
from gcfg_core.nulltext import nulltext_vector
from gcfg_core.parameterization import Parameterization, Prediction
from gcfg_webui.a1111.rows import ModelRunner, RowSource, SamplerSpace
from gcfg_webui.errors import GCFGRequestError
from gcfg_webui.model_files import CACHE, resolve_checkpoint, resolve_concept
from gcfg_webui.settings import EMPTY_PROMPT_CURRENT, EMPTY_PROMPT_OWN, PREDICTION_DEFAULT, PREDICTION_OPTION

logger = logging.getLogger("gcfg.a1111.models")


@dataclass
class ExtraModel:
    """One loaded side UNet with its family, parameterisation and schedule, plus, for checkpoints, its text
    encoder(s) for its own prompts."""

    name: str
    unet: nn.Module
    family: ModelFamily = ModelFamily.SD1
    filename: str = ""
    prediction: Prediction = Prediction.EPS
    alphas_cumprod: Tensor | None = None  # None: the SD 1 schedule the WebUI's SD 1.x models use
    checkpoint: object | None = None  # a gcfg_core SDModel / SDXLModel with its text encoder(s)
    text_loader: Callable[[], object] | None = None  # loads `checkpoint` on the first prompt to encode
    contexts: dict[tuple, object] = field(default_factory=dict)

    @property
    def is_sdxl(self) -> bool:
        return base_family(self.family) is ModelFamily.SDXL

    def encoded(self, prompt: str, sizes: SizeConditioning | None, clip_skip: int = 1):
        """`prompt` through this checkpoint's own text encoder(s), cached: an SD 1.x context [1, 77·k, C], or an
        SDXL conditioning for `sizes` (crossattn [1, 77·k, C], vector [1, V])."""
        key = (prompt, clip_skip, sizes if self.is_sdxl else None)
        if key not in self.contexts:
            if self.checkpoint is None and self.text_loader is not None:
                self.checkpoint = self.text_loader()
            if self.checkpoint is None:
                raise GCFGRequestError("terms", f"model {self.name!r} has no text encoder for prompt {prompt!r}")
            with torch.no_grad():
                if self.is_sdxl:
                    encoded = self.checkpoint.encode_prompts([prompt], sizes=sizes).to(device="cpu",
                                                                                        dtype=torch.float32)
                else:
                    encoded = self.checkpoint.encode_prompts([prompt], clip_skip=clip_skip).float().cpu()
            self.contexts[key] = encoded
        return self.contexts[key]

    def raw_output(self, x: Tensor, t: Tensor, context: Tensor | SDXLConditioning | None) -> Tensor:
        """The UNet's own output (ε, v, …) at x_t and timestep t, in the WebUI's dtype, on its device."""
        device = _run_device()
        if next(self.unet.parameters()).device != device:
            if lowvram.is_enabled(shared.sd_model):
                lowvram.send_everything_to_cpu()
            self.unet.to(device)
        dtype = devices.dtype_unet
        rows = x.shape[0]
        try:
            with torch.no_grad(), devices.autocast():
                x_in, t_in = x.to(device=device, dtype=dtype), t.to(device)
                if isinstance(context, SDXLConditioning):
                    conditioning = context.to(device=device, dtype=dtype).rows(rows)
                    out = self.unet(x_in, t_in, context=conditioning.crossattn, y=conditioning.vector)
                else:
                    ctx = None if context is None else context.to(device=device, dtype=dtype).expand(rows, -1, -1)
                    out = sd_hijack.ldm_original_forward(self.unet, x_in, t_in, context=ctx)
        finally:
            if _keep_on_cpu():
                self.unet.to(devices.cpu)
        return out.to(device=x.device, dtype=x.dtype)


class _RawForward(nn.Module):
    """`ExtraModel.raw_output` as the UNet `gcfg_core.denoiser.UNetDenoiser` calls (with ``y`` for SDXL)."""

    def __init__(self, model: ExtraModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, t: Tensor, context=None, y=None) -> Tensor:
        return self.model.raw_output(x, t, SDXLConditioning(context, y) if y is not None else context)


def _keep_on_cpu() -> bool:
    main_is_sdxl = bool(getattr(shared.sd_model, "is_sdxl", False))
    return bool(shared.opts.data.get("gcfg_keep_on_cpu", False)) or bool(
        getattr(shared.cmd_opts, "lowvram", False) or getattr(shared.cmd_opts, "medvram", False)
        or (main_is_sdxl and getattr(shared.cmd_opts, "medvram_sdxl", False)))


def _run_device() -> torch.device:
    return torch.device(devices.device)


def _capacity() -> int:
    return int(shared.opts.data.get("gcfg_cache_size", 2))


def _load_device() -> torch.device:
    return torch.device(devices.cpu) if _keep_on_cpu() else _run_device()


def _unmarked_parameterization(filename: str) -> Parameterization | None:
    """The Settings' parameterisation for an SDXL file whose keys and metadata say nothing (None: use the file's)."""
    if base_family(file_family(filename)) is not ModelFamily.SDXL:
        return None
    detected, _ = detect_parameterization(filename, read_state_dict_shapes(filename), read_metadata(filename))
    if detected is not None:
        return None
    return Parameterization.parse(shared.opts.data.get(PREDICTION_OPTION, PREDICTION_DEFAULT))


def load_checkpoint_model(name: str, argument: str) -> ExtraModel:
    """A checkpoint's UNet (for the prior or an `@checkpoint` term), cached; SD 1.x or SDXL. Its text encoder(s)
    load on the first prompt it encodes: an SDXL prior's empty prompt is the host's zeros and needs none."""
    info = resolve_checkpoint(name, argument)
    try:
        override = _unmarked_parameterization(info.filename)
    except CheckpointError as error:
        raise GCFGRequestError(argument, str(error)) from error
    key = ("checkpoint", info.filename, str(devices.dtype_unet), None if override is None else override.label)

    def load() -> ExtraModel:
        try:
            model = load_checkpoint(info.filename, device=devices.cpu, dtype=torch.float32,
                                    parameterization=override, compute_hash=False, text_encoders=False, vae=False)
        except CheckpointError as error:
            raise GCFGRequestError(argument, str(error)) from error
        model.unet.to(device=_load_device(), dtype=devices.dtype_unet).requires_grad_(False)
        prediction = getattr(model, "prediction", Prediction.EPS)
        logger.info("GCFG: loaded %s as %s (%s, %s)", info.title, argument, model.family.label, prediction.value)
        return ExtraModel(name=info.title, unet=model.unet, family=model.family, filename=info.filename,
                          prediction=prediction, alphas_cumprod=model.alphas_cumprod.float().cpu(),
                          text_loader=lambda: _load_text_encoders(info.filename, argument))

    return CACHE.get(key, load, _capacity())


def _load_text_encoders(filename: str, argument: str):
    """The checkpoint's text encoder(s) alone, for prompts of its own (kept on the CPU, frozen)."""
    try:
        model = load_checkpoint(filename, device=devices.cpu, dtype=torch.float32, compute_hash=False, vae=False,
                                unet=False)
    except CheckpointError as error:
        raise GCFGRequestError(argument, str(error)) from error
    for part in ("text_encoder", "text_encoder_2"):
        encoder = getattr(model, part, None)
        if encoder is not None:
            encoder.requires_grad_(False)
    return model


def load_concept(name: str, main_family: ModelFamily, main_title: str) -> ExtraModel:
    """A concept (null-text) UNet from the concept folder, cached; its family (from the file's header, before any
    weight loads) must be the main model's, else the 422 names both models and families."""
    from gcfg_core.concept_file import (
        ConceptFileError,
        concept_family_for,
        load_concept_model,
        read_concept_metadata,
        require_concept_family,
    )

    path = resolve_concept(name)
    family = concept_family_for(main_family)
    try:
        require_concept_family(name, read_concept_metadata(path), family, main=repr(main_title))
    except ConceptFileError as error:
        raise GCFGRequestError("concept", str(error)) from error
    key = ("concept", path, str(devices.dtype_unet))

    def load() -> ExtraModel:
        try:
            unet, metadata = load_concept_model(path, device=devices.cpu, dtype=torch.float32, expected_family=family)
        except ConceptFileError as error:
            raise GCFGRequestError("concept", str(error)) from error
        unet.to(device=_load_device(), dtype=devices.dtype_unet).requires_grad_(False)
        logger.info("GCFG: loaded concept model %s (%s, %s steps)", name, metadata.family_label, metadata.steps)
        if metadata.base_family == "sdxl":
            # Trained as ε on the scaled-linear schedule: converted like any side model when the main model is
            # v-prediction or zero-terminal-SNR.
            return ExtraModel(name=name, unet=unet, family=ModelFamily.SDXL, filename=path,
                              alphas_cumprod=sd1_alphas_cumprod())
        return ExtraModel(name=name, unet=unet, filename=path)

    return CACHE.get(key, load, _capacity())


def concept_conditioning(concept: ExtraModel, sizes: SizeConditioning) -> SDXLConditioning:
    """An SDXL concept UNet's condition for this pass: its fixed pooled part with the pass's size embeddings as the
    vector; the context is a placeholder (the null-text UNet has no cross-attention to read it)."""
    vector = nulltext_vector(concept.unet, sizes)
    return SDXLConditioning(torch.zeros(1, 1, concept.unet.config.context_dim), vector)


def empty_context(prior: ExtraModel) -> Tensor:
    """The SD 1.x prior's empty-prompt context: its own text encoder (default) or the current model's."""
    if shared.opts.data.get("gcfg_empty_prompt_encoder", EMPTY_PROMPT_OWN) == EMPTY_PROMPT_CURRENT:
        return shared.sd_model.cond_stage_model_empty_prompt.float().cpu()
    return prior.encoded("", None)


def _main_alphas_cumprod() -> Tensor:
    return shared.sd_model.alphas_cumprod.detach().float().cpu()


def _same_schedule_eps(model: ExtraModel) -> bool:
    """An ε model on the main model's own schedule: its rows need no conversion beyond the WebUI's own."""
    if model.prediction is not Prediction.EPS:
        return False
    mine = model.alphas_cumprod
    main = _main_alphas_cumprod()
    return mine is None or (mine.shape == main.shape and bool(torch.allclose(mine, main, rtol=1e-6, atol=0)))


def _condition_context(condition: dict, model: ExtraModel):
    if "crossattn" in condition:
        return SDXLConditioning(condition["crossattn"], condition["vector"])
    return condition["c_crossattn"][0]


def _alpha_at(alphas_cumprod: Tensor, t: Tensor) -> Tensor:
    """ᾱ at (possibly fractional, UniPC) timesteps t, linearly interpolated."""
    t = t.detach().double().cpu().clamp(0, alphas_cumprod.shape[0] - 1)
    low = t.floor().long()
    high = (low + 1).clamp(max=alphas_cumprod.shape[0] - 1)
    weight = t - low.double()
    table = alphas_cumprod.double()
    return table[low] * (1 - weight) + table[high] * weight


def side_runner(space: SamplerSpace, inner_model, model: ExtraModel, name: str) -> ModelRunner:
    """A side UNet as a runner: rows in the sampler's space (x₀ for k-diffusion, ε for DDIM/PLMS/UniPC).

    An ε model on the main model's schedule takes the WebUI's own formulas (x₀ = x − σ·ε at input x·c_in; ε as
    is). Any other model (v-prediction, zero terminal SNR, another schedule) gives x₀ through
    `gcfg_core.denoiser.UNetDenoiser` on its own schedule, converted to ε at the main model's timestep where the
    sampler wants ε. "c_concat" (the main model's inpainting conditioning) is ignored: side models are 4-channel.
    """
    direct = _same_schedule_eps(model)
    own = None if direct else UNetDenoiser(_RawForward(model), model.alphas_cumprod, model.prediction)

    def call(x: Tensor, sigma: Tensor, condition: dict) -> Tensor:
        context = _condition_context(condition, model)
        column = (-1, *([1] * (x.dim() - 1)))
        if space is SamplerSpace.NOISE:  # timesteps samplers pass the timestep as "sigma" and want ε
            if direct:
                return model.raw_output(x, sigma, context)
            alpha = _alpha_at(_main_alphas_cumprod(), sigma).to(x.dtype).view(column)
            main_sigma = ((1 - alpha) / alpha).sqrt()
            x_sigma = x / alpha.sqrt()
            x0 = own(x_sigma, main_sigma.view(-1), context=context)
            return (x_sigma - x0) / main_sigma
        if not direct:
            return own(x, sigma, context=context)
        scale = sigma.view(column)
        c_in = 1.0 / (scale ** 2 + 1.0) ** 0.5
        eps = model.raw_output(x * c_in, inner_model.sigma_to_t(sigma), context)
        return x - scale * eps

    return ModelRunner(name, call)


def condition_rows(encoded, images: Sequence[int]) -> dict:
    """The conditioning dict of `images`' rows of one encoding (the same for every image, or one row each)."""
    count = len(images)
    if encoded is None:
        return {"c_crossattn": [None]}
    if isinstance(encoded, SDXLConditioning):
        pick = list(images) if encoded.vector.shape[0] > 1 else [0] * count
        crossattn = encoded.crossattn[pick] if encoded.crossattn.shape[0] > 1 else encoded.crossattn.expand(
            count, -1, -1)
        return {"crossattn": crossattn, "vector": encoded.vector[pick]}
    if encoded.shape[0] > 1:
        return {"c_crossattn": [encoded[list(images)]]}
    return {"c_crossattn": [encoded.expand(count, -1, -1)]}


def context_source(model_name: str, runner: ModelRunner, encoded) -> RowSource:
    """A prompt (or the empty prompt) of a side model: one encoding for every image, or one row per image."""

    def condition(step: int, images: Sequence[int], image_cond: Tensor | None) -> dict:
        return condition_rows(encoded, images)

    return RowSource(model_name, runner, condition)
