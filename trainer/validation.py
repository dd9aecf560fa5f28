"""Validation: a held-out split of the images and their loss at fixed noise and timesteps.

* **Split** (`held_out_images`): `max(validation_min_images, ⌈fraction · N⌉)` images chosen by a seeded
  permutation, held out of the data order (their mirrors too). A dataset with fewer than four times that many
  images is not split: holding out more than a quarter of a small set would cost more than the curve tells.
* **Loss** (`validation_loss`): eps-prediction MSE of every held-out image (the posterior mean, no VAE sampling
  noise) at each of `VALIDATION_TIMESTEPS`, with noise drawn from a generator seeded by (seed, image,
  timestep). The same numbers go in at every evaluation, so the curve moves only when the model does; it is
  plotted beside the training loss, and a rising validation loss under a falling training loss is overfitting.
  Masks weight it as they weight training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from gcfg_core.configs import SCALE_FACTOR
from trainer.buckets import entry_groups

# Spread over the schedule: low t (detail) to high t (layout); the mean weighs them equally.
VALIDATION_TIMESTEPS = (100, 300, 500, 700, 900)


def held_out_count(num_images: int, fraction: float, minimum: int) -> int:
    """How many images are held out (0 = no split; module docstring)."""
    if fraction <= 0:
        return 0
    count = max(minimum, math.ceil(fraction * num_images))
    return count if num_images >= 4 * count else 0


def held_out_images(num_images: int, fraction: float, minimum: int, seed: int) -> tuple[int, ...]:
    """The held-out image indices, sorted: the first `held_out_count` of a permutation seeded by `seed`."""
    from trainer.loop import seed_for

    count = held_out_count(num_images, fraction, minimum)
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed_for("validation-split", seed)))
    return tuple(sorted(order[:count].tolist()))


def training_entries(num_entries: int, num_images: int, held_out: Sequence[int]) -> list[int]:
    """Cache entries (image i and its mirror N + i) of the images not held out, in entry order."""
    held = set(held_out)
    return [entry for entry in range(num_entries) if entry % num_images not in held]


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-sample MSE `[B]`; with a mask `[B, 1, h, w]`, the mask-weighted mean over pixels and channels.

    Normalised by the mask's sum, so a masked image weighs as much in the batch as an unmasked one and only its
    masked pixels shape the loss; an all-zero mask contributes 0.
    """
    error = (prediction.float() - target.float()).square()
    if mask is None:
        return error.mean(dim=(1, 2, 3))
    mask = mask.to(error.dtype)
    weight = mask.sum(dim=(1, 2, 3)) * error.shape[1]
    return (error * mask).sum(dim=(1, 2, 3)) / weight.clamp_min(1e-8)


@torch.no_grad()
def validation_loss(model: nn.Module, cache, images: Sequence[int], seed: int, alphas_cumprod: torch.Tensor, *,
                    batch_size: int, device: torch.device | str = "cpu",
                    timesteps: Sequence[int] = VALIDATION_TIMESTEPS, scale_factor: float = SCALE_FACTOR,
                    vectors: Callable[[Sequence[int]], torch.Tensor] | None = None) -> float:
    """Mean loss of `model` over `images` (unflipped cache entries) × `timesteps` (module docstring).

    `scale_factor`: the VAE's latent scale (SDXL's differs); `vectors(entries)`: an SDXL UNet's vector input rows.
    """
    from trainer.loop import noisy_latents, seed_for

    total, count = 0.0, 0
    for group in entry_groups([cache.entry_size(i) for i in range(len(cache))], list(images)):
        for start in range(0, len(group), batch_size):
            chunk = list(group[start:start + batch_size])
            mean = cache.moments(chunk).chunk(2, dim=1)[0] * scale_factor
            extra = {} if vectors is None else {"y": vectors(chunk).to(device)}
            mask = cache.masks(chunk)
            for t in timesteps:
                noise = torch.stack([torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(
                    seed_for("validation", seed, entry, t))) for entry in chunk])
                steps = torch.full((len(chunk),), t, dtype=torch.long)
                latents, noise, steps = mean.to(device), noise.to(device), steps.to(device)
                prediction = model(noisy_latents(latents, noise, steps, alphas_cumprod.to(device)), steps,
                                   context=None, **extra)
                losses = masked_mse(prediction, noise, None if mask is None else mask.to(device))
                total += float(losses.sum())
                count += len(chunk)
    return total / max(count, 1)
