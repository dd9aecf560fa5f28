"""Aspect-ratio buckets: the bucket list, assignment, crops and SDXL geometry, single-bucket batches in a seeded
order, the per-bucket latent cache, and a bucketed training run that resumes exactly."""

from __future__ import annotations

import math
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import trainer.latent_cache as lc
from trainer import buckets, checkpoints, loop
from trainer.buckets import Bucket, BucketBatches
from trainer.config import ResizePolicy, TrainConfig
from trainer.data import load_image, scan_dataset
from trainer.jobfolder import JobFolder, JobState
from trainer.latent_cache import CacheKey, build_latent_cache

sys.path.insert(0, str(Path(__file__).parent))
from test_latent_cache import FakeEncoder  # noqa: E402
from trainer_helpers import tiny_config  # noqa: E402


def _brute_force_buckets(resolution: int, max_aspect: float) -> list[tuple[int, int]]:
    """Every 64-multiple (w, h) with w·h ≤ resolution², no taller 64-multiple fitting, aspect ≤ max_aspect."""
    area, found = resolution**2, []
    for w in range(64, 4096 + 1, 64):
        for h in range(64, 4096 + 1, 64):
            tallest = w * h <= area < w * (h + 64)
            if tallest and max(w, h) / min(w, h) <= max_aspect:
                found.append((w, h))
    return found


@pytest.mark.parametrize(("resolution", "max_aspect"), [(512, 2.0), (768, 1.5), (1024, 2.5), (128, 3.0)])
def test_bucket_sizes_are_the_64px_sizes_of_about_resolution_squared_pixels(resolution, max_aspect):
    sizes = buckets.bucket_sizes(resolution, max_aspect)
    assert [(b.width, b.height) for b in sizes] == _brute_force_buckets(resolution, max_aspect)
    assert Bucket(resolution, resolution) in sizes
    assert all(b.width * b.height <= resolution**2 for b in sizes)


def test_the_512_buckets_by_name():
    assert [b.name for b in buckets.bucket_sizes(512, 2.0)] == ["384x640", "448x576", "512x512", "576x448",
                                                                "640x384"]
    assert [b.name for b in buckets.bucket_sizes(512, 1.0)] == ["512x512"]


def test_nearest_bucket_by_log_aspect_ratio():
    sizes = buckets.bucket_sizes(512, 2.0)
    assert buckets.nearest_bucket(1000, 600, sizes) == Bucket(640, 384)  # 5:3 exactly
    assert buckets.nearest_bucket(600, 1000, sizes) == Bucket(384, 640)
    assert buckets.nearest_bucket(333, 333, sizes) == Bucket(512, 512)
    assert buckets.nearest_bucket(4000, 500, sizes) == Bucket(640, 384)  # beyond the range: the widest
    # 1.14:1 lies between 1 (log distance .131) and 576/448 = 1.29 (.120): the nearer on a log scale
    assert buckets.nearest_bucket(1140, 1000, sizes) == Bucket(576, 448)
    assert buckets.nearest_bucket(1090, 1000, sizes) == Bucket(512, 512)
    off = buckets.assign_buckets([(1000, 600), (600, 1000)], 512, enabled=False, max_aspect=2.0)
    assert off == (Bucket(512, 512), Bucket(512, 512))


def test_image_geometry_crops_to_the_bucket_aspect_and_gives_sdxl_conditioning():
    # 1200×600 (2:1) into 640×384 (5:3): crop width 600·5/3 = 1000 from x = 100; scale 640/1000 = 0.64
    geometry = buckets.image_geometry(1200, 600, Bucket(640, 384), "center-crop")
    assert geometry.box == (100.0, 0.0, 1100.0, 600.0)
    assert geometry.original_size == (600, 1200) and geometry.target_size == (384, 640)
    assert geometry.crop_top_left == (0, 64)  # 100 px · 0.64
    # mirrored: the image is 1200 · 0.64 = 768 px wide scaled, so the crop's left is 768 − 640 − 64 = 64
    assert geometry.flipped().crop_top_left == (0, 64) and geometry.flipped().box == (100.0, 0.0, 1100.0, 600.0)
    tall = buckets.image_geometry(600, 1300, Bucket(384, 640), "center-crop")  # crop height 600·5/3 = 1000
    assert tall.box == (0.0, 150.0, 600.0, 1150.0) and tall.crop_top_left == (round(150 * 0.64), 0)
    squash = buckets.image_geometry(1200, 600, Bucket(640, 384), "squash")
    assert squash.box == (0.0, 0.0, 1200.0, 600.0) and squash.crop_top_left == (0, 0)
    with pytest.raises(ValueError, match="'stretch'"):
        buckets.image_geometry(10, 10, Bucket(64, 64), "stretch")


def test_dataset_geometry_follows_the_config():
    config = TrainConfig(dataset_dir="d", base_checkpoint="b", job_dir="j", name="n", resolution=512)
    sizes = [(1200, 600), (512, 512)]
    first, second = buckets.dataset_geometry(sizes, config)
    assert first.target_size == (384, 640) and first.crop_top_left == (0, 64)
    assert second.target_size == (512, 512) and second.crop_top_left == (0, 0)
    squashed = buckets.dataset_geometry(sizes, config.with_overrides(resize_policy="squash"))
    assert squashed[0].crop_top_left == (0, 0)
    square = buckets.dataset_geometry(sizes, config.with_overrides(aspect_buckets=False))
    assert square[0].target_size == (512, 512) and square[0].crop_top_left == (0, round(300 * 512 / 600))


def test_histogram_and_dominant_bucket():
    assignment = [Bucket(640, 384)] * 3 + [Bucket(512, 512)] * 3 + [Bucket(384, 640)]
    assert buckets.bucket_histogram(assignment) == {"512x512": 3, "640x384": 3, "384x640": 1}
    assert buckets.dominant_bucket(assignment) == Bucket(512, 512)  # a tie goes to the squarer one
    assert buckets.dominant_bucket(assignment + [Bucket(640, 384)]) == Bucket(640, 384)


GROUPS = ((0, 1, 2, 3, 4), (5, 6, 7), (8,))  # entries of three buckets


def test_bucket_batches_never_mix_buckets_and_show_every_entry_each_epoch():
    stream = BucketBatches(GROUPS, batch_size=2, seed=7)
    per_epoch = math.ceil(5 / 2) + math.ceil(3 / 2) + math.ceil(1 / 2)
    assert stream.batches_per_epoch == per_epoch == 6
    group_of = {e: g for g, members in enumerate(GROUPS) for e in members}
    epochs = [[stream.batch(step) for step in range(e * per_epoch, (e + 1) * per_epoch)] for e in range(3)]
    for epoch in epochs:
        for batch in epoch:
            assert len(batch) == 2 and len({group_of[e] for e in batch}) == 1
        seen = Counter(e for batch in epoch for e in batch)
        assert set(seen) == set(group_of)  # every entry, including the lone one of the third bucket
        # filling a bucket's last batch repeats one entry of a bucket with an odd count
        assert sum(seen.values()) - len(group_of) == 1 + 1 + 1
    assert epochs[0] != epochs[1]  # a new order each epoch
    # a pure function of (seed, step): a fresh stream (a resumed run) gives the same batches
    assert [BucketBatches(GROUPS, 2, 7).batch(s) for s in (13, 2, 7)] == [epochs[2][1], epochs[0][2], epochs[1][1]]
    assert [BucketBatches(GROUPS, 2, 8).batch(s) for s in range(6)] != epochs[0]


def test_one_bucket_is_the_plain_stream():
    entries = tuple(range(10))
    stream = BucketBatches((entries,), batch_size=4, seed=3)
    assert [stream.batch(s) for s in range(5)] == [loop.global_batch(10, 3, 4 * s, 4) for s in range(5)]


def test_entry_groups():
    sizes = [(64, 192), (128, 128), (64, 192), (128, 128), (192, 64)]
    assert buckets.entry_groups(sizes, [4, 0, 1, 2, 3]) == ((0, 2), (1, 3), (4,))


def _mixed_images(folder: Path, wide: int, square: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(wide):
        Image.fromarray(rng.integers(0, 256, (50, 150, 3), dtype=np.uint8)).save(folder / f"wide{i}.png")
    for i in range(square):
        Image.fromarray(rng.integers(0, 256, (100, 100, 3), dtype=np.uint8)).save(folder / f"square{i}.png")
    return folder


def test_latent_cache_holds_each_image_at_its_bucket_size(tmp_path, monkeypatch):
    monkeypatch.setattr(lc, "SHARD_SIZE", 2)
    scan = scan_dataset(_mixed_images(tmp_path / "data", wide=3, square=2), min_image_size=0)
    config = TrainConfig(dataset_dir="d", base_checkpoint="b", job_dir="j", name="n", resolution=128,
                         bucket_max_aspect=3.0)
    assigned = buckets.dataset_buckets([(r.width, r.height) for r in scan.images], config)
    names = [Path(r.path).name for r in scan.images]
    assert [b.name for b in assigned] == ["128x128", "128x128", "192x64", "192x64", "192x64"]
    assert names[:2] == ["square0.png", "square1.png"]
    key = CacheKey(dataset_fingerprint=scan.fingerprint, vae_sha256="v", resolution=128,
                   resize_policy=ResizePolicy.CENTER_CROP, flip=True, buckets="max-aspect 3")
    sizes = [(b.width, b.height) for b in assigned]
    cache = build_latent_cache(tmp_path / "cache", scan, key, FakeEncoder(), batch_size=2, progress=False, sizes=sizes)
    # shards hold one size each: 128² images (2), then 192×64 ones (2 + 1)
    assert lc.shard_layout(sizes, 2) == [[0, 1], [2, 3], [4]]
    assert len(list((tmp_path / "cache").glob("shard-*.safetensors"))) == 3
    for entry in range(len(cache)):
        image, flipped = cache.entry(entry)
        pixels = load_image(scan.images[image], sizes[image], ResizePolicy.CENTER_CROP)[None]
        expected = FakeEncoder()(torch.flip(pixels, dims=[-1]) if flipped else pixels)
        torch.testing.assert_close(cache.moments([entry]), expected)
        assert cache.entry_size(entry) == sizes[image]
    assert cache.moments([2, 3, 4]).shape == (3, 8, 8, 24)
    with pytest.raises(ValueError, match="different sizes .*a batch takes one bucket"):
        cache.moments([0, 2])
    # reopening finds the same layout; other bucket settings are another key
    assert lc.open_latent_cache(tmp_path / "cache", key).image_sizes == tuple(sizes)
    assert lc.open_latent_cache(tmp_path / "cache", CacheKey(**{**key.to_dict(), "buckets": ""})) is None


def _bucketed(tmp_path: Path, base: Path, **overrides) -> TrainConfig:
    data = _mixed_images(tmp_path / "mixed", wide=5, square=3)
    return tiny_config(tmp_path, base, dataset_dir=str(data), resolution=128, bucket_max_aspect=3.0,
                       **overrides)


@pytest.mark.slow
def test_bucketed_training_resumes_exactly_and_reports_the_histogram(tmp_path, tiny_checkpoint):
    features = dict(max_steps=4, checkpoint_every_steps=0, learning_rate=1e-3, flip=True, preview_every_steps=4,
                    preview_steps=1, preview_seeds=(0,))
    whole = _bucketed(tmp_path / "a", tiny_checkpoint, **features)
    uninterrupted = loop.train(whole, JobFolder(whole.job_dir), progress=False)
    assert uninterrupted.state == JobState.COMPLETED

    job_a = JobFolder(whole.job_dir)
    histogram = next(e for e in job_a.read_events() if e.get("type") == "buckets")["histogram"]
    assert histogram == {"192x64": 5, "128x128": 3}
    assert Image.open(job_a.previews_dir / "step-000004.png").size == (192, 64)  # the dominant bucket

    split = _bucketed(tmp_path / "b", tiny_checkpoint, **features)
    job = JobFolder(split.job_dir)
    stop = loop.StopFlag()

    def stop_at_2(step: int, _loss: float) -> None:
        if step == 2:
            stop.request("test")

    first = loop.train(split, job, stop=stop, on_step=stop_at_2, progress=False)
    assert first.step == 2
    second = loop.train(split, job, resume=True, progress=False)
    assert {**first.losses, **second.losses} == uninterrupted.losses  # bit-identical
    final_a = load_file(str(checkpoints.latest_checkpoint(job_a.checkpoints_dir).concept_path))
    final_b = load_file(str(checkpoints.latest_checkpoint(job.checkpoints_dir).concept_path))
    assert final_a.keys() == final_b.keys() and all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_an_older_jobs_preparation_still_counts_for_a_run_without_buckets(tmp_path, monkeypatch):
    import json

    from trainer.config import ABSENT_IN_OLDER_FILES

    job = JobFolder(tmp_path / "job").create()
    config = TrainConfig(dataset_dir="d", base_checkpoint="b", job_dir=str(job.path), name="n")
    older_config = config.with_overrides(**ABSENT_IN_OLDER_FILES)  # what an older config.json reads as
    inputs = {k: v for k, v in loop.prepare_inputs(older_config).items() if k not in loop.PREPARE_INPUTS_BEFORE}
    key = CacheKey(dataset_fingerprint="f", vae_sha256="v", resolution=512, resize_policy="center-crop", flip=False)
    prepared = loop.Prepared(key, 10, 0, "base", "sha", "sd1", inputs)
    (job.path / loop.PREPARED_FILE).write_text(json.dumps(prepared.to_dict()))
    (job.path / loop.NULLTEXT_FILE).write_bytes(b"x")
    monkeypatch.setattr(loop, "open_latent_cache", lambda *_: object())
    assert loop.read_prepared(job, older_config) == prepared  # no re-scan, no re-cache on resume
    assert loop.read_prepared(job, config) is None  # with buckets on it is another preparation
