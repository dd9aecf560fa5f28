"""SDXL's conditioning: the cross-attention context plus the `vector` (pooled text embedding and size embeddings).

SD 1.x models take one tensor, the context; SDXL models take a pair, as in sgm (``{"crossattn", "vector"}``)::

    vector = [pooled OpenCLIP-G text embedding | e(original h) e(original w) | e(crop top) e(crop left)
              | e(target h) e(target w)]

where e(n) is the 256-d sinusoidal embedding of the number n (sgm's `ConcatTimestepEmbedderND` with
`outdim: 256`, the same formula as the UNet's timestep embedding: cos half first, then sin). The size
embeddings belong to each image, so `vector` has one row per image; the context usually one row for all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from ldm.modules.diffusionmodules.util import timestep_embedding
from torch import Tensor

from gcfg_core.configs import SIZE_EMBED_DIM


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL's micro-conditioning of one image: original size and target size (height, width), crop (top, left)."""

    original_size: tuple[int, int]
    crop_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None  # None: the original size

    def __post_init__(self) -> None:
        for name in ("original_size", "crop_coords_top_left", "target_size"):
            value = getattr(self, name)
            if value is None:
                continue
            if (not isinstance(value, tuple | list) or len(value) != 2
                    or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in value)):
                raise ValueError(f"{name} must be two integers ≥ 0, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if self.target_size is None:
            object.__setattr__(self, "target_size", self.original_size)
        if 0 in self.original_size or 0 in self.target_size:
            raise ValueError(f"sizes must be positive, got original {self.original_size}, target {self.target_size}")

    @classmethod
    def for_image(cls, width: int, height: int) -> SizeConditioning:
        """What the WebUI sends for a generation of `width`×`height` (its default crop setting is 0, 0)."""
        return cls((height, width), (0, 0), (height, width))

    @property
    def values(self) -> tuple[int, ...]:
        """The six numbers in the order sgm embeds them."""
        return (*self.original_size, *self.crop_coords_top_left, *self.target_size)


def size_embedding(sizes: Sequence[SizeConditioning], *, device=None) -> Tensor:
    """[len(sizes), 6·256] float32: each of the six numbers of each image embedded as a sinusoid, concatenated."""
    values = torch.tensor([size.values for size in sizes], dtype=torch.float32, device=device)
    rows, fields = values.shape
    return timestep_embedding(values.reshape(-1), SIZE_EMBED_DIM).reshape(rows, fields * SIZE_EMBED_DIM)


@dataclass(frozen=True, eq=False)
class SDXLConditioning:
    """An SDXL model's condition: ``crossattn`` [1 or B, T, C] and ``vector`` [1 or B, D]."""

    crossattn: Tensor
    vector: Tensor

    def __post_init__(self) -> None:
        if self.crossattn.dim() == 2:
            object.__setattr__(self, "crossattn", self.crossattn.unsqueeze(0))
        if self.vector.dim() == 1:
            object.__setattr__(self, "vector", self.vector.unsqueeze(0))
        if self.crossattn.dim() != 3 or self.vector.dim() != 2:
            raise ValueError(f"SDXL conditioning needs crossattn [B, T, C] and vector [B, D], got "
                             f"{list(self.crossattn.shape)} and {list(self.vector.shape)}")

    @property
    def tokens(self) -> int:
        return int(self.crossattn.shape[-2])

    def rows(self, batch: int) -> SDXLConditioning:
        """Both parts with exactly `batch` rows (a single row is repeated); other row counts are an error."""
        for name, part in (("crossattn", self.crossattn), ("vector", self.vector)):
            if part.shape[0] not in (1, batch):
                raise ValueError(f"SDXL conditioning {name} has {part.shape[0]} rows for a batch of {batch}")
        return SDXLConditioning(self.crossattn.expand(batch, -1, -1), self.vector.expand(batch, -1))

    def to(self, device=None, dtype=None) -> SDXLConditioning:
        return SDXLConditioning(self.crossattn.to(device=device, dtype=dtype),
                                self.vector.to(device=device, dtype=dtype))


def condition_tokens(condition: Tensor | SDXLConditioning | None) -> int | None:
    """The token length of a condition (what decides whether two conditions fit in one batched call)."""
    if condition is None:
        return None
    if isinstance(condition, SDXLConditioning):
        return condition.tokens
    return int(condition.shape[-2])


def stack_conditions(parts: Sequence[Tensor | SDXLConditioning | None], batch: int, device) -> Tensor | \
        SDXLConditioning | None:
    """The conditions of several terms as one batched condition: each expanded to `batch` rows, then concatenated.

    Contexts are ``[T, C]``, ``[1, T, C]`` or ``[B, T, C]`` tensors (SD 1.x) or `SDXLConditioning`; None (a
    text-free model) stays None. All parts must be of one kind.
    """
    if parts[0] is None:
        return None
    if isinstance(parts[0], SDXLConditioning):
        if not all(isinstance(part, SDXLConditioning) for part in parts):
            raise ValueError("cannot batch SDXL conditioning with plain contexts in one call")
        expanded = [part.rows(batch) for part in parts]
        return SDXLConditioning(torch.cat([part.crossattn for part in expanded]).to(device),
                                torch.cat([part.vector for part in expanded]).to(device))
    rows = [part.reshape(-1, *part.shape[-2:]).expand(batch, -1, -1) for part in parts]
    return torch.cat(rows).to(device)
