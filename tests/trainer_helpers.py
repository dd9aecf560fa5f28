"""Shared builders of the trainer tests: a tiny image folder, a tiny CPU config and the same config as CLI flags."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from trainer.config import TrainConfig


def make_dataset(folder: Path, count: int = 8, size: int = 64) -> Path:
    """`count` random-noise PNGs of `size`² pixels in `folder` (seeded, so every call writes the same images)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"img{i:02d}.png")
    return folder


def tiny_config(tmp_path: Path, base: Path, **overrides) -> TrainConfig:
    """A 4-step, 64 px, fp32 CPU config over `make_dataset(tmp_path / "data")`, job folder `tmp_path / "job"`."""
    values = dict(dataset_dir=str(make_dataset(tmp_path / "data")), base_checkpoint=str(base),
                  job_dir=str(tmp_path / "job"), name="tiny", resolution=64, min_image_size=0, batch_size=4,
                  micro_batch_size=2, max_steps=4, mixed_precision="no", device="cpu", calibration_images=4,
                  checkpoint_every_steps=2, checkpoint_every_minutes=0, preview_every_steps=0, keep_last=3)
    values.update(overrides)
    return TrainConfig(**values)


def config_flags(config: TrainConfig) -> list[str]:
    """Every field of `config` as `python -m trainer train` flags."""
    args: list[str] = []
    for key, value in config.to_dict().items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            args += [flag, *map(str, value)] if value else []
        else:
            args += [flag, str(value)]
    return args


def cli_args(tmp_path: Path, base: Path, **overrides) -> list[str]:
    """`tiny_config(tmp_path, base, **overrides)` as command-line flags (writes the dataset, like `tiny_config`)."""
    return config_flags(tiny_config(tmp_path, base, **overrides))
