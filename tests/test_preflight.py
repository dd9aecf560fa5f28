"""Preflight: the disk and memory formulas, and refusal messages with injected availability."""

from __future__ import annotations

import pytest

from trainer.config import TrainConfig
from trainer.preflight import (
    GB,
    SD15_UNET_PARAMS,
    PreflightError,
    estimate_disk_bytes,
    estimate_memory_bytes,
    largest_micro_batch,
    latent_shape_for,
    run_preflight,
)


def make(tmp_path, **kw) -> TrainConfig:
    return TrainConfig(dataset_dir="d", base_checkpoint="b", job_dir=str(tmp_path / "job"), name="j", **kw)


PLENTY = dict(available_disk_bytes=int(1e13), available_device_bytes=int(1e12), available_ram_bytes=int(1e12),
              reusable_disk_bytes=0)


def test_disk_formula(tmp_path):
    c = make(tmp_path, keep_last=3, preview_every_steps=0)
    est = estimate_disk_bytes(c, num_images=1000)
    assert latent_shape_for(512) == (8, 64, 64)
    assert est.cache_bytes == 1000 * 8 * 64 * 64 * 4
    assert est.checkpoint_bytes == SD15_UNET_PARAMS * (4 + 8)  # fp32 weights + AdamW m, v
    assert est.checkpoints_kept == 4 and est.preview_bytes == 0
    assert est.total_bytes == int(1.05 * (est.cache_bytes + 4 * est.checkpoint_bytes))
    flipped = estimate_disk_bytes(make(tmp_path, flip=True, ema_decay=0.999, optimizer="adamw8bit"), 1000)
    assert flipped.cache_bytes == 2 * est.cache_bytes
    assert flipped.checkpoint_bytes == SD15_UNET_PARAMS * (4 + 2 + 4)
    with_previews = estimate_disk_bytes(make(tmp_path, max_steps=1000, preview_every_steps=100,
                                             preview_prompts=("a",)), 1)
    assert with_previews.preview_bytes == int(11 * 2 * 4 * 512**2 * 1.5)


def test_memory_formula_matches_perf_anchors(tmp_path):
    c = make(tmp_path, preview_every_steps=0)
    est = estimate_memory_bytes(c, SD15_UNET_PARAMS, "cuda")
    assert est.static_bytes / GB == pytest.approx(13.75, abs=0.01)  # perf-anchors.md §5: 16 B/param
    with_ema = estimate_memory_bytes(c.with_overrides(ema_decay=0.9999), SD15_UNET_PARAMS, "cuda")
    assert with_ema.static_bytes / GB == pytest.approx(17.19, abs=0.01)
    eight_bit = estimate_memory_bytes(c.with_overrides(optimizer="adamw8bit"), SD15_UNET_PARAMS, "cuda")
    assert eight_bit.static_bytes / GB == pytest.approx(8.60, abs=0.01)
    no_ckpt = estimate_memory_bytes(c.with_overrides(gradient_checkpointing=False), SD15_UNET_PARAMS, "cuda")
    assert no_ckpt.activation_bytes == pytest.approx(est.activation_bytes / 0.35, rel=1e-6)
    half_res = estimate_memory_bytes(c.with_overrides(resolution=256), SD15_UNET_PARAMS, "cuda")
    assert half_res.activation_bytes == pytest.approx(est.activation_bytes / 4, rel=1e-6)
    assert estimate_memory_bytes(c, SD15_UNET_PARAMS, "cpu").overhead_bytes == 0
    assert est.peak_bytes == est.training_bytes  # previews off
    assert estimate_memory_bytes(make(tmp_path), SD15_UNET_PARAMS, "cuda").peak_bytes > est.training_bytes


def test_preflight_passes_with_room(tmp_path):
    report = run_preflight(make(tmp_path), num_images=100, device="cuda", **PLENTY)
    assert report.ok and "disk: needs" in report.summary()


def test_preflight_refuses_short_disk_with_numbers(tmp_path):
    c = make(tmp_path)
    need = estimate_disk_bytes(c, 70000).total_bytes
    with pytest.raises(PreflightError) as info:
        run_preflight(c, num_images=70000, device="cuda", **{**PLENTY, "available_disk_bytes": int(3e9)})
    message = str(info.value)
    assert f"needs {need / GB:.1f} GB free disk in " in message and "has 3.0 GB" in message
    # Space already taken by this job's cache and checkpoints counts as available.
    run_preflight(c, num_images=70000, device="cuda",
                  **{**PLENTY, "available_disk_bytes": int(3e9), "reusable_disk_bytes": need})


def test_preflight_suggests_a_micro_batch_that_fits(tmp_path):
    c = make(tmp_path, micro_batch_size=32, preview_every_steps=0)
    with pytest.raises(PreflightError, match=r"micro_batch_size=32, has 24.0 GB free; try micro_batch_size=(\d+)") \
            as info:
        run_preflight(c, num_images=10, device="cuda", **{**PLENTY, "available_device_bytes": int(24e9)})
    fits = largest_micro_batch(c, SD15_UNET_PARAMS, "cuda", int(24e9))
    assert f"try micro_batch_size={fits} " in str(info.value)
    assert estimate_memory_bytes(c.with_overrides(micro_batch_size=fits), SD15_UNET_PARAMS, "cuda").training_bytes \
        <= 24e9 < estimate_memory_bytes(c.with_overrides(micro_batch_size=fits * 2), SD15_UNET_PARAMS,
                                        "cuda").training_bytes
    run_preflight(c.with_overrides(micro_batch_size=fits), num_images=10, device="cuda",
                  **{**PLENTY, "available_device_bytes": int(24e9)})


def test_preflight_names_memory_savers_when_nothing_fits(tmp_path):
    with pytest.raises(PreflightError, match="even micro_batch_size=1 does not fit: use optimizer='adamw8bit'"):
        run_preflight(make(tmp_path, ema_decay=0.999), num_images=10, device="cuda",
                      **{**PLENTY, "available_device_bytes": int(8e9)})


def test_preview_peak_only_warns(tmp_path):
    c = make(tmp_path)
    est = estimate_memory_bytes(c, SD15_UNET_PARAMS, "cuda")
    room = (est.training_bytes + est.peak_bytes) // 2
    report = run_preflight(c, num_images=10, device="cuda", **{**PLENTY, "available_device_bytes": room})
    assert report.ok and "previews may not fit" in report.warnings[0]


def test_preflight_reports_process_split_and_missing_bitsandbytes(tmp_path):
    report = run_preflight(make(tmp_path, optimizer="adamw8bit"), num_images=10, device="cpu", num_processes=3,
                           raise_on_error=False, **PLENTY)
    assert any("× 3" in p for p in report.problems)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        assert any("bitsandbytes" in p for p in report.problems)


def test_preflight_measures_real_disk_when_not_injected(tmp_path):
    report = run_preflight(make(tmp_path, preview_every_steps=0), num_images=1, device="cpu", unet_param_count=1000,
                           available_device_bytes=int(1e12), available_ram_bytes=int(1e12))
    assert report.available_disk_bytes > 0 and report.reusable_disk_bytes == 0
    assert report.disk_path == str(tmp_path.resolve())  # the nearest existing folder of job_dir
