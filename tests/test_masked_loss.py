"""Masked loss: masks from a mask folder or the alpha channel, cached at latent resolution, weighting the loss;
images without a mask train on every pixel."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gcfg_core.configs import sd1_alphas_cumprod
from trainer import loop
from trainer.config import ConfigError, ResizePolicy, TrainConfig
from trainer.data import find_mask, load_mask, mask_files, masks_fingerprint, scan_dataset
from trainer.jobfolder import JobFolder, JobState
from trainer.latent_cache import CacheKey, build_latent_cache, open_latent_cache
from trainer.validation import masked_mse

sys.path.insert(0, str(Path(__file__).parent))
from test_latent_cache import FakeEncoder  # noqa: E402
from trainer_helpers import make_dataset, tiny_config  # noqa: E402


def _half_mask(size: tuple[int, int]) -> np.ndarray:
    """255 on the right half of a (width, height) image, 0 on the left."""
    width, height = size
    mask = np.zeros((height, width), np.uint8)
    mask[:, width // 2:] = 255
    return mask


def test_masked_mse_is_the_mean_over_the_masked_pixels():
    prediction, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    error = (prediction - target).square()
    ones = torch.ones(2, 1, 8, 8)
    torch.testing.assert_close(masked_mse(prediction, target, ones), error.mean(dim=(1, 2, 3)))
    torch.testing.assert_close(masked_mse(prediction, target, None), error.mean(dim=(1, 2, 3)))
    right = torch.zeros(2, 1, 8, 8)
    right[..., 4:] = 1
    torch.testing.assert_close(masked_mse(prediction, target, right), error[..., 4:].mean(dim=(1, 2, 3)))
    # what lies under a zero mask does not count at all
    changed = prediction.clone()
    changed[..., :4] += 100
    torch.testing.assert_close(masked_mse(changed, target, right), masked_mse(prediction, target, right))
    assert masked_mse(prediction, target, torch.zeros(2, 1, 8, 8)).eq(0).all()


def test_diffusion_loss_ignores_the_prediction_under_a_zero_mask():
    config = TrainConfig(dataset_dir="d", base_checkpoint="b", job_dir="j", name="n")
    right = torch.zeros(2, 1, 8, 8)
    right[..., 4:] = 1

    def model(offset: float):
        def forward(x, t, context=None):
            out = torch.zeros_like(x)
            out[..., :4] += offset  # only the masked-out half changes
            return out
        return forward

    ac = sd1_alphas_cumprod()
    latents = torch.randn(2, 4, 8, 8)
    losses = [loop.diffusion_loss(model(o), latents, torch.Generator().manual_seed(0), ac, config, right).item()
              for o in (0.0, 5.0)]
    assert losses[0] == losses[1]
    unmasked = [loop.diffusion_loss(model(o), latents, torch.Generator().manual_seed(0), ac, config).item()
                for o in (0.0, 5.0)]
    assert unmasked[0] != unmasked[1]


def test_masks_come_from_the_mask_folder_then_the_alpha_channel(tmp_path):
    data, masks = tmp_path / "data", tmp_path / "masks"
    (data / "sub").mkdir(parents=True)
    (masks / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 128, 3), dtype=np.uint8)).save(data / "sub" / "file.png")
    Image.fromarray(_half_mask((64, 32))).save(masks / "sub" / "file.jpg")  # half size, other extension
    rgba = rng.integers(0, 256, (64, 64, 4), dtype=np.uint8)
    rgba[..., 3] = _half_mask((64, 64))
    Image.fromarray(rgba, "RGBA").save(data / "alpha.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(data / "plain.png")

    assert find_mask(data / "sub" / "file.png", data, masks) == masks / "sub" / "file.jpg"
    assert find_mask(data / "plain.png", data, masks) is None
    # the mask file, mapped onto the whole 128×64 image, then squashed like the image to 64×64: right half ones
    from_file = load_mask(data / "sub" / "file.png", masks / "sub" / "file.jpg", (64, 64), "squash")
    assert from_file.shape == (1, 64, 64)
    assert from_file[..., :, :28].max() < 0.05 and from_file[..., :, 36:].min() > 0.95
    # centre-crop of the 128×64 image to a square keeps x in [32, 96): the mask's edge at 64 maps to 32
    cropped = load_mask(data / "sub" / "file.png", masks / "sub" / "file.jpg", (64, 64), "center-crop")
    assert cropped[..., :, :28].max() < 0.05 and cropped[..., :, 36:].min() > 0.95
    alpha = load_mask(data / "alpha.png", None, (32, 32), "squash")
    assert alpha[..., :14].max() < 0.05 and alpha[..., 18:].min() > 0.95
    assert torch.equal(load_mask(data / "plain.png", None, (32, 32), "squash"), torch.ones(1, 32, 32))

    scan = scan_dataset(data, min_image_size=0)
    config = TrainConfig(dataset_dir=str(data), base_checkpoint="b", job_dir="j", name="n", masked_loss=True,
                         mask_dir=str(masks))
    found = dict(zip((Path(r.path).name for r in scan.images), mask_files(scan, config), strict=True))
    assert found == {"alpha.png": None, "plain.png": None, "file.png": str(masks / "sub" / "file.jpg")}
    assert masks_fingerprint(mask_files(scan, config)) != masks_fingerprint((None,) * 3)


def test_mask_dir_needs_masked_loss():
    with pytest.raises(ConfigError, match="mask_dir='m' is set but masked_loss is off"):
        TrainConfig(dataset_dir="d", base_checkpoint="b", job_dir="j", name="n", mask_dir="m")


def test_the_cache_holds_each_mask_pooled_to_latent_resolution(tmp_path):
    data, masks = make_dataset(tmp_path / "data", count=3), tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(_half_mask((64, 64))).save(masks / "img01.png")
    scan = scan_dataset(data, min_image_size=0)
    config = TrainConfig(dataset_dir=str(data), base_checkpoint="b", job_dir="j", name="n", masked_loss=True,
                         mask_dir=str(masks))
    files = mask_files(scan, config)
    key = CacheKey(dataset_fingerprint=scan.fingerprint, vae_sha256="v", resolution=64,
                   resize_policy=ResizePolicy.CENTER_CROP, flip=True, masks=masks_fingerprint(files))
    cache = build_latent_cache(tmp_path / "cache", scan, key, FakeEncoder(), progress=False, masks=files)
    assert cache.masks([0, 1, 2]).shape == (3, 1, 8, 8)
    half = torch.zeros(1, 8, 8)
    half[..., 4:] = 1  # the mask's edge at x = 32 px is latent column 4
    torch.testing.assert_close(cache.masks([1])[0], half, atol=0.02, rtol=0)
    torch.testing.assert_close(cache.masks([4])[0], half.flip(-1), atol=0.02, rtol=0)  # entry 3 + 1: mirrored
    assert torch.equal(cache.masks([0, 2]), torch.ones(2, 1, 8, 8))  # no mask: every pixel counts
    # without masks the cache has none, and other masks are another key
    assert open_latent_cache(tmp_path / "cache", CacheKey(**{**key.to_dict(), "masks": ""})) is None


@pytest.mark.slow
def test_training_with_masks_that_cover_everything_equals_training_without(tmp_path, tiny_checkpoint):
    plain = tiny_config(tmp_path / "a", tiny_checkpoint, max_steps=2, checkpoint_every_steps=0)
    masked = tiny_config(tmp_path / "b", tiny_checkpoint, max_steps=2, checkpoint_every_steps=0, masked_loss=True)
    a = loop.train(plain, JobFolder(plain.job_dir), progress=False)
    b = loop.train(masked, JobFolder(masked.job_dir), progress=False)
    assert a.state == b.state == JobState.COMPLETED
    assert b.losses == pytest.approx(a.losses, rel=1e-5)

    # a half mask on every image: the run trains, and its losses differ
    masks = tmp_path / "c" / "masks"
    masks.mkdir(parents=True)
    for i in range(8):
        Image.fromarray(_half_mask((64, 64))).save(masks / f"img{i:02d}.png")
    half = tiny_config(tmp_path / "c", tiny_checkpoint, max_steps=2, checkpoint_every_steps=0, masked_loss=True,
                       mask_dir=str(masks))
    c = loop.train(half, JobFolder(half.job_dir), progress=False)
    assert c.state == JobState.COMPLETED and c.losses != pytest.approx(a.losses, rel=1e-3)
