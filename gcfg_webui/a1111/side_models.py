"""A1111: prior, concept and other-checkpoint UNets beside the WebUI's model — loading and running them.

They are built by `gcfg_core` from the files (never through `sd_models.load_model`, never assigned to
`shared.sd_model`), so the WebUI's LoRA, which only patches layers of `shared.sd_model`, never reaches them.
Hypernetworks are different: the WebUI's cross-attention optimisations are class-level patches that apply the
loaded hypernetworks to every ldm CrossAttention, ours included (documented in the README). They are run
through the original, unpatched `UNetModel.forward` (an active alternative "SD Unet" is refused before
sampling) under the WebUI's dtype and autocast.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from modules import devices, lowvram, sd_hijack, shared
from torch import Tensor, nn

from gcfg_core.checkpoint import CheckpointError
from gcfg_core.models import SDModel, load_sd_checkpoint
from gcfg_webui.a1111.rows import ModelRunner, RowSource, SamplerSpace
from gcfg_webui.errors import GCFGRequestError
from gcfg_webui.model_files import CACHE, resolve_checkpoint, resolve_concept
from gcfg_webui.settings import EMPTY_PROMPT_CURRENT, EMPTY_PROMPT_OWN

logger = logging.getLogger("gcfg.a1111.models")



@dataclass
class ExtraModel:
    """One loaded side UNet (eps prediction) plus, for checkpoints, its text encoder for its own prompts."""

    name: str
    unet: nn.Module
    checkpoint: SDModel | None = None
    contexts: dict[tuple[str, int], Tensor] = field(default_factory=dict)

    def context(self, prompt: str, clip_skip: int = 1) -> Tensor:
        """Cross-attention context of `prompt` from this checkpoint's own text encoder, cached ([1, 77·k, C])."""
        key = (prompt, clip_skip)
        if key not in self.contexts:
            if self.checkpoint is None or self.checkpoint.text_encoder is None:
                raise GCFGRequestError("terms", f"model {self.name!r} has no text encoder for prompt {prompt!r}")
            with torch.no_grad():
                self.contexts[key] = self.checkpoint.encode_prompts([prompt], clip_skip=clip_skip).float().cpu()
        return self.contexts[key]

    def eps(self, x: Tensor, t: Tensor, context: Tensor | None) -> Tensor:
        """Noise prediction through the original `UNetModel.forward`, in the WebUI's dtype, on its device."""
        device = _run_device()
        if next(self.unet.parameters()).device != device:
            if lowvram.is_enabled(shared.sd_model):
                lowvram.send_everything_to_cpu()
            self.unet.to(device)
        dtype = devices.dtype_unet
        ctx = None if context is None else context.to(device=device, dtype=dtype).expand(x.shape[0], -1, -1)
        try:
            with torch.no_grad(), devices.autocast():
                out = sd_hijack.ldm_original_forward(self.unet, x.to(device=device, dtype=dtype), t.to(device),
                                                     context=ctx)
        finally:
            if _keep_on_cpu():
                self.unet.to(devices.cpu)
        return out.to(device=x.device, dtype=x.dtype)


def _keep_on_cpu() -> bool:
    return bool(shared.opts.data.get("gcfg_keep_on_cpu", False)) or bool(
        getattr(shared.cmd_opts, "lowvram", False) or getattr(shared.cmd_opts, "medvram", False))


def _run_device() -> torch.device:
    return torch.device(devices.device)


def _capacity() -> int:
    return int(shared.opts.data.get("gcfg_cache_size", 2))


def _load_device() -> torch.device:
    return torch.device(devices.cpu) if _keep_on_cpu() else _run_device()


def load_checkpoint_model(name: str, argument: str) -> ExtraModel:
    """A checkpoint's UNet and text encoder (for the prior or an `@checkpoint` term), cached."""
    info = resolve_checkpoint(name, argument)
    key = ("checkpoint", info.filename, str(devices.dtype_unet))

    def load() -> ExtraModel:
        try:
            model = load_sd_checkpoint(info.filename, parts=("unet", "text_encoder"), device=devices.cpu,
                                       dtype=torch.float32, compute_hash=False)
        except CheckpointError as error:
            raise GCFGRequestError(argument, str(error)) from error
        model.unet.to(device=_load_device(), dtype=devices.dtype_unet).requires_grad_(False)
        model.text_encoder.requires_grad_(False)
        logger.info("GCFG: loaded %s as %s", info.title, argument)
        return ExtraModel(name=info.title, unet=model.unet, checkpoint=model)

    return CACHE.get(key, load, _capacity())


def load_concept(name: str) -> ExtraModel:
    """A concept (null-text) UNet from the concept folder, cached."""
    from gcfg_core.concept_file import ConceptFileError, load_concept_model

    path = resolve_concept(name)
    key = ("concept", path, str(devices.dtype_unet))

    def load() -> ExtraModel:
        try:
            unet, metadata = load_concept_model(path, device=devices.cpu, dtype=torch.float32)
        except ConceptFileError as error:
            raise GCFGRequestError("concept", str(error)) from error
        unet.to(device=_load_device(), dtype=devices.dtype_unet).requires_grad_(False)
        logger.info("GCFG: loaded concept model %s (%s steps)", name, metadata.steps)
        return ExtraModel(name=name, unet=unet)

    return CACHE.get(key, load, _capacity())


def empty_context(prior: ExtraModel) -> Tensor:
    """The prior's empty-prompt context: its own text encoder (default) or the current model's, per the setting."""
    if shared.opts.data.get("gcfg_empty_prompt_encoder", EMPTY_PROMPT_OWN) == EMPTY_PROMPT_CURRENT:
        return shared.sd_model.cond_stage_model_empty_prompt.float().cpu()
    return prior.context("")


def side_runner(space: SamplerSpace, inner_model, model: ExtraModel, name: str) -> ModelRunner:
    """A side UNet as a runner: rows in the sampler's space from its ε (k-diffusion: x₀ = x − σ·ε at input x·c_in).

    The conditioning's "c_crossattn" holds one context row per x row; "c_concat" (the main model's inpainting
    conditioning) is ignored: side models are 4-channel.
    """

    def call(x: Tensor, sigma: Tensor, condition: dict) -> Tensor:
        context = condition["c_crossattn"][0]
        if space is SamplerSpace.NOISE:
            return model.eps(x, sigma, context)  # timesteps samplers pass the timestep as "sigma" and want ε
        scale = sigma.view(-1, *([1] * (x.dim() - 1)))
        c_in = 1.0 / (scale ** 2 + 1.0) ** 0.5
        eps = model.eps(x * c_in, inner_model.sigma_to_t(sigma), context)
        return x - scale * eps

    return ModelRunner(name, call)


def context_source(model_name: str, runner: ModelRunner, context: Tensor | None) -> RowSource:
    """A prompt (or the empty prompt) of a side model: the same context for every row."""

    def condition(step: int, images: Sequence[int], image_cond: Tensor | None) -> dict:
        return {"c_crossattn": [None if context is None else context.expand(len(images), -1, -1)]}

    return RowSource(model_name, runner, condition)
