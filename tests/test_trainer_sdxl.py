"""Training SDXL concept UNets (tiny SDXL-layout base, CPU, fp32): each image's size conditioning, `python -m
trainer` end to end with exact resume, the concept file's family, and family mismatches refused up front."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from gcfg_core.cli import main as gcfg_main
from gcfg_core.concept_file import load_concept_model, read_concept_metadata
from gcfg_core.conditioning import SizeConditioning
from gcfg_core.sdxl import load_sdxl_checkpoint
from gcfg_core.sdxl_unet import SDXLUNet
from trainer import checkpoints, loop
from trainer.cli import EXIT_USAGE
from trainer.cli import main as trainer_main
from trainer.config import ConfigError, ResizePolicy
from trainer.data import ImageRecord, size_conditioning
from trainer.family import VECTOR_INPUT_FILE, VectorInput
from trainer.jobfolder import JobFolder, JobState

sys.path.insert(0, str(Path(__file__).parent))
from trainer_helpers import config_flags, tiny_config  # noqa: E402


def record(width: int, height: int) -> ImageRecord:
    return ImageRecord("x.png", width, height, 1, 1)


@pytest.mark.parametrize(("size", "policy", "flipped", "expected"), [
    # (width, height) → ((orig h, orig w), (crop top, crop left), (target h, target w)), at resolution 64
    ((64, 64), "center-crop", False, ((64, 64), (0, 0), (64, 64))),
    ((101, 64), "center-crop", False, ((64, 101), (0, 18), (64, 64))),  # 37 columns cut: 18 left, 19 right
    ((101, 64), "center-crop", True, ((64, 101), (0, 19), (64, 64))),  # mirrored: the 19 are on the left now
    ((64, 128), "center-crop", False, ((128, 64), (32, 0), (64, 64))),
    ((200, 100), "center-crop", False, ((100, 200), (0, 32), (64, 64))),  # resized to 128×64 first
    ((200, 100), "squash", False, ((100, 200), (0, 0), (64, 64))),
])
def test_each_images_size_conditioning_is_its_original_size_crop_and_target(size, policy, flipped, expected):
    result = size_conditioning(record(*size), 64, ResizePolicy(policy), flipped=flipped)
    assert result == SizeConditioning(*expected)


@pytest.fixture(scope="module")
def sdxl_base(tmp_path_factory):
    path = tmp_path_factory.mktemp("sdxl-base") / "xl-base.safetensors"
    assert gcfg_main(["random-checkpoint", "--sdxl-tiny", str(path)]) == 0
    return path


def wide_images(folder: Path) -> None:
    """Two 96×64 images beside the square ones: their crop (0, 16) must reach the vector input."""
    rng = np.random.default_rng(1)
    for index in range(2):
        Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(folder / f"wide{index}.png")


def sdxl_config(tmp_path: Path, base: Path, **overrides):
    values = dict(max_steps=3, batch_size=2, micro_batch_size=1, checkpoint_every_steps=0, calibration_images=4,
                  learning_rate=1e-3)
    config = tiny_config(tmp_path, base, **{**values, **overrides})
    wide_images(Path(config.dataset_dir))
    return config


def expected_vector(pooled: torch.Tensor, numbers: tuple[int, ...]) -> torch.Tensor:
    """[pooled | cos, sin of each number times 10000^(−i/128), i = 0…127], sgm's vector written out."""
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float64) / 128)
    parts = [torch.cat([torch.cos(n * freqs), torch.sin(n * freqs)]) for n in numbers]
    return torch.cat([pooled.reshape(-1).double(), *parts]).float()


def _stop_after(step: int, stop: loop.StopFlag):
    def on_step(done: int, _loss: float) -> None:
        if done == step:
            stop.request("test stop")
    return on_step


@pytest.mark.slow
def test_python_m_trainer_trains_an_sdxl_concept_unet_and_resume_is_exact(tmp_path, sdxl_base, capsys,
                                                                            monkeypatch):
    whole = sdxl_config(tmp_path / "a", sdxl_base)
    assert trainer_main(["-q", "train", *config_flags(whole)]) == 0  # model_family 'auto': read from the file
    assert "completed 3 steps" in capsys.readouterr().out
    job_a = JobFolder(whole.job_dir)
    losses_a = {e["step"]: e["loss"] for e in job_a.read_events() if e.get("type") == "step"}

    concept_path = checkpoints.latest_checkpoint(job_a.checkpoints_dir).concept_path
    metadata = read_concept_metadata(concept_path)
    assert metadata.base_family == "sdxl" and metadata.steps == 3
    unet, _ = load_concept_model(concept_path, expected_family="sdxl")
    base = load_sdxl_checkpoint(sdxl_base, parts=("text_encoder", "text_encoder_2"), compute_hash=False)
    _, pooled = base.encode_text([""])
    assert isinstance(unet, SDXLUNet) and torch.equal(unet.nulltext_pooled, pooled)  # the empty prompt's, fixed

    vector_input = VectorInput.load(job_a.path / VECTOR_INPUT_FILE)
    images = sorted(p.name for p in Path(whole.dataset_dir).iterdir())  # the scan's order
    wide = images.index("wide0.png")
    assert vector_input.size_of(wide) == SizeConditioning((64, 96), (0, 16), (64, 64))
    assert vector_input.size_of(images.index("img00.png")) == SizeConditioning((64, 64), (0, 0), (64, 64))

    split = sdxl_config(tmp_path / "b", sdxl_base)
    job_b = JobFolder(split.job_dir)
    stop = loop.StopFlag()
    fed = []

    def recording_loss(model, latents, generator, alphas_cumprod, config, mask=None, vector=None):
        fed.append(vector.detach().clone())
        return diffusion_loss(model, latents, generator, alphas_cumprod, config, mask=mask, vector=vector)

    diffusion_loss = loop.diffusion_loss
    monkeypatch.setattr(loop, "diffusion_loss", recording_loss)
    first = loop.train(split, job_b, stop=stop, on_step=_stop_after(1, stop), progress=False)
    assert first.state == JobState.STOPPED and first.step == 1
    second = loop.train(split, job_b, resume=True, progress=False)
    assert second.state == JobState.COMPLETED and sorted(second.losses) == [2, 3]
    assert first.losses[1] == losses_a[1] and all(second.losses[s] == losses_a[s] for s in (2, 3))  # bit-identical
    # Every latent came with [the fixed pooled part | its own image's size embeddings], the wide ones included.
    rows = torch.cat(fed)
    square, crop = expected_vector(pooled, (64, 64, 0, 0, 64, 64)), expected_vector(pooled, (64, 96, 0, 16, 64, 64))
    kinds = [("square" if torch.allclose(row, square, atol=1e-4) else
              "wide" if torch.allclose(row, crop, atol=1e-4) else "other") for row in rows]
    assert len(kinds) == 3 * 2 and "other" not in kinds and "wide" in kinds and "square" in kinds, kinds
    a = load_file(str(concept_path))
    b = load_file(str(checkpoints.latest_checkpoint(job_b.checkpoints_dir).concept_path))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    start = load_file(str(sdxl_base))
    trained = [key for key in a if key in start and not torch.equal(a[key], start[key])]
    assert len(trained) > 100  # every kept UNet weight is trained, the calibrated constants stay


def test_a_model_family_that_is_not_the_checkpoints_is_refused_naming_both(tmp_path, sdxl_base, tiny_checkpoint,
                                                                           capsys):
    for base, asked, found in ((sdxl_base, "sd1", "an SDXL checkpoint (sdxl)"),
                               (tiny_checkpoint, "sdxl", "an SD 1.x checkpoint (sd1)")):
        config = tiny_config(tmp_path / asked, base, model_family=asked)
        with pytest.raises(ConfigError) as caught:
            config.validate()
        assert f"model_family={asked!r}" in str(caught.value) and found in str(caught.value)
        assert trainer_main(["-q", "train", *config_flags(config)]) == EXIT_USAGE
        error = capsys.readouterr().err
        assert f"--model-family={asked!r}" in error and f"--base-checkpoint={str(base)!r}" in error and found in error
        assert not (Path(config.job_dir) / "cache").exists()  # refused before the scan and the cache


def test_trainer_sample_refuses_a_prior_of_the_other_family(tmp_path, sdxl_base, tiny_checkpoint, capsys):
    from safetensors.torch import save_file

    from gcfg_core.concept_file import ConceptMetadata

    concept = tmp_path / "xl.safetensors"
    save_file({"x": torch.zeros(1)}, str(concept), metadata=ConceptMetadata(base_family="sdxl").to_header())
    args = ["sample", str(concept), "--prior", str(tiny_checkpoint), "--out", str(tmp_path / "g.png")]
    assert trainer_main(args) == EXIT_USAGE
    error = capsys.readouterr().err
    assert "trained on an SDXL base (sdxl), but the main model (--prior)" in error and "SD 1.x (sd1)" in error
    assert str(tiny_checkpoint) in error
