"""What the trainer does per base-model family: the base model, its latent scale, and SDXL's vector input.

An SD 1.x concept UNet takes latents and timesteps only. An SDXL one also takes the `vector` input
``y = [pooled text embedding | e(original h, w) | e(crop top, left) | e(target h, w)]`` (`gcfg_core.conditioning`):
its pooled part is fixed at the empty prompt's, encoded once by the base model's text encoders when the job is
prepared; the size part is each training image's own (`trainer.data.size_conditioning`). Both are kept in the job
folder (`VectorInput`), so training and resuming never load the text encoders.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from gcfg_core.conditioning import SizeConditioning, size_embedding
from gcfg_core.configs import SCALE_FACTOR, SDXL_SCALE_FACTOR
from gcfg_core.fileio import atomic_path

log = logging.getLogger("gcfg.trainer.family")

SD1, SDXL = "sd1", "sdxl"
VECTOR_INPUT_FILE = "sdxl_vector_input.safetensors"


def latent_scale_factor(family: str) -> float:
    """The VAE latent scale of the family (SD 1.x 0.18215, SDXL 0.13025)."""
    return SDXL_SCALE_FACTOR if family == SDXL else SCALE_FACTOR


def load_base(path: str | os.PathLike, family: str, *, device: torch.device | str = "cpu",
              unet_only: bool = False, compute_hash: bool = True):
    """The base checkpoint as a `gcfg_core` SDModel (SD 1.x) or SDXLModel, checked to be of `family`."""
    from gcfg_core.checkpoint import CheckpointError
    from gcfg_core.model_files import load_checkpoint

    model = load_checkpoint(path, device=device, dtype=torch.float32, compute_hash=compute_hash,
                            text_encoders=not unet_only, vae=not unet_only)
    if model.family.value != family:
        raise CheckpointError(f"{os.fspath(path)}: is {model.family.label} ({model.family.value}); "
                              f"this job is {family}")
    return model


@dataclass(frozen=True, eq=False)
class VectorInput:
    """SDXL's vector input of every latent-cache entry: one fixed pooled part, one size conditioning per entry."""

    pooled: Tensor  # [1, P] fp32: the empty prompt's pooled OpenCLIP-G embedding
    sizes: Tensor  # [entries, 6] int64: original (h, w), crop (top, left), target (h, w)

    def size_of(self, index: int) -> SizeConditioning:
        h, w, top, left, th, tw = (int(v) for v in self.sizes[index])
        return SizeConditioning((h, w), (top, left), (th, tw))

    def vectors(self, indices: Sequence[int]) -> Tensor:
        """fp32 [len(indices), P + 6·256] on the CPU: the pooled part, then each entry's size embeddings."""
        embedded = size_embedding([self.size_of(int(index)) for index in indices])
        return torch.cat([self.pooled.float().expand(len(indices), -1), embedded], dim=-1)

    def save(self, path: str | os.PathLike) -> None:
        with atomic_path(path) as tmp:
            save_file({"pooled": self.pooled.float().contiguous(), "sizes": self.sizes.long().contiguous()},
                      str(tmp))

    @classmethod
    def load(cls, path: str | os.PathLike) -> VectorInput:
        tensors = load_file(str(path))
        return cls(tensors["pooled"], tensors["sizes"])


def entry_sizes(entries: int, entry: Callable[[int], tuple[int, bool]],
                size_of: Callable[[int, bool], SizeConditioning]) -> Tensor:
    """[entries, 6] int64: `size_of(image, flipped)` of each cache entry (`entry(i)` → image index, flipped)."""
    rows = [size_of(*entry(index)).values for index in range(entries)]
    return torch.tensor(rows, dtype=torch.int64).reshape(entries, 6)


@torch.no_grad()
def empty_prompt_text(base) -> tuple[Tensor, Tensor]:
    """(context [1, 77, C], pooled [1, P]) of the empty prompt through an SDXL base's own text encoders, fp32 CPU."""
    context, pooled = base.encode_text([""])
    return context.float().cpu(), pooled.float().cpu()
