"""Preview grids of a concept UNet sampled with GCFG: uncond from the prior, the concept term, fixed seeds.

Row 0 is the concept alone: empty prompt, CFG scale 0, so ε̂ = ε_prior + w·(ε_concept − ε_prior) (paper Eq. 3 with
one term). Each control prompt adds a row with the prompt on the prior at `CONTROL_SCALE` plus the same concept
term, the paper's reference inference setting (w_control = w_concept = 2.5, 25 DPM-Solver++ steps). Columns are
the fixed preview seeds, so grids of successive steps are comparable image by image.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin
from torch import nn

from gcfg_core.fileio import atomic_path
from gcfg_core.model_files import load_checkpoint
from gcfg_core.models import SDModel
from gcfg_core.params import GCFGSettings
from gcfg_core.pipeline import GenerationRequest, generate
from trainer.config import TrainConfig

log = logging.getLogger("gcfg.trainer.previews")

CONTROL_SCALE = 2.5  # paper's reference w_control for prompt rows


@dataclass(frozen=True)
class PreviewSpec:
    """What one grid shows: rows = concept alone + each control prompt, columns = seeds."""

    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    concept_weight: float
    steps: int
    sampler: str
    size: int  # width in pixels
    height: int = 0  # 0: square (`size`)

    @classmethod
    def from_config(cls, config: TrainConfig, *, size: int | tuple[int, int] | None = None) -> PreviewSpec:
        """`size`: side, or (width, height) such as the dataset's dominant bucket; default `config.resolution`²."""
        width, height = (size, size) if isinstance(size, int) else size or (config.resolution, config.resolution)
        return cls(tuple(config.preview_prompts), tuple(config.preview_seeds), config.preview_concept_weight,
                   config.preview_steps, config.preview_sampler, width, height if height != width else 0)

    @property
    def width_height(self) -> tuple[int, int]:
        return self.size, self.height or self.size

    def requests(self) -> list[list[GenerationRequest]]:
        """One list of requests per row (concept alone first), one request per seed."""
        settings = GCFGSettings(enabled=True, concept_weight=self.concept_weight)
        rows = [("", 0.0), *((prompt, CONTROL_SCALE) for prompt in self.prompts)]
        return [[GenerationRequest(prompt=prompt, cfg_scale=scale, steps=self.steps, sampler=self.sampler, seed=seed,
                                   width=self.width_height[0], height=self.width_height[1], gcfg=settings)
                 for seed in self.seeds]
                for prompt, scale in rows]


def image_grid(rows: Sequence[Sequence[Image.Image]]) -> Image.Image:
    """Paste equally sized images into a grid, row by row."""
    width, height = rows[0][0].size
    grid = Image.new("RGB", (width * max(len(r) for r in rows), height * len(rows)))
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            grid.paste(image, (x * width, y * height))
    return grid


@torch.no_grad()
def render_grid(spec: PreviewSpec, prior: SDModel, concept_unet: nn.Module) -> tuple[Image.Image, str]:
    """Sample the grid; returns the image and a text describing rows and settings (stored as PNG `parameters`)."""
    was_training = concept_unet.training
    concept_unet.eval()
    try:
        rows = [[generate(request, prior=prior, concept_unet=concept_unet, progress=False).images[0]
                 for request in row] for row in spec.requests()]
    finally:
        concept_unet.train(was_training)
    description = ("GCFG preview grid; rows: concept only (prompt '', CFG 0)"
                   + "".join(f" | {p!r} (CFG {CONTROL_SCALE:g})" for p in spec.prompts)
                   + f"; columns: seeds {list(spec.seeds)}; concept weight {spec.concept_weight:g}; "
                   f"{spec.sampler}, {spec.steps} steps, {spec.width_height[0]}x{spec.width_height[1]}")
    return image_grid(rows), description


def save_png(image: Image.Image, path: str | os.PathLike, parameters: str) -> Path:
    """Write a PNG atomically with a `parameters` text chunk (read by the WebUI's PNG info)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return Path(path)


class PreviewRenderer:
    """Renders preview grids during training; the prior is loaded on first use and waits on the CPU in between.

    Keeping the prior off the training GPU between previews avoids the OOM at preview time that every trainer
    tracker reports (anchors-training.md, complaint 1).
    """

    def __init__(self, config: TrainConfig, previews_dir: str | os.PathLike, *, device: torch.device | str = "cpu",
                 prior: SDModel | None = None, size: tuple[int, int] | None = None):
        self.spec = PreviewSpec.from_config(config, size=size)
        self.base_checkpoint = config.base_checkpoint
        self.previews_dir = Path(previews_dir)
        self.device = torch.device(device)
        self._prior = prior

    def prior(self) -> SDModel:
        if self._prior is None:
            dtype = torch.float16 if self.device.type == "cuda" else torch.float32
            self._prior = load_checkpoint(self.base_checkpoint, device="cpu", dtype=dtype, compute_hash=False)
        return self._prior

    def render(self, concept_unet: nn.Module, step: int) -> Path:
        """Render and save `previews/step-NNNNNN.png`; returns its path."""
        prior = self.prior().to(self.device)
        try:
            grid, description = render_grid(self.spec, prior, concept_unet)
        finally:
            if self.device.type != "cpu":
                prior.to("cpu")
                torch.cuda.empty_cache()
        path = save_png(grid, self.previews_dir / f"step-{step:06d}.png", f"{description}; step {step}")
        log.info("preview %s", path)
        return path
