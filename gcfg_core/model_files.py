"""Loading any checkpoint the sampler runs (SD 1.x or SDXL, by its detected family) and checking that files match."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch

from gcfg_core.checkpoint import (
    CheckpointError,
    ModelFamily,
    base_family,
    detect_family,
    read_state_dict_shapes,
    require_same_family,
)
from gcfg_core.models import SDModel, load_sd_checkpoint
from gcfg_core.parameterization import Parameterization
from gcfg_core.sdxl import SDXLModel, load_sdxl_checkpoint

logger = logging.getLogger("gcfg.model_files")

_SDXL_FAMILIES = (ModelFamily.SDXL, ModelFamily.SDXL_INPAINT, ModelFamily.SDXL_REFINER)


def file_family(path: str | os.PathLike) -> ModelFamily:
    """The family of a checkpoint file, from its header (`.safetensors`) or its tensors' shapes."""
    return detect_family(read_state_dict_shapes(path))


def require_matching_files(main: tuple[str | os.PathLike, ModelFamily],
                           others: Mapping[str, tuple[str | os.PathLike, ModelFamily]]) -> None:
    """Raise `CheckpointError` naming both files and families for the first file (by role) of another family."""
    main_path, main_family = main
    for role, (path, family) in others.items():
        require_same_family(main_path, main_family, path, family, role=role)


def load_checkpoint(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    parameterization: Parameterization | None = None,
    compute_hash: bool = True,
    text_encoders: bool = True,
    vae: bool = True,
    unet: bool = True,
) -> SDModel | SDXLModel:
    """An `SDXLModel` for SDXL-family files, else an `SDModel` (which refuses what is not SD 1.x, naming it).

    `parameterization` overrides an SDXL file's own markers; SD 1.x files are always ε here. `text_encoders`
    False leaves the text encoder(s) out (a prior that never encodes a prompt of its own), `vae` False the VAE
    (a side model never decodes), `unet` False the UNet.
    """
    family = file_family(path)
    if family in _SDXL_FAMILIES:
        encoders = ("text_encoder", "text_encoder_2") if text_encoders else ()
        parts = (*(("unet",) if unet else ()), *(("vae",) if vae else ()), *encoders)
        return load_sdxl_checkpoint(path, parts=parts, device=device, dtype=dtype, parameterization=parameterization,
                                    compute_hash=compute_hash)
    if parameterization is not None and base_family(family) is ModelFamily.SD1:
        raise CheckpointError(f"{os.fspath(path)}: a parameterisation override ({parameterization.label}) applies "
                              f"to SDXL checkpoints; this is {family.label}")
    parts = (*(("unet",) if unet else ()), *(("vae",) if vae else ()), *(("text_encoder",) if text_encoders else ()))
    return load_sd_checkpoint(path, parts=parts, device=device, dtype=dtype, compute_hash=compute_hash)
