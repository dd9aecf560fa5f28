"""Preflight: the disk and memory formulas, and refusal messages with injected availability."""

from __future__ import annotations

import pytest

from trainer.config import ConfigError, TrainConfig
from trainer.preflight import (
    GB,
    SD15_UNET_PARAMS,
    PreflightError,
    check_mixed_precision,
    estimate_disk_bytes,
    estimate_memory_bytes,
    largest_micro_batch,
    latent_shape_for,
    nulltext_unet_param_count,
    preflight_job,
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
    # only the checkpoint being written and the previous one hold optimizer state; two older ones the concept only
    assert est.total_bytes == int(1.05 * (est.cache_bytes + 2 * est.checkpoint_bytes + 2 * 4 * SD15_UNET_PARAMS))
    assert est.total_bytes / GB < 30  # keep_last 3 of a full-size SD 1.5 job: 41 GB while every one kept it all
    flipped = estimate_disk_bytes(make(tmp_path, flip=True, ema_decay=0.999, optimizer="adamw8bit"), 1000)
    assert flipped.cache_bytes == 2 * est.cache_bytes
    masked = estimate_disk_bytes(make(tmp_path, flip=True, masked_loss=True), 1000)
    assert masked.cache_bytes == 2 * est.cache_bytes + 1000 * 64 * 64 * 4  # + one fp32 mask channel per image
    # 8-bit AdamW: codes + 2 fp32 maxima per 256 values; EMA: the concept file holds the averaged weights, the
    # train state the EMA shadow and the training weights
    assert flipped.checkpoint_bytes == int(SD15_UNET_PARAMS * (4 + 2 + 8 / 256 + 4 + 4))
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
    # perf-anchors.md's 8.60 GB with the block maxima added: 2 fp32 per 256 values
    assert eight_bit.static_bytes == int(SD15_UNET_PARAMS * (4 + 4 + 2 + 8 / 256))
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


# The paper's setting with nothing left to "auto": what the micro-batch suggestions and savings hints are about.
MANUAL = dict(optimizer="adamw", weight_dtype="fp32", fused_backward="off", ema_device="device")


def test_preflight_suggests_a_micro_batch_that_fits(tmp_path):
    c = make(tmp_path, micro_batch_size=32, preview_every_steps=0, **MANUAL)
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
    with pytest.raises(PreflightError, match="even micro_batch_size=1 does not fit: use optimizer='adamw8bit' or "
                                             "'adafactor', weight_dtype='bf16' .*, fused_backward='on' .*, "
                                             "ema_device='cpu'"):
        run_preflight(make(tmp_path, ema_decay=0.999, **MANUAL), num_images=10, device="cuda",
                      **{**PLENTY, "available_device_bytes": int(8e9)})


def test_preview_peak_only_warns(tmp_path):
    c = make(tmp_path)
    est = estimate_memory_bytes(c, SD15_UNET_PARAMS, "cuda")
    room = (est.training_bytes + est.peak_bytes) // 2
    report = run_preflight(c, num_images=10, device="cuda", **{**PLENTY, "available_device_bytes": room})
    assert report.ok and "previews may not fit" in report.warnings[0]


def test_preflight_reports_process_split_and_needs_no_bitsandbytes(tmp_path):
    report = run_preflight(make(tmp_path, optimizer="adamw8bit"), num_images=10, device="cpu", num_processes=3,
                           raise_on_error=False, **PLENTY)
    assert any("× 3" in p for p in report.problems)
    assert not any("bitsandbytes" in p for p in report.problems)  # 8-bit AdamW is plain torch (trainer.optim)


def test_preflight_measures_real_disk_when_not_injected(tmp_path):
    report = run_preflight(make(tmp_path, preview_every_steps=0), num_images=1, device="cpu", unet_param_count=1000,
                           available_device_bytes=int(1e12), available_ram_bytes=int(1e12))
    assert report.available_disk_bytes > 0 and report.reusable_disk_bytes == 0
    assert report.disk_path == str(tmp_path.resolve())  # the nearest existing folder of job_dir


def test_nulltext_param_count_from_the_header_equals_the_converted_unet(tiny_model, tiny_checkpoint):
    import copy

    import torch

    from gcfg_core.nulltext import convert_to_nulltext, transformer_block_names

    unet = copy.deepcopy(tiny_model.unet)
    vectors = {name: torch.zeros(unet.get_submodule(name).norm1.normalized_shape[0])
               for name in transformer_block_names(unet)}
    expected = sum(p.numel() for p in convert_to_nulltext(unet, vectors).parameters())
    assert nulltext_unet_param_count(tiny_checkpoint) == expected
    assert expected < sum(p.numel() for p in tiny_model.unet.parameters())  # cross-attention weights are gone


def test_preflight_job_uses_the_header_count_and_resolution(tmp_path, tiny_checkpoint, monkeypatch):
    from trainer import preflight

    monkeypatch.setattr(preflight, "free_disk_bytes", lambda _path: int(1e13))
    config = make(tmp_path, resolution=128, preview_every_steps=0, mixed_precision="no").with_overrides(
        base_checkpoint=str(tiny_checkpoint))
    report = preflight_job(config, num_images=10, device="cpu")
    params = nulltext_unet_param_count(tiny_checkpoint)
    assert report.ok and report.memory.static_bytes == params * 16
    assert report.disk.cache_bytes == 10 * 8 * 16 * 16 * 4  # (2 · 4 channels) × (128 / 8)² × fp32
    monkeypatch.setattr(preflight, "free_disk_bytes", lambda _path: 10)
    with pytest.raises(PreflightError, match="free disk"):
        preflight_job(config, num_images=10, device="cpu")


def test_fp16_needs_a_gpu(tmp_path):
    fp16 = make(tmp_path, mixed_precision="fp16", device="cpu")
    with pytest.raises(ConfigError, match=r"^mixed_precision='fp16' needs a GPU, but device='cpu' resolves to the CPU; "
                                          r"use mixed_precision='bf16' .* or 'no'$"):
        check_mixed_precision(fp16)
    check_mixed_precision(fp16, "cuda")  # the device it runs on decides
    for ok in ("bf16", "no"):
        check_mixed_precision(make(tmp_path, mixed_precision=ok, device="cpu"))
    with pytest.raises(ConfigError, match="fp16"):
        preflight_job(fp16, num_images=1)  # before anything is read
