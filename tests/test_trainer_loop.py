"""Training loop: schedule, data order, loss math, gradient checkpointing, EMA, a full tiny run, NaN stop."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gcfg_core.concept_file import load_concept_model
from gcfg_core.configs import sd1_alphas_cumprod
from gcfg_core.nulltext import calibrate_nulltext, convert_to_nulltext, is_nulltext
from gcfg_core.params import GCFGSettings
from gcfg_core.pipeline import GenerationRequest, generate
from trainer import checkpoints, loop
from trainer.config import TrainConfig
from trainer.jobfolder import JobFolder, JobState

sys.path.insert(0, str(Path(__file__).parent))
from trainer_helpers import tiny_config  # noqa: E402

# --- pure helpers


def test_lr_at_warmup_then_schedules():
    base = dict(dataset_dir="d", base_checkpoint="b", job_dir="j", name="n", learning_rate=1e-4, max_steps=110,
                warmup_steps=10)
    constant = TrainConfig(**base, lr_schedule="constant")
    cosine = TrainConfig(**base, lr_schedule="cosine")
    linear = TrainConfig(**base, lr_schedule="linear")
    assert loop.lr_at(0, constant) == pytest.approx(1e-4 / 11)
    assert loop.lr_at(9, constant) == pytest.approx(1e-4 * 10 / 11)
    assert loop.lr_at(10, constant) == loop.lr_at(109, constant) == 1e-4
    assert loop.lr_at(10, cosine) == pytest.approx(1e-4)
    assert loop.lr_at(60, cosine) == pytest.approx(0.5e-4)  # half-way through the decay
    assert loop.lr_at(60, linear) == pytest.approx(0.5e-4)
    assert loop.lr_at(110, cosine) == pytest.approx(0.0, abs=1e-12)
    assert loop.lr_at(110, linear) == pytest.approx(0.0, abs=1e-12)


def test_data_order_covers_each_epoch_once_and_is_seeded():
    stream = loop.global_batch(10, seed=3, position=0, count=30)
    for epoch in range(3):
        assert sorted(stream[epoch * 10:(epoch + 1) * 10]) == list(range(10))
    assert stream[:10] != stream[10:20]  # a new permutation per epoch
    # any window of the stream equals the same slice of the whole stream (what resume relies on)
    assert loop.global_batch(10, seed=3, position=7, count=8) == stream[7:15]
    assert loop.global_batch(10, seed=4, position=0, count=10) != stream[:10]


def test_rank_micro_batches_partition_the_global_batch():
    indices = list(range(100, 124))  # 24 = accumulation 3 × processes 2 × micro 4
    shards = [loop.rank_micro_batches(indices, 3, 2, rank) for rank in range(2)]
    assert all(len(mb) == 4 for shard in shards for mb in shard)
    assert sorted(i for shard in shards for mb in shard for i in mb) == indices


def test_noisy_latents_and_min_snr_weights_match_their_formulas():
    ac = sd1_alphas_cumprod()
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    out = loop.noisy_latents(latents, noise, t, ac)
    for i in range(3):
        a = ac[t[i]]
        torch.testing.assert_close(out[i], a.sqrt() * latents[i] + (1 - a).sqrt() * noise[i])
    snr = ac[t] / (1 - ac[t])
    weights = loop.loss_weights_min_snr(t, ac, 5.0)
    torch.testing.assert_close(weights, torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert weights[0] < 1 and weights[2] == 1  # high SNR (small t) is down-weighted, low SNR untouched


def test_micro_batch_generator_is_a_pure_function_of_seed_step_slot():
    draw = lambda *key: torch.randn(4, generator=loop.micro_batch_generator(*key))
    assert torch.equal(draw(0, 5, 0), draw(0, 5, 0))
    assert not torch.equal(draw(0, 5, 0), draw(0, 5, 1))
    assert not torch.equal(draw(0, 5, 0), draw(0, 6, 0))


# --- model pieces


@pytest.fixture()
def nulltext_unet(tiny_model):
    import copy

    unet = copy.deepcopy(tiny_model.unet)
    vectors = calibrate_nulltext(unet, torch.randn(2, 4, 8, 8), tiny_model.encode_prompts([""]), seed=0)
    return convert_to_nulltext(unet, vectors).train()


def _grads(unet, autocast: bool) -> dict[str, torch.Tensor]:
    unet.zero_grad(set_to_none=True)
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([10, 700])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = unet(x, t, context=None)
    out.float().square().mean().backward()
    return {n: p.grad.clone() for n, p in unet.named_parameters()}


def test_gradient_checkpointing_gives_identical_grads_and_survives_cpu_autocast(nulltext_unet):
    from ldm.modules.attention import BasicTransformerBlock
    from ldm.modules.diffusionmodules.openaimodel import ResBlock

    reference = _grads(nulltext_unet, autocast=False)
    blocks = sum(isinstance(m, ResBlock | BasicTransformerBlock) for m in nulltext_unet.modules())
    assert loop.enable_gradient_checkpointing(nulltext_unet) == blocks > 0
    checkpointed = _grads(nulltext_unet, autocast=False)
    assert reference.keys() == checkpointed.keys()
    for name in reference:
        torch.testing.assert_close(checkpointed[name], reference[name], rtol=0, atol=1e-6)
    # ldm's own checkpoint fails here ("BFloat16 != float"); the non-reentrant one does not
    bf16 = _grads(nulltext_unet, autocast=True)
    assert all(torch.isfinite(g).all() for g in bf16.values())


def test_ema_update_and_swap(nulltext_unet):
    ema = loop.EMA(nulltext_unet, decay=0.9)
    name, param = next(iter(nulltext_unet.named_parameters()))
    before = param.detach().clone()
    with torch.no_grad():
        param.add_(1.0)
    ema.update(nulltext_unet)
    torch.testing.assert_close(ema.shadow[name], 0.9 * before + 0.1 * (before + 1.0))
    with ema.swapped_into(nulltext_unet):
        assert torch.equal(param, ema.shadow[name])
    assert torch.equal(param, before + 1.0)


def test_adamw8bit_without_bitsandbytes_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails even where it is installed
    config = TrainConfig(dataset_dir="d", base_checkpoint="b", job_dir="j", name="n", optimizer="adamw8bit")
    with pytest.raises(loop.TrainingError, match="bitsandbytes"):
        loop.build_optimizer([torch.nn.Parameter(torch.zeros(2))], config, torch.device("cpu"))


class Torch21AdamW(torch.optim.AdamW):
    """AdamW as torch 2.1.2 (the WebUI 1.10.1 venv) builds it: `fused=True` only for CUDA parameters, else a
    RuntimeError from the constructor, with torch 2.1's own message."""

    def __init__(self, params, *args, fused=None, **kwargs):
        params = list(params)
        if fused and not all(p.device.type == "cuda" for p in params):
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported "
                               "devices: ['cuda', 'privateuseone'].")
        super().__init__(params, *args, fused=fused, **kwargs)


class NoFusedKeywordAdamW(torch.optim.AdamW):
    """An AdamW without the `fused` keyword (torch 1.x)."""

    def __init__(self, params, *args, **kwargs):
        if "fused" in kwargs:
            raise TypeError("__init__() got an unexpected keyword argument 'fused'")
        super().__init__(params, *args, **kwargs)


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


@pytest.mark.parametrize(("adamw", "expected"), [
    (Torch21AdamW, "plain"),  # torch 2.1 on the CPU: no fused kernel, foreach is not native there
    (NoFusedKeywordAdamW, "plain"),
    # the current torch: CPU fused AdamW exists from torch 2.4 on (release notes of 2.4)
    (torch.optim.AdamW, "fused" if _torch_version() >= (2, 4) else "plain"),
])
def test_adamw_implementation_is_probed_per_torch_and_device(adamw, expected, monkeypatch):
    loop.adamw_implementation.cache_clear()
    cpu = torch.device("cpu")
    assert loop.adamw_implementation(cpu, adamw) == expected
    # build_optimizer asks the real torch.optim.AdamW: give it the simulated one and check what it builds
    monkeypatch.setattr(loop.torch.optim, "AdamW", adamw)
    config = TrainConfig(dataset_dir="d", base_checkpoint="b", job_dir="j", name="n", learning_rate=0.1)
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = loop.build_optimizer([param], config, cpu)  # torch 2.1 raised here before
    assert isinstance(optimizer, adamw)
    assert bool(optimizer.defaults.get("fused")) == (expected == "fused")
    assert bool(optimizer.defaults.get("foreach")) == (expected == "foreach")
    param.grad = torch.ones(3)
    optimizer.step()
    # first AdamW step: p ← p·(1 − lr·wd) − lr·m̂/(√v̂ + ε) with m̂ = g, v̂ = g² (bias-corrected), g = 1
    lr, wd, eps = 0.1, config.weight_decay, config.adam_epsilon
    torch.testing.assert_close(param.detach(), torch.full((3,), (1 - lr * wd) - lr / (1 + eps)))
    loop.adamw_implementation.cache_clear()


@pytest.mark.parametrize(("device", "fused", "foreach", "expected"), [
    ("cuda", True, True, "fused"),  # every torch ≥ 2.0 on CUDA
    ("cuda", False, True, "foreach"),  # a CUDA build whose fused kernel refuses (e.g. an old torch)
    ("cpu", True, True, "fused"),  # torch ≥ 2.4
    ("cpu", False, True, "plain"),  # torch 2.1: foreach runs on the CPU but only as a slow loop
    ("mps", False, False, "plain"),
])
def test_choose_adamw_prefers_fused_then_native_foreach(device, fused, foreach, expected):
    assert loop.choose_adamw(device, fused_runs=fused, foreach_runs=foreach, foreach_devices=("cuda",)) == expected


def test_diffusion_loss_is_deterministic_per_generator(nulltext_unet):
    config = TrainConfig(dataset_dir="d", base_checkpoint="b", job_dir="j", name="n", min_snr_gamma=5.0,
                         noise_offset=0.1)
    latents = torch.randn(2, 4, 8, 8)
    ac = sd1_alphas_cumprod()
    with torch.no_grad():
        a = loop.diffusion_loss(nulltext_unet, latents, torch.Generator().manual_seed(0), ac, config)
        b = loop.diffusion_loss(nulltext_unet, latents, torch.Generator().manual_seed(0), ac, config)
        c = loop.diffusion_loss(nulltext_unet, latents, torch.Generator().manual_seed(1), ac, config)
    assert a.item() == b.item() and a.item() != c.item()


# --- whole runs


@pytest.mark.slow
def test_train_run_writes_job_folder_and_a_concept_model_that_samples(tmp_path, tiny_checkpoint, tiny_prior):
    config = tiny_config(tmp_path, tiny_checkpoint, preview_every_steps=4, preview_steps=2, preview_seeds=(0, 1),
                         preview_prompts=("a photo",), keep_last=1, ema_decay=0.9, gradient_checkpointing=True)
    job = JobFolder(config.job_dir)
    result = loop.train(config, job, progress=False)

    assert result.state == JobState.COMPLETED and result.step == 4
    assert sorted(result.losses) == [1, 2, 3, 4] and all(math.isfinite(v) for v in result.losses.values())
    status = job.read_status()
    assert status.state == JobState.COMPLETED and status.step == 4 and status.total_steps == 4
    assert status.images_per_second > 0
    steps = [e for e in job.read_events() if e.get("type") == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    assert [e["loss"] for e in steps] == [result.losses[s] for s in (1, 2, 3, 4)]
    assert job.loss_plot_path.read_bytes().startswith(b"\x89PNG")
    # keep_last=1: only the final checkpoint survives, and `latest` names it
    assert [c.step for c in checkpoints.list_checkpoints(job.checkpoints_dir)] == [4]
    assert checkpoints.latest_checkpoint(job.checkpoints_dir).step == 4
    preview = Image.open(job.previews_dir / "step-000004.png")
    assert preview.size == (2 * 64, 2 * 64)  # seeds × (concept-only row + one prompt row)
    assert "GCFG preview grid" in preview.info["parameters"]

    concept, metadata = load_concept_model(result.checkpoint / checkpoints.CONCEPT_FILE)
    assert is_nulltext(concept) and metadata.steps == 4 and metadata.images_seen == 16
    assert metadata.train_config["name"] == "tiny" and metadata.dataset_fingerprint
    # the concept file holds the EMA weights, the train state the raw ones
    state = checkpoints.load_train_state(checkpoints.latest_checkpoint(job.checkpoints_dir))
    ema_weight = state["ema"]["shadow"]["out.2.weight"]
    assert torch.equal(concept.state_dict()["out.2.weight"], ema_weight)
    assert not torch.equal(state["unet"]["out.2.weight"], ema_weight)

    request = GenerationRequest(prompt="", cfg_scale=0.0, steps=2, sampler="Euler", seed=3, width=64, height=64,
                                gcfg=GCFGSettings(enabled=True, concept_weight=2.5))
    with_concept = generate(request, prior=tiny_prior, concept_unet=concept, progress=False).images[0]
    without = generate(dataclasses.replace(request, gcfg=GCFGSettings(enabled=True, concept_weight=0.0)),
                       prior=tiny_prior, concept_unet=concept, progress=False).images[0]
    assert np.asarray(with_concept).shape == (64, 64, 3)
    assert not np.array_equal(np.asarray(with_concept), np.asarray(without))  # the concept term acts


@pytest.mark.slow
def test_non_finite_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path, tiny_checkpoint, monkeypatch):
    config = tiny_config(tmp_path, tiny_checkpoint, max_steps=6, checkpoint_every_steps=2)
    real_loss = loop.diffusion_loss
    calls = {"n": 0}

    def loss_with_nan_at_step_3(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 4 else loss  # 2 micro-batches per step: step 3 = calls 5, 6

    monkeypatch.setattr(loop, "diffusion_loss", loss_with_nan_at_step_3)
    job = JobFolder(config.job_dir)
    result = loop.train(config, job, progress=False)

    assert result.state == JobState.FAILED and result.step == 2
    assert "step 3" in result.message and "nan" in result.message
    status = job.read_status()
    assert status.state == JobState.FAILED and "step 3" in status.last_error and "nan" in status.last_error
    latest = checkpoints.latest_checkpoint(job.checkpoints_dir)
    assert latest.step == 2 and [c.step for c in checkpoints.list_checkpoints(job.checkpoints_dir)] == [2]
    errors = [e for e in job.read_events() if e.get("type") == "error"]
    assert errors and errors[0]["step"] == 3
    assert json.loads(latest.meta_path.read_text())["step"] == 2


def test_train_refuses_fp16_on_cpu_before_accelerate_starts(tmp_path, tiny_checkpoint, monkeypatch):
    from trainer.config import ConfigError

    monkeypatch.setattr(loop, "make_accelerator", lambda *a: pytest.fail("Accelerate was started"))
    config = tiny_config(tmp_path, tiny_checkpoint, mixed_precision="fp16", device="cpu")
    with pytest.raises(ConfigError, match="^mixed_precision='fp16' needs a GPU"):
        loop.train(config, JobFolder(config.job_dir), progress=False)


def test_prepare_runs_the_preflight_after_the_scan_and_records_the_failure(tmp_path, tiny_checkpoint, monkeypatch):
    from trainer import preflight

    monkeypatch.setattr(preflight, "free_disk_bytes", lambda _path: 0)
    monkeypatch.setattr(loop, "build_latent_cache", lambda *a, **k: pytest.fail("the cache build started"))
    config = tiny_config(tmp_path, tiny_checkpoint)
    job = JobFolder(config.job_dir)
    with pytest.raises(preflight.PreflightError, match="free disk") as info:
        loop.prepare(config, job, progress=False, num_processes=1)
    status = job.read_status()
    assert status.state == JobState.FAILED and status.last_error == f"PreflightError: {info.value}"
    assert (job.path / "skipped_files.txt").is_file()  # the scan ran first


def test_stop_while_caching_ends_stopped_and_resume_finishes_the_job(tmp_path, tiny_checkpoint):
    config = tiny_config(tmp_path, tiny_checkpoint, max_steps=2, checkpoint_every_steps=2)
    job = JobFolder(config.job_dir)
    stop = loop.StopFlag()
    stop.request("test")  # polled before the first cache batch

    result = loop.train(config, job, stop=stop, progress=False)

    assert (result.state, result.step, result.checkpoint) == (JobState.STOPPED, 0, None)
    status = job.read_status()
    assert status.state == JobState.STOPPED and status.last_error is None and "caching" in status.message
    resumed = loop.train(config, job, resume=True, progress=False)
    assert (resumed.state, resumed.step) == (JobState.COMPLETED, 2)
