"""Forge: the prior, concept and other-checkpoint UNets beside the main model — loaded and run the Forge way.

Checkpoints go through Forge's own loader (`host_api.load_checkpoint`): its model detection, storage and
computation dtypes and devices; the main checkpoint is never replaced. A concept file becomes a null-text UNet of
the main model's architecture built with Forge's UNet class and operations. Each side model is a `UnetPatcher`
that the pass registers with `add_extra_model_patcher_during_sampling`, so Forge's memory management loads it
beside the main UNet when sampling starts and offloads it like its own models (`--always-cpu`, low VRAM). LoRA
patches live on the main UNet's patcher and never reach them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
from modules import shared
from torch import Tensor

from gcfg_core.checkpoint import CheckpointError, ModelFamily, detect_family, read_state_dict_shapes
from gcfg_webui.errors import GCFGRequestError
from gcfg_webui.forge import host_api
from gcfg_webui.model_files import CACHE, resolve_checkpoint, resolve_concept
from gcfg_webui.settings import EMPTY_PROMPT_CURRENT, EMPTY_PROMPT_OWN

logger = logging.getLogger("gcfg.forge.models")


@dataclass(eq=False)
class SideModel:
    """One loaded side UNet: its patcher and, for checkpoints, its own text encoder (contexts cached per prompt)."""

    name: str
    patcher: object
    checkpoint: host_api.SideCheckpoint | None = None
    contexts: dict[str, Tensor] = field(default_factory=dict)

    def context(self, prompt: str) -> Tensor:
        """The cross-attention context of `prompt` from this checkpoint's own text encoder ([1, 77·k, C], CPU)."""
        if prompt not in self.contexts:
            if self.checkpoint is None:
                raise GCFGRequestError("terms", f"model {self.name!r} has no text encoder for prompt {prompt!r}")
            self.contexts[prompt] = self.checkpoint.encode(prompt)
        return self.contexts[prompt]

    def apply(self, x: Tensor, sigma: Tensor, context: Tensor, transformer_options: dict) -> Tensor:
        """x₀ of rows (x, σ) through the side model's own `apply_model` (its predictor maps σ and its output)."""
        with torch.inference_mode():
            out = self.patcher.model.apply_model(x, sigma, c_crossattn=context.to(x.device),
                                                 transformer_options=transformer_options)
        return out.to(dtype=x.dtype)


def _capacity() -> int:
    return int(shared.opts.data.get("gcfg_cache_size", 2))


def _check_sd1(filename: str, title: str, argument: str) -> None:
    try:
        family = detect_family(read_state_dict_shapes(filename)) if os.path.isfile(filename) else None
    except CheckpointError as error:
        raise GCFGRequestError(argument, str(error)) from error
    if family is not None and family is not ModelFamily.SD1:
        raise GCFGRequestError(argument, f"{title!r} is {family.label}; GCFG's prior and checkpoint terms are "
                                         "SD 1.x models (the same latent space as an SD 1.x main model)")


def load_checkpoint_model(name: str, argument: str) -> SideModel:
    """A checkpoint's UNet and text encoder through Forge's loader (for the prior or an `@checkpoint` term), cached."""
    info = resolve_checkpoint(name, argument)
    _check_sd1(info.filename, info.title, argument)

    def load() -> SideModel:
        try:
            checkpoint = host_api.load_checkpoint(info.filename, info.title)
        except ValueError as error:
            raise GCFGRequestError(argument, f"{info.title!r}: {error}") from error
        logger.info("GCFG: loaded %s as %s through Forge's loader", info.title, argument)
        return SideModel(name=info.title, patcher=checkpoint.patcher, checkpoint=checkpoint)

    return CACHE.get(("forge-checkpoint", info.filename), load, _capacity())


def load_concept(name: str) -> SideModel:
    """A concept (null-text) UNet of the main model's architecture, cached per main architecture."""
    from gcfg_core.concept_file import ConceptFileError, read_concept_state_dict

    path = resolve_concept(name)
    main_patcher = shared.sd_model.forge_objects.unet
    config = dict(getattr(main_patcher.model.diffusion_model, "config", {}) or {})

    def load() -> SideModel:
        try:
            state_dict, metadata = read_concept_state_dict(path)
            patcher = host_api.build_concept(main_patcher, state_dict)
        except (ConceptFileError, ValueError) as error:
            raise GCFGRequestError("concept", str(error)) from error
        logger.info("GCFG: loaded concept model %s (%s steps)", name, metadata.steps)
        return SideModel(name=name, patcher=patcher)

    return CACHE.get(("forge-concept", path, repr(sorted(config.items()))), load, _capacity())


def concept_context(concept: SideModel) -> Tensor:
    """A stand-in context for the text-free concept UNet ([1, 1, C] zeros): its cross-attentions are constants,
    but Forge's `apply_model` casts a context."""
    width = int(dict(getattr(concept.patcher.model.diffusion_model, "config", {}) or {}).get("context_dim", 768))
    return torch.zeros(1, 1, width)


def empty_context(prior: SideModel) -> Tensor:
    """The prior's empty-prompt context: its own text encoder (default) or the main model's, per the setting."""
    if shared.opts.data.get("gcfg_empty_prompt_encoder", EMPTY_PROMPT_OWN) == EMPTY_PROMPT_CURRENT:
        with torch.inference_mode():
            cond = shared.sd_model.get_learned_conditioning([""])
        cond = cond["crossattn"] if isinstance(cond, dict) else cond
        return cond.float().cpu().clone()
    return prior.context("")
