"""Sampling with this project's engine (`gcfg_core.pipeline.generate`) and the measurements of the table.

Every image here comes from `generate`: plain CFG is a request with GCFG disabled on the model itself; GCFG with
the prior's unconditional term is a request with GCFG enabled and the base as `prior`; the paper's method adds the
concept UNet as `concept_unet`. Same seeds for every row (image i of a prompt uses seed `seed0 + i`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from gcfg_core.models import SDModel
from gcfg_core.params import GCFGSettings
from gcfg_core.pipeline import GenerationRequest, generate
from paper_mini import detect, world

log = logging.getLogger("gcfg.paper_mini.evaluate")

SAMPLER = "DPM++ 2M"  # the paper's DPM-Solver++ (2M)
STEPS = 15  # fewer than the paper's 25: every table cell is sampled on a shared 2-core CPU


@dataclass(frozen=True)
class Setup:
    """How one table row samples: which model runs the prompt, which predicts ε₀, and the concept term."""

    main: str  # model key of the prompt term
    prior: str | None = None  # None: plain CFG on `main` (ε₀ = main with the empty prompt)
    concept_weight: float = 0.0  # > 0: add the concept UNet's term (needs prior)


def sample(models: dict[str, SDModel], setup: Setup, prompt: str, cfg_scale: float, seeds: Sequence[int],
           concept_unet: nn.Module | None = None, *, steps: int = STEPS, batch: int = 16) -> np.ndarray:
    """uint8 [len(seeds), 64, 64, 3] images of `prompt` under `setup` (seeds must be consecutive)."""
    seeds = list(seeds)
    if seeds != list(range(seeds[0], seeds[0] + len(seeds))):
        raise ValueError(f"seeds must be consecutive, got {seeds}")
    main = models[setup.main]
    if setup.prior is None:
        gcfg, prior = GCFGSettings(enabled=False), main
    else:
        gcfg, prior = GCFGSettings(enabled=True, concept_weight=setup.concept_weight), models[setup.prior]
    use_concept = setup.concept_weight != 0
    if use_concept and concept_unet is None:
        raise ValueError("a setup with a concept weight needs the concept UNet")
    images = []
    for start in range(0, len(seeds), batch):
        count = min(batch, len(seeds) - start)
        request = GenerationRequest(prompt=prompt, cfg_scale=cfg_scale, steps=steps, sampler=SAMPLER,
                                    seed=seeds[start], width=world.SIZE, height=world.SIZE, batch_size=count,
                                    gcfg=gcfg)
        with torch.no_grad():
            result = generate(request, prior=prior, main=main, concept_unet=concept_unet if use_concept else None,
                              progress=False)
        images.extend(np.asarray(image) for image in result.images)
    return np.stack(images)


def unconditional(models: dict[str, SDModel], key: str, seeds: Sequence[int], *, steps: int = STEPS) -> np.ndarray:
    """Samples of model `key`'s unconditional prediction alone (empty prompt, weight 1: ε̂ = ε(∅))."""
    return sample(models, Setup(key), "", 1.0, seeds, steps=steps)


# ----------------------------------------------------------------------------------------------------------------
# metrics


def adherence(readings: Sequence[detect.Reading], colour: str, background: str) -> dict[str, float]:
    """Fractions of images whose object colour / background / both match the prompt."""
    colour_ok = np.array([r.colour == colour for r in readings])
    background_ok = np.array([r.background == background for r in readings])
    return {"colour": float(colour_ok.mean()), "background": float(background_ok.mean()),
            "both": float((colour_ok & background_ok).mean())}


def caption_adherence(readings: Sequence[detect.Reading], scenes: Sequence[world.Scene]) -> dict[str, float]:
    """Fractions of images matching the full caption they were prompted with: per attribute and all three."""
    shape = np.array([r.shape == s.shape for r, s in zip(readings, scenes, strict=True)])
    colour = np.array([r.colour == s.colour for r, s in zip(readings, scenes, strict=True)])
    background = np.array([r.background == s.background for r, s in zip(readings, scenes, strict=True)])
    return {"shape": float(shape.mean()), "colour": float(colour.mean()), "background": float(background.mean()),
            "all": float((shape & colour & background).mean())}


def attribute_histograms(readings: Sequence[detect.Reading]) -> dict[str, list[float]]:
    """Counts of detected shape, colour and background (last bin: none / anything else)."""
    return {
        "shape": world.attribute_counts((r.shape for r in readings), world.SHAPES).tolist(),
        "colour": world.attribute_counts((r.colour for r in readings), tuple(world.OBJECT_COLOURS)).tolist(),
        "background": world.attribute_counts((r.background for r in readings), tuple(world.BACKGROUNDS)).tolist(),
    }


def drift(readings: Sequence[detect.Reading], reference: Sequence[detect.Reading]) -> dict[str, float]:
    """Unconditional drift of `readings` against `reference` (the base's unconditional samples).

    `tv`: the mean over shape, colour and background of the total-variation distance between the detected
    attribute distributions (0 = same distribution, 1 = disjoint). `concept_share`: the fraction of samples that
    have the concept set's attributes (a ring, red or yellow, on black), the direction of the drift.
    """
    mine, theirs = attribute_histograms(readings), attribute_histograms(reference)
    tv = float(np.mean([detect.total_variation(mine[key], theirs[key]) for key in mine]))
    share = float(np.mean([world.is_concept_like(r.shape, r.colour, r.background) for r in readings]))
    return {"tv": tv, "concept_share": share}


def ring_rate(readings: Sequence[detect.Reading]) -> float:
    return float(np.mean([r.shape == world.CONCEPT_SHAPE for r in readings]))
