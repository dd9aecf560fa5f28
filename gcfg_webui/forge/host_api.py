"""The Forge internals the adapter uses, in one place: sampling, conditions, memory management, the loader.

lllyasviel Forge (and Forge Neo, its continuation) keeps them in the `backend` package. Everything else in this
adapter talks to the host through this module, so a host whose backend moved these functions has one file to
differ in. Facts used (read from Forge's `backend/`):

* `sampling.sampling_function.calc_cond_uncond_batch(model, cond, uncond, x, sigma, model_options)` evaluates
  lists of cond dicts batched and calls `model_options["model_function_wrapper"](apply_model, {"input",
  "timestep", "c", "cond_or_uncond"})` per batched call, with one chunk of B rows per cond dict;
* `sampling.condition.compile_conditions(tensor_or_dict)` makes the cond dicts of a prompt's conditioning;
* `memory_management.load_models_gpu` is run by `sampling_prepare` for the main UNet patcher and every patcher in
  its `extra_model_patchers_during_sampling`; `unload_all_models` frees the device;
* `loader.forge_loader(path)` builds a checkpoint's engine (`forge_objects.unet` a `UnetPatcher` around a `KModel`
  whose `apply_model(x, σ, c_crossattn=…, transformer_options=…)` returns x₀; its own text engine).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

logger = logging.getLogger("gcfg.forge.host_api")


@dataclass(eq=False)
class SideCheckpoint:
    """A checkpoint loaded beside the main one: its UNet patcher (Forge's memory management moves it) and its
    own text encoder."""

    title: str
    patcher: object  # backend.patcher.unet.UnetPatcher
    text_engine: object  # its text processing engine: engine(prompts) -> conditioning
    clip_patcher: object | None = None

    def encode(self, prompt: str) -> Tensor:
        """The checkpoint's own conditioning of `prompt`, [1, 77·k, C] on the CPU (as float32)."""
        from backend import memory_management

        if self.clip_patcher is not None:
            memory_management.load_model_gpu(self.clip_patcher)
        with torch.inference_mode():
            cond = self.text_engine([prompt])
        if isinstance(cond, Mapping):
            cond = cond["crossattn"]
        return cond.float().cpu().clone()


def calc_cond_uncond_batch(model, cond, uncond, x: Tensor, sigma: Tensor, model_options: dict):
    from backend.sampling.sampling_function import calc_cond_uncond_batch as calc

    return calc(model, cond, uncond, x, sigma, model_options)


def cond_entries(conditioning, image_cond: Tensor | None = None, control=None) -> list[dict]:
    """Forge's cond dicts for a prompt's conditioning (tensor, or SDXL's crossattn/vector dict), with the inpainting
    image conditioning and the ControlNet chain the host attaches to its own."""
    from backend.sampling.condition import Condition, compile_conditions

    entries = compile_conditions(conditioning)
    for entry in entries:
        if image_cond is not None:
            entry["model_conds"]["c_concat"] = Condition(image_cond)
        if control is not None:
            entry["control"] = control
    return entries


def unload_all_models() -> None:
    from backend import memory_management

    memory_management.unload_all_models()


def load_checkpoint(filename: str, title: str) -> SideCheckpoint:
    """A checkpoint through Forge's own loader (its model detection, dtypes and devices); only the UNet and the
    text encoder are kept."""
    from backend.loader import forge_loader

    engine = forge_loader(filename)
    if engine is None:
        raise ValueError(f"Forge could not recognise the model type of {filename}")
    objects = engine.forge_objects
    clip = getattr(objects, "clip", None)
    return SideCheckpoint(title=title, patcher=objects.unet, text_engine=engine.text_processing_engine,
                          clip_patcher=getattr(clip, "patcher", None))


def _storage_dtype(kmodel) -> torch.dtype:
    """The dtype to hold a new UNet in: the main one's storage dtype, or its computation dtype when the main model
    is stored quantised (a dtype Forge's plain operations cannot build)."""
    storage = getattr(kmodel, "storage_dtype", None)
    return storage if isinstance(storage, torch.dtype) else kmodel.computation_dtype


def build_concept(main_patcher, state_dict: Mapping[str, Tensor]):
    """A null-text UNet of the main model's architecture (4 input channels), with the concept file's weights and
    vectors, as a `UnetPatcher` sharing the main model's predictor (σ ↔ timestep and x₀ from the output)."""
    from backend.modules.k_model import KModel
    from backend.nn.unet import BasicTransformerBlock, IntegratedUNet2DConditionModel
    from backend.operations import using_forge_operations
    from backend.patcher.unet import UnetPatcher

    from gcfg_core.nulltext import convert_to_nulltext, vectors_from_state_dict

    main_model = main_patcher.model
    main_unet = main_model.diffusion_model
    config = {**dict(main_unet.config), "in_channels": 4}
    storage, computation = _storage_dtype(main_model), main_model.computation_dtype
    offload = main_patcher.offload_device
    with using_forge_operations(device=offload, dtype=storage, manual_cast_enabled=storage != computation):
        unet = IntegratedUNet2DConditionModel.from_config(config)
    convert_to_nulltext(unet, vectors_from_state_dict(state_dict), block_type=BasicTransformerBlock)
    # Forge's layers hold a placeholder (`dummy`) instead of weight and bias until they load a state dict, so the
    # fit is checked on what the UNet holds after loading: every key and shape, nothing left over.
    unet.load_state_dict({key: value.to(dtype=storage) for key, value in state_dict.items()}, strict=False)
    loaded = {key: value for key, value in unet.state_dict().items() if not key.endswith(".dummy")}
    missing = sorted(loaded.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - loaded.keys())
    placeholders = sorted(key for key in unet.state_dict() if key.endswith(".dummy"))
    shapes = sorted(key for key in loaded.keys() & state_dict.keys() if loaded[key].shape != state_dict[key].shape)
    if missing or unexpected or placeholders or shapes:
        raise ValueError(f"the concept model does not fit the main model's UNet: missing "
                         f"{(missing + placeholders)[:4] or 'none'}, unexpected {unexpected[:4] or 'none'}, "
                         f"other shapes {shapes[:4] or 'none'}")
    unet.to(device=offload).eval().requires_grad_(False)
    unet.storage_dtype, unet.computation_dtype = storage, computation
    unet.load_device, unet.offload_device, unet.initial_device = main_patcher.load_device, offload, offload
    model = KModel(model=unet, diffusers_scheduler=None, k_predictor=main_model.predictor,
                   config=getattr(main_model, "config", None))
    return UnetPatcher(model, load_device=main_patcher.load_device, offload_device=offload, current_device=offload)
