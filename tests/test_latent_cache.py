"""Latent cache: contents, reuse, invalidation, resume after interruption, sampling."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

import trainer.latent_cache as lc
from gcfg_core.configs import SCALE_FACTOR
from trainer.config import ResizePolicy
from trainer.data import load_image, scan_dataset
from trainer.latent_cache import (
    CacheInterrupted,
    CacheKey,
    build_latent_cache,
    open_latent_cache,
    state_dict_fingerprint,
    vae_moments_fn,
)


class FakeEncoder:
    """Deterministic stand-in for the VAE: mean = 8× average pool (3 ch + their mean), logvar = -4; counts images."""

    def __init__(self) -> None:
        self.images_seen = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.images_seen += len(images)
        pooled = torch.nn.functional.avg_pool2d(images, 8)
        mean = torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)
        return torch.cat([mean, torch.full_like(mean, -4.0)], dim=1)


def _make_images(folder, n: int, size: int = 64) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = rng.integers(0, 256, (size, size + 16 * (i % 2), 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img{i:02d}.png")


@pytest.fixture()
def dataset(tmp_path, monkeypatch):
    monkeypatch.setattr(lc, "SHARD_SIZE", 2)  # several shards from a handful of images
    _make_images(tmp_path / "data", 5)
    return scan_dataset(tmp_path / "data", min_image_size=32)


def _key(scan, **kw) -> CacheKey:
    args = dict(dataset_fingerprint=scan.fingerprint, vae_sha256="v1", resolution=64,
                resize_policy=ResizePolicy.CENTER_CROP, flip=False)
    args.update(kw)
    return CacheKey(**args)


def test_cache_holds_the_encoder_output_of_every_image_and_its_mirror(dataset, tmp_path):
    enc = FakeEncoder()
    cache = build_latent_cache(tmp_path / "cache", dataset, _key(dataset, flip=True), enc, batch_size=2,
                               progress=False)
    assert len(cache) == 10 and cache.num_images == 5 and cache.latent_shape == (8, 8, 8)
    assert enc.images_seen == 10
    for i, record in enumerate(dataset.images):
        pixels = load_image(record, 64, ResizePolicy.CENTER_CROP)[None]
        assert torch.allclose(cache.moments([i]), FakeEncoder()(pixels), atol=1e-6)
        assert torch.allclose(cache.moments([5 + i]), FakeEncoder()(torch.flip(pixels, dims=[-1])), atol=1e-6)
    assert cache.entry(7) == (2, True)
    with pytest.raises(IndexError, match="10 out of range"):
        cache.moments([10])
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        "manifest.json", "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]


def test_cache_is_reused_for_the_same_key(dataset, tmp_path):
    key = _key(dataset)
    first = build_latent_cache(tmp_path / "cache", dataset, key, FakeEncoder(), progress=False)
    enc = FakeEncoder()
    calls = []
    again = build_latent_cache(tmp_path / "cache", dataset, key, enc, progress=False,
                               progress_callback=lambda d, t: calls.append((d, t)))
    assert enc.images_seen == 0
    assert torch.equal(again.moments(range(5)), first.moments(range(5)))
    assert open_latent_cache(tmp_path / "cache", key) is not None
    assert open_latent_cache(tmp_path / "cache", _key(dataset, resolution=128)) is None


@pytest.mark.parametrize("change", [dict(resolution=128), dict(flip=True), dict(vae_sha256="v2"),
                                    dict(resize_policy=ResizePolicy.SQUASH), dict(storage_dtype="float16")])
def test_a_changed_key_rebuilds_and_says_why(dataset, tmp_path, caplog, change):
    build_latent_cache(tmp_path / "cache", dataset, _key(dataset), FakeEncoder(), progress=False)
    (tmp_path / "cache" / "unrelated.txt").write_text("kept")
    enc = FakeEncoder()
    with caplog.at_level(logging.INFO, logger="gcfg.trainer.latent_cache"):
        cache = build_latent_cache(tmp_path / "cache", dataset, _key(dataset, **change), enc, progress=False)
    field = next(iter(change))
    assert f"stale ({field}:" in caplog.text
    assert enc.images_seen == len(cache) == 5 * (2 if change.get("flip") else 1)
    assert cache.key == _key(dataset, **change)
    assert (tmp_path / "cache" / "unrelated.txt").exists()  # only cache files are deleted


def test_a_changed_dataset_rebuilds(dataset, tmp_path):
    build_latent_cache(tmp_path / "cache", dataset, _key(dataset), FakeEncoder(), progress=False)
    _make_images(tmp_path / "data", 6)
    new_scan = scan_dataset(tmp_path / "data", min_image_size=32)
    assert new_scan.fingerprint != dataset.fingerprint
    assert open_latent_cache(tmp_path / "cache", _key(new_scan)) is None
    enc = FakeEncoder()
    cache = build_latent_cache(tmp_path / "cache", new_scan, _key(new_scan), enc, progress=False)
    assert enc.images_seen == len(cache) == 6
    with pytest.raises(ValueError, match="does not match the scan's fingerprint"):
        build_latent_cache(tmp_path / "cache", dataset, _key(new_scan), enc, progress=False)


def test_interrupted_build_resumes_from_finished_shards(dataset, tmp_path):
    key = _key(dataset)
    enc = FakeEncoder()
    batches = []

    def stop_after_three_batches() -> bool:
        batches.append(1)
        return len(batches) > 3

    with pytest.raises(CacheInterrupted):
        build_latent_cache(tmp_path / "cache", dataset, key, enc, batch_size=1, progress=False,
                           should_stop=stop_after_three_batches)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["finished_shards"] == [0] and manifest["complete"] is False
    assert open_latent_cache(tmp_path / "cache", key) is None
    assert not list((tmp_path / "cache").glob(".*.tmp"))

    resumed = FakeEncoder()
    progress = []
    cache = build_latent_cache(tmp_path / "cache", dataset, key, resumed, batch_size=1, progress=False,
                               progress_callback=lambda d, t: progress.append((d, t)))
    assert resumed.images_seen == 3  # images 2..4; shard 0 (images 0, 1) was kept
    assert progress[0] == (2, 5) and progress[-1] == (5, 5)
    fresh = build_latent_cache(tmp_path / "other", dataset, key, FakeEncoder(), progress=False)
    assert torch.equal(cache.moments(range(5)), fresh.moments(range(5)))


def test_sample_latents_formula_and_determinism(dataset, tmp_path):
    cache = build_latent_cache(tmp_path / "cache", dataset, _key(dataset), FakeEncoder(), progress=False)
    idx = [3, 0, 3]
    a = cache.sample_latents(idx, torch.Generator().manual_seed(7))
    b = cache.sample_latents(idx, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    mean, logvar = cache.moments(idx).chunk(2, dim=1)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(a, (mean + torch.exp(0.5 * logvar) * noise) * SCALE_FACTOR, atol=1e-7)
    assert not torch.equal(a[0], a[2])  # same image, fresh noise


def test_float16_storage_halves_the_shards(dataset, tmp_path):
    c32 = build_latent_cache(tmp_path / "c32", dataset, _key(dataset), FakeEncoder(), progress=False)
    c16 = build_latent_cache(tmp_path / "c16", dataset, _key(dataset, storage_dtype="float16"), FakeEncoder(),
                             progress=False)
    size = lambda d: sum(p.stat().st_size for p in d.glob("shard-*"))  # noqa: E731
    assert size(tmp_path / "c16") < 0.6 * size(tmp_path / "c32")
    assert c16.moments([1]).dtype == torch.float32
    assert torch.allclose(c16.moments(range(5)), c32.moments(range(5)), rtol=1e-3, atol=1e-3)


def test_cache_key_rejects_unknown_storage_dtype(dataset):
    with pytest.raises(ValueError, match="storage_dtype='int8'"):
        _key(dataset, storage_dtype="int8")


def test_state_dict_fingerprint(tiny_model):
    vae = tiny_model.vae
    fp = state_dict_fingerprint(vae)
    assert fp == state_dict_fingerprint(dict(vae.state_dict()))
    changed = {k: v.clone() for k, v in vae.state_dict().items()}
    name = next(iter(changed))
    changed[name].view(-1)[0] += 1e-3
    assert state_dict_fingerprint(changed) != fp
    assert state_dict_fingerprint({k: v.half() for k, v in vae.state_dict().items()}) != fp


def test_real_tiny_vae_moments(tiny_model, dataset, tmp_path):
    encode = vae_moments_fn(tiny_model.vae)
    key = _key(dataset, vae_sha256=state_dict_fingerprint(tiny_model.vae))
    cache = build_latent_cache(tmp_path / "cache", dataset, key, encode, batch_size=4, progress=False)
    pixels = load_image(dataset.images[4], 64, ResizePolicy.CENTER_CROP)[None]
    with torch.no_grad():
        expected = tiny_model.vae.encode(pixels).parameters
    assert cache.moments([4]).shape == (1, 8, 8, 8)
    assert torch.allclose(cache.moments([4]), expected, atol=1e-5)
