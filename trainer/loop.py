"""Preparation and the training loop of the null-text concept UNet (paper §4.3), read top to bottom like nanoGPT.

`prepare` scans the images, VAE-encodes them once into the latent cache and calibrates the null-text vectors on
the base model. `train` then fine-tunes every UNet parameter on eps-prediction MSE over the SD 1 schedule (which
SDXL shares). The base is SD 1.x or SDXL (`trainer.family`); an SDXL concept UNet also gets its vector input:
the empty prompt's pooled text embedding, fixed, and each image's size embeddings.

Exact resume: every random draw of micro-batch `m` of optimizer step `s` comes from a CPU `torch.Generator`
seeded with a hash of (seed, s, m) — timesteps, noise, the VAE posterior sample — and the data order is a seeded
permutation per epoch indexed by the global sample position `s · batch_size`. Nothing random carries over from
one step to the next, so the train state only needs the step (plus optimizer, EMA, grad scaler): a resumed run
draws exactly what the uninterrupted run drew, on any number of restarts.

Multi-GPU / multi-node: the same function under `accelerate launch` (DDP). Each process takes its shard of each
global batch; only process 0 writes files (status, events, checkpoints, previews).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import hashlib
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from gcfg_core.attention import use_sdpa_attention
from gcfg_core.concept_file import ConceptMetadata, load_concept_model, save_concept_model
from gcfg_core.conditioning import SizeConditioning
from gcfg_core.configs import sd1_alphas_cumprod
from gcfg_core.fileio import atomic_path, atomic_write_text
from gcfg_core.nulltext import calibrate_nulltext, convert_to_nulltext
from trainer import checkpoints
from trainer.buckets import (
    Bucket,
    BucketBatches,
    bucket_histogram,
    dataset_buckets,
    dataset_geometry,
    dominant_bucket,
    entry_groups,
)
from trainer.config import (
    EMADevice,
    FusedBackward,
    LRSchedule,
    Optimizer,
    TrainConfig,
    WeightDtype,
    check_resume_length,
    resolved_family,
)
from trainer.data import mask_files, masks_fingerprint, scan_dataset
from trainer.distributed import JobReporter, make_accelerator, release_accelerator, resolve_device
from trainer.family import (
    SDXL,
    VECTOR_INPUT_FILE,
    VectorInput,
    empty_prompt_text,
    entry_sizes,
    latent_scale_factor,
    load_base,
)
from trainer.jobfolder import JobFolder, JobState
from trainer.latent_cache import (
    CacheInterrupted,
    CacheKey,
    LatentCache,
    build_latent_cache,
    open_latent_cache,
    vae_moments_fn,
)
from trainer.memory import (
    MemoryOptions,
    check_memory_options,
    first_choice,
    resolve_on_resume,
    uses_low_memory_optimizer,
)
from trainer.optim import LowMemoryOptimizer, cast_weights_to_bf16, fuse_into_backward
from trainer.preflight import (
    available_device_memory,
    check_mixed_precision,
    nulltext_unet_param_count,
    preflight_job,
    resolve_memory_options,
)
from trainer.progress import ConsoleProgress
from trainer.validation import held_out_images, masked_mse, training_entries, validation_loss

log = logging.getLogger("gcfg.trainer.loop")

NUM_TRAIN_TIMESTEPS = 1000
NULLTEXT_FILE = "nulltext.safetensors"
PREPARED_FILE = "prepared.json"


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, missing optional dependency, unusable checkpoint)."""


# ----------------------------------------------------------------------------------------------------------------
# small pure helpers


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then constant / linear / cosine to 0."""
    peak, warmup, total = config.learning_rate, config.warmup_steps, config.max_steps
    # 1) linear warm-up from 0 (step 0 already gets a small non-zero rate, as in nanoGPT)
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    if config.lr_schedule == LRSchedule.CONSTANT:
        return peak
    # 2) decay over the remaining steps, reaching 0 at max_steps
    progress = (step - warmup) / max(1, total - warmup)
    assert 0 <= progress <= 1, progress
    if config.lr_schedule == LRSchedule.LINEAR:
        return peak * (1 - progress)
    # 3) cosine
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def seed_for(*parts: object) -> int:
    """A 63-bit seed from any tuple of values (stable across runs and platforms, unlike `hash`)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def micro_batch_generator(seed: int, step: int, slot: int) -> torch.Generator:
    """The one source of randomness of micro-batch `slot` of optimizer step `step` (stateless across steps).

    `slot` numbers the micro-batches of the global batch (accumulation index × processes + rank), so N processes
    draw exactly what one process accumulating N times as much draws.
    """
    return torch.Generator().manual_seed(seed_for("micro-batch", seed, step, slot))


def epoch_permutation(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of one epoch: a permutation of range(num_items), fixed by (seed, epoch)."""
    return torch.randperm(num_items, generator=torch.Generator().manual_seed(seed_for("data", seed, epoch)))


def global_batch(num_items: int, seed: int, position: int, count: int) -> list[int]:
    """`count` dataset indices starting at global sample `position` of the endless stream of epoch permutations."""
    indices: list[int] = []
    while len(indices) < count:
        epoch, offset = divmod(position, num_items)
        take = min(count - len(indices), num_items - offset)
        indices += epoch_permutation(num_items, seed, epoch)[offset:offset + take].tolist()
        position += take
    return indices


def rank_micro_batches(indices: list[int], accumulation: int, num_processes: int, rank: int) -> list[list[int]]:
    """This process's micro-batches of a global batch laid out as [accumulation, processes, micro_batch]."""
    micro = len(indices) // (accumulation * num_processes)
    assert micro * accumulation * num_processes == len(indices), (len(indices), accumulation, num_processes)
    return [indices[(a * num_processes + rank) * micro:(a * num_processes + rank + 1) * micro]
            for a in range(accumulation)]


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                  alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Forward diffusion q(z_t | z_0) = √ᾱ_t·z_0 + √(1−ᾱ_t)·ε (DDPM, Ho et al. 2020, Eq. 4)."""
    alpha = alphas_cumprod[timesteps].reshape(-1, 1, 1, 1).to(latents.dtype)
    return alpha.sqrt() * latents + (1 - alpha).sqrt() * noise


def loss_weights_min_snr(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ weights for eps-prediction, min(SNR_t, γ)/SNR_t (Hang et al. 2023, arXiv 2303.09556, Eq. 10)."""
    alpha = alphas_cumprod[timesteps]
    snr = alpha / (1 - alpha)
    return snr.clamp(max=gamma) / snr


def diffusion_loss(model: nn.Module, latents: torch.Tensor, generator: torch.Generator,
                   alphas_cumprod: torch.Tensor, config: TrainConfig, mask: torch.Tensor | None = None,
                   vector: torch.Tensor | None = None) -> torch.Tensor:
    """Eps-prediction MSE of one micro-batch; noise and timesteps come from `generator` (always on the CPU).

    `mask` `[B, 1, h, w]` (masked loss) weights each latent pixel (trainer.validation.masked_mse); `vector`: an
    SDXL UNet's vector input, one row per latent (None for SD 1.x).
    """
    batch, channels = latents.shape[:2]
    timesteps = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    if config.noise_offset:
        # Offset noise (Guttenberg 2023): a per-channel constant lets the model shift the mean brightness.
        noise = noise + config.noise_offset * torch.randn((batch, channels, 1, 1), generator=generator)
    device = latents.device
    timesteps, noise = timesteps.to(device), noise.to(device)
    noisy = noisy_latents(latents, noise, timesteps, alphas_cumprod)
    extra = {} if vector is None else {"y": vector}
    prediction = model(noisy, timesteps, context=None, **extra)  # null-text UNet: no context at all
    if mask is None:
        per_sample = F.mse_loss(prediction.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
    else:
        per_sample = masked_mse(prediction, noise, mask)
    if config.min_snr_gamma:
        per_sample = per_sample * loss_weights_min_snr(timesteps, alphas_cumprod, config.min_snr_gamma)
    return per_sample.mean()


# ----------------------------------------------------------------------------------------------------------------
# model pieces


def _checkpointed_forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():
        return module._forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(module._forward, *args, use_reentrant=False, **kwargs)


def enable_gradient_checkpointing(unet: nn.Module) -> int:
    """Non-reentrant activation checkpointing of every ResBlock and transformer block of this UNet instance.

    ldm's own `checkpoint` (use_checkpoint=True) replays the backward under CUDA autocast settings and fails under
    CPU autocast (test-stack.md §4); it is also a module global. Here each block instance gets a `forward`
    attribute that calls its `_forward` through `torch.utils.checkpoint` (use_reentrant=False), so other models in
    the process are untouched and gradients equal the uncheckpointed ones. Returns the number of blocks wrapped.
    """
    from ldm.modules.attention import BasicTransformerBlock
    from ldm.modules.diffusionmodules.openaimodel import ResBlock

    wrapped = 0
    for module in unet.modules():
        if isinstance(module, ResBlock | BasicTransformerBlock):
            module.forward = functools.partial(_checkpointed_forward, module)
            wrapped += 1
    return wrapped


class EMA:
    """Exponential moving average of the trainable parameters, fp32, on `device` (default: the parameters')."""

    def __init__(self, module: nn.Module, decay: float, device: torch.device | str | None = None):
        self.decay = decay
        self.shadow = {name: p.detach().to(device or p.device, torch.float32, copy=True)
                       for name, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        params = dict(module.named_parameters())
        for name, shadow in self.shadow.items():  # one tensor at a time: a CPU average copies one over the bus
            shadow.lerp_(params[name].detach().to(shadow.device, torch.float32), 1 - self.decay)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": {n: t.cpu() for n, t in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise TrainingError(f"EMA state does not match the model ({len(missing)} differing parameters)")
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)

    @contextlib.contextmanager
    def swapped_into(self, module: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the EMA weights into `module` (the training weights wait on the CPU)."""
        params = dict(module.named_parameters())
        backup = {n: params[n].detach().to("cpu", copy=True) for n in self.shadow}
        with torch.no_grad():
            for n, value in self.shadow.items():
                params[n].copy_(value)
        try:
            yield module
        finally:
            with torch.no_grad():
                for n, value in backup.items():
                    params[n].copy_(value)


FUSED, FOREACH, PLAIN = "fused", "foreach", "plain"
_ADAMW_FLAGS = {FUSED: {"fused": True}, FOREACH: {"foreach": True}, PLAIN: {"foreach": False}}
# Exceptions by which an AdamW refuses an implementation: RuntimeError (torch 2.1: "`fused=True` requires all the
# params to be ... of supported devices: ['cuda', ...]"), TypeError (a torch without the keyword), NotImplementedError
# (no kernel for this device at step time), ValueError (argument checks of other versions).
_REFUSALS = (RuntimeError, TypeError, NotImplementedError, ValueError)


def adamw_runs(adamw: type[torch.optim.Optimizer], device: torch.device, implementation: str) -> bool:
    """Whether this torch's `adamw` builds and steps with `implementation` on `device` (probed on one element)."""
    param = torch.zeros(1, device=device, requires_grad=True)
    param.grad = torch.ones_like(param)
    try:
        adamw([param], lr=1e-3, **_ADAMW_FLAGS[implementation]).step()
    except _REFUSALS:
        return False
    return True


def choose_adamw(device_type: str, *, fused_runs: bool, foreach_runs: bool,
                 foreach_devices: tuple[str, ...]) -> str:
    """Fused (one kernel for all parameters) where it runs; else foreach where torch has native multi-tensor kernels
    for the device (elsewhere, e.g. on the CPU, foreach is a loop with extra temporaries); else plain."""
    if fused_runs:
        return FUSED
    if foreach_runs and device_type in foreach_devices:
        return FOREACH
    return PLAIN


def _foreach_devices() -> tuple[str, ...]:
    # torch's own list (torch 2.1 has it too); older versions had native foreach kernels on CUDA only.
    try:
        from torch.utils._foreach_utils import _get_foreach_kernels_supported_devices
    except ImportError:
        return ("cuda",)
    return tuple(_get_foreach_kernels_supported_devices())


@functools.cache
def adamw_implementation(device: torch.device, adamw: type[torch.optim.Optimizer] = torch.optim.AdamW) -> str:
    """The AdamW implementation to use on `device` with this torch: probed, not assumed from the version.

    torch 2.1 (the WebUI 1.10.1 venv) fuses on CUDA only and raises for any other parameter; later versions also
    fuse on the CPU and on MPS.
    """
    return choose_adamw(device.type, fused_runs=adamw_runs(adamw, device, FUSED),
                        foreach_runs=adamw_runs(adamw, device, FOREACH), foreach_devices=_foreach_devices())


def build_optimizer(params: list[nn.Parameter], config: TrainConfig, device: torch.device,
                    options: MemoryOptions | None = None) -> torch.optim.Optimizer:
    """AdamW in the fastest implementation this torch has for `device`; `trainer.optim.LowMemoryOptimizer` for
    8-bit AdamW, Adafactor, bf16 weights or a fused backward (`options`, default: from the config's values)."""
    kwargs = dict(lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
                  weight_decay=config.weight_decay)
    if options is None:
        options = MemoryOptions(Optimizer.ADAMW if config.optimizer is Optimizer.AUTO else config.optimizer,
                                WeightDtype.FP32 if config.weight_dtype is WeightDtype.AUTO else config.weight_dtype,
                                config.fused_backward is FusedBackward.ON, EMADevice.DEVICE)
    if uses_low_memory_optimizer(options):
        log.info("optimizer: %s, %s weights%s", options.optimizer.value, options.weight_dtype.value,
                 ", fused into the backward pass" if options.fused_backward else "")
        return LowMemoryOptimizer(params, rule=options.optimizer.value, seed=config.seed, **kwargs)
    implementation = adamw_implementation(device, torch.optim.AdamW)
    log.info("AdamW: %s implementation (torch %s on %s)", implementation, torch.__version__, device)
    return torch.optim.AdamW(params, **_ADAMW_FLAGS[implementation], **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# stop requests (signals, the WebUI's runner, tests)


@dataclass
class StopFlag:
    """Set by SIGINT/SIGTERM (or a caller) and checked once per optimizer step; the run then saves and exits."""

    reason: str = ""
    _event: threading.Event = field(default_factory=threading.Event)

    def request(self, reason: str = "stop requested") -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()


@contextlib.contextmanager
def stop_on_signals(stop: StopFlag) -> Iterator[None]:
    """SIGINT/SIGTERM request a clean stop (a second SIGINT aborts at once); handlers restored on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread; the caller stops us via `stop`
        return

    def handler(signum: int, _frame: object) -> None:
        if signum == signal.SIGINT and stop.is_set():
            raise KeyboardInterrupt
        stop.request(f"{signal.Signals(signum).name} received")
        log.warning("%s received: saving a checkpoint and stopping after this step", signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# ----------------------------------------------------------------------------------------------------------------
# preparation: scan → latent cache → null-text calibration


# The config fields the prepared files depend on; a change in any of them means preparing again.
PREPARE_INPUTS = ("dataset_dir", "base_checkpoint", "resolution", "resize_policy", "flip", "min_image_size",
                  "calibration_images", "seed", "aspect_buckets", "bucket_max_aspect", "masked_loss", "mask_dir")


# Inputs added later, with the value a prepared.json without them was made with (no buckets, no masks).
PREPARE_INPUTS_BEFORE = {"aspect_buckets": False, "bucket_max_aspect": 2.0, "masked_loss": False, "mask_dir": ""}


def prepare_inputs(config: TrainConfig) -> dict[str, Any]:
    values = config.to_dict()
    return {name: values[name] for name in PREPARE_INPUTS}


@dataclass(frozen=True)
class Prepared:
    """What `prepare` leaves in the job folder, as recorded in prepared.json."""

    cache_key: CacheKey
    num_images: int
    num_skipped: int
    base_name: str
    base_sha256: str
    base_family: str
    inputs: dict[str, Any] = field(default_factory=dict)
    buckets: dict[str, int] = field(default_factory=dict)  # images per bucket "WxH", largest first

    def to_dict(self) -> dict[str, Any]:
        return dict(dataclasses.asdict(self), cache_key=self.cache_key.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Prepared:
        return cls(**dict(data, cache_key=CacheKey(**data["cache_key"])))


def read_prepared(job: JobFolder, config: TrainConfig) -> Prepared | None:
    """The preparation record of `job` if it was made for this config and its files are complete, else None."""
    path = job.path / PREPARED_FILE
    if not path.is_file() or not (job.path / NULLTEXT_FILE).is_file():
        return None
    prepared = Prepared.from_dict(json.loads(path.read_text(encoding="utf-8")))
    if {**PREPARE_INPUTS_BEFORE, **prepared.inputs} != prepare_inputs(config):
        return None
    if prepared.base_family == SDXL and not (job.path / VECTOR_INPUT_FILE).is_file():
        return None
    return prepared if open_latent_cache(job.cache_dir, prepared.cache_key) is not None else None


def prepare(config: TrainConfig, job: JobFolder, *, device: torch.device | None = None,
            stop: StopFlag | None = None, progress: bool = True, reporter: JobReporter | None = None,
            num_processes: int = 1) -> Prepared:
    """Scan the dataset, run the preflight, build (or reuse) the latent cache and calibrate the null-text vectors.

    Idempotent. A `PreflightError` (disk or memory short for `num_processes` processes) is raised right after the
    scan, before any model is loaded or cache file written.
    """
    if reporter is not None:  # called by `train`, which records failures itself
        return _prepare(config, job, device or resolve_device(config), stop or StopFlag(), progress, reporter,
                        num_processes)
    reporter = JobReporter(job)
    try:
        return _prepare(config, job, device or resolve_device(config), stop or StopFlag(), progress, reporter,
                        num_processes)
    except Exception as exc:  # recorded for the tab, then re-raised
        reporter.update(JobState.FAILED, last_error=f"{type(exc).__name__}: {exc}", message="failed")
        raise


def _prepare(config: TrainConfig, job: JobFolder, device: torch.device, stop: StopFlag, progress: bool,
             reporter: JobReporter, num_processes: int) -> Prepared:
    reporter.update(JobState.PREPARING, message="scanning images")
    scan = scan_dataset(config.dataset_dir, min_image_size=config.min_image_size)
    reporter.skipped_files("".join(f"{s.path}\t{s.reason}\n" for s in scan.skipped))
    log.info("dataset: %d images, %d skipped", len(scan.images), len(scan.skipped))
    # Refuse now, with the real image count, rather than after the (long) cache build (anchors-training.md).
    reporter.update(JobState.PREPARING, message="checking disk and memory")
    preflight_job(config, num_images=len(scan.images), num_processes=num_processes, device=device)
    buckets = dataset_buckets([(r.width, r.height) for r in scan.images], config)
    histogram = bucket_histogram(buckets)
    log.info("aspect-ratio buckets: %s", ", ".join(f"{name}: {n}" for name, n in histogram.items()))
    reporter.event({"type": "buckets", "histogram": histogram})
    masks = mask_files(scan, config) if config.masked_loss else None
    if masks is not None:
        log.info("masked loss: %d of %d images have a mask file (others: alpha channel or every pixel)",
                 sum(m is not None for m in masks), len(masks))
    family = resolved_family(config)
    base = load_base(config.base_checkpoint, family, device=device)
    key = CacheKey(dataset_fingerprint=scan.fingerprint, vae_sha256=base.sha256 or "", resolution=config.resolution,
                   resize_policy=config.resize_policy.value, flip=config.flip,
                   # all square: the key (and cache) of a run without buckets, so an older job's cache stays valid
                   buckets=(f"max-aspect {config.bucket_max_aspect:g}"
                            if any(b.width != b.height for b in buckets) else ""),
                   masks=masks_fingerprint(masks) if masks is not None else "")

    reporter.update(JobState.CACHING, message=f"encoding {len(scan.images)} images")

    def cache_progress(done: int, total: int) -> None:
        reporter.update(JobState.CACHING, phase_done=done, phase_total=total, message=f"encoded {done}/{total} images")

    cache = build_latent_cache(job.cache_dir, scan, key, vae_moments_fn(base.vae), batch_size=config.cache_batch_size,
                               num_workers=config.num_workers, progress=progress, progress_callback=cache_progress,
                               should_stop=stop.is_set, sizes=[(b.width, b.height) for b in buckets], masks=masks)

    reporter.update(JobState.CALIBRATING, message=f"calibrating null-text vectors on {config.calibration_images} "
                    "images")
    # On the dominant bucket's images (one batch takes one size; with a single bucket: every image).
    dominant = dominant_bucket(buckets)
    group = [e for e in range(len(cache)) if cache.entry_size(e) == (dominant.width, dominant.height)]
    count = min(config.calibration_images, len(group))
    generator = torch.Generator().manual_seed(seed_for("calibration", config.seed))
    indices = [group[i] for i in global_batch(len(group), config.seed, 0, count)]
    latents = cache.sample_latents(indices, generator, scale_factor=latent_scale_factor(family))
    if family == SDXL:
        context, pooled = empty_prompt_text(base)
        # Each image's (original size, crop, target size) as its bucket makes it (trainer.buckets).
        geometry = dataset_geometry([(r.width, r.height) for r in scan.images], config)

        def size_of(image: int, flipped: bool) -> SizeConditioning:
            g = geometry[image].flipped() if flipped else geometry[image]
            return SizeConditioning(g.original_size, g.crop_top_left, g.target_size)

        vector_input = VectorInput(pooled, entry_sizes(len(cache), cache.entry, size_of))
        vector_input.save(job.path / VECTOR_INPUT_FILE)
        vectors = calibrate_nulltext(base.unet, latents, context, seed=config.seed, alphas_cumprod=base.alphas_cumprod,
                                     batch_size=config.cache_batch_size, vector=vector_input.vectors(indices))
    else:
        vectors = calibrate_nulltext(base.unet, latents, base.encode_prompts([""]), seed=config.seed,
                                     alphas_cumprod=base.alphas_cumprod, batch_size=config.cache_batch_size)
    with atomic_path(job.path / NULLTEXT_FILE) as tmp:
        save_file({name: v.contiguous() for name, v in vectors.items()}, str(tmp),
                  metadata={"base_sha256": base.sha256 or "", "calibration_images": str(count)})
    prepared = Prepared(key, len(scan.images), len(scan.skipped), base.name, base.sha256 or "", base.family.value,
                        prepare_inputs(config), histogram)
    atomic_write_text(job.path / PREPARED_FILE, json.dumps(prepared.to_dict(), indent=2) + "\n")
    reporter.event({"type": "prepared", **prepared.to_dict()})
    return prepared


# ----------------------------------------------------------------------------------------------------------------
# checkpoints


def concept_metadata(config: TrainConfig, prepared: Prepared, step: int) -> ConceptMetadata:
    return ConceptMetadata(base_family=prepared.base_family, base_sha256=prepared.base_sha256,
                           base_name=prepared.base_name, train_config=config.to_dict(), steps=step,
                           images_seen=step * config.batch_size,
                           dataset_fingerprint=prepared.cache_key.dataset_fingerprint)


def save_checkpoint(job: JobFolder, config: TrainConfig, prepared: Prepared, step: int, unet: nn.Module,
                    optimizer: torch.optim.Optimizer, ema: EMA | None, scaler: Any,
                    memory_options: MemoryOptions | None = None) -> checkpoints.CheckpointInfo:
    """Concept model (EMA weights when EMA is on) + train state for exact resume, as one atomic folder."""
    state = {
        "format": checkpoints.TRAIN_STATE_FORMAT,
        "step": step,
        "images_seen": step * config.batch_size,
        "data": {"position": step * config.batch_size, "seed": config.seed},  # the order is a function of these
        "rng": {"scheme": "per-step generators", "seed": config.seed},
        "optimizer": optimizer.state_dict(),
        "ema": ema.state_dict() if ema else None,
        # With EMA the concept file holds the averaged weights, so the training weights travel here.
        "unet": {k: v.detach().cpu() for k, v in unet.state_dict().items()} if ema else None,
        "grad_scaler": scaler.state_dict() if scaler is not None else None,
        "config": config.to_dict(),
        "memory_options": memory_options.to_dict() if memory_options is not None else None,
    }
    metadata = concept_metadata(config, prepared, step)

    def write_concept(path: Path) -> None:
        with ema.swapped_into(unet) if ema else contextlib.nullcontext(unet) as weights:
            save_concept_model(path, weights, metadata)

    return checkpoints.write_checkpoint(job.checkpoints_dir, step, write_concept=write_concept, train_state=state,
                                        meta={"images_seen": step * config.batch_size, "ema": bool(ema),
                                              "created": datetime.datetime.now().isoformat(timespec="seconds")},
                                        keep_last=config.keep_last, slim_state=functools.partial(slim_train_state,
                                                                                                 config))


def slim_train_state(config: TrainConfig, step: int) -> dict[str, Any]:
    """What an older checkpoint keeps of its train state once a newer one holds the optimizer state."""
    return {"step": step, "images_seen": step * config.batch_size, "config": config.to_dict()}


def _not_resumable(checkpoint: checkpoints.CheckpointInfo) -> checkpoints.CheckpointError:
    return checkpoints.CheckpointError(
        f"{checkpoint.path} has no optimizer state (only the newest checkpoint of a job keeps it), so the run "
        "cannot resume from it exactly; its concept.safetensors is still a usable concept model")


def resume_state(checkpoint: checkpoints.CheckpointInfo) -> dict[str, Any]:
    """The train state to resume from; a checkpoint whose optimizer state was dropped is refused, naming why."""
    state = checkpoints.load_train_state(checkpoint)
    if not state.get("resumable", True) or "optimizer" not in state:
        raise _not_resumable(checkpoint)
    return state


def load_training_unet(config: TrainConfig, job: JobFolder, checkpoint: checkpoints.CheckpointInfo | None,
                       state: dict[str, Any] | None, family: str = "sd1",
                       vector_input: VectorInput | None = None) -> nn.Module:
    """The fp32 null-text UNet to train: the base UNet converted with the job's vectors (and, for SDXL, its fixed
    pooled input), or a checkpoint's."""
    if checkpoint is None:
        base = load_base(config.base_checkpoint, family, unet_only=True, compute_hash=False)
        vectors = load_file(str(job.path / NULLTEXT_FILE))
        unet = convert_to_nulltext(base.unet, vectors, vector_input.pooled if vector_input is not None else None)
    else:
        unet, _ = load_concept_model(checkpoint.concept_path, device="cpu", dtype=torch.float32,
                                     expected_family=family)
        if state is not None and state.get("unet") is not None:
            unet.load_state_dict(state["unet"])
    unet.train()
    unet.requires_grad_(True)
    return unet


# ----------------------------------------------------------------------------------------------------------------
# the loop


def run_memory_options(config: TrainConfig, state: dict[str, Any] | None, device: torch.device,
                       num_processes: int, accelerator: Any = None) -> MemoryOptions:
    """The memory options of this run: a resumed run's stored ones, else "auto" resolved from the device's free
    memory now (the preflight's model; under a launch, the least any process has, so that all agree); logged,
    and stored in every checkpoint."""
    options = resolve_on_resume(config, state.get("memory_options") if state else None)
    if options is None and state is not None:  # a checkpoint from before the memory options: what it used then
        options = first_choice(config)
    if options is None:
        available = available_device_memory(device)
        if num_processes > 1 and available is not None and accelerator is not None:
            available = int(accelerator.gather(torch.tensor([available], device=device)).min().item())
        options = resolve_memory_options(config, nulltext_unet_param_count(config.base_checkpoint), device,
                                         available, num_processes)
    log.info("memory options: %s", ", ".join(f"{k}={v}" for k, v in options.to_dict().items()))
    return options


@dataclass(frozen=True)
class TrainResult:
    """How a `train` call ended."""

    state: JobState
    step: int
    losses: dict[int, float]  # optimizer step (1-based) -> loss, for the steps run in this call
    checkpoint: Path | None
    message: str = ""


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def train(config: TrainConfig, job: JobFolder, *, resume: bool = False, stop: StopFlag | None = None,
          progress: bool = True, on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train (or resume) the concept UNet of `job` until `config.max_steps`, a stop request or a non-finite loss."""
    stop = stop or StopFlag()
    check_mixed_precision(config)  # Accelerate would otherwise fail mid-setup with a traceback
    check_memory_options(config)  # explicit combinations that cannot run (the process count is checked later)
    if resume:  # refused before anything is written (status.json would read "step 20 of 10")
        newest = checkpoints.latest_checkpoint(job.checkpoints_dir)
        check_resume_length(config, newest.step if newest is not None else 0)
        if newest is not None and not checkpoints.has_resume_state(newest):
            raise _not_resumable(newest)
    accelerator = make_accelerator(config)
    reporter = JobReporter(job, enabled=accelerator.is_main_process)  # only process 0 writes files
    with stop_on_signals(stop):
        try:
            return _train(config, job, reporter, accelerator, resume=resume, stop=stop,
                          progress=progress and accelerator.is_main_process, on_step=on_step)
        except Exception as exc:  # recorded for the tab, then re-raised
            reporter.update(JobState.FAILED, last_error=f"{type(exc).__name__}: {exc}", message="failed")
            raise
        finally:
            release_accelerator(accelerator)


def _train(config: TrainConfig, job: JobFolder, reporter: JobReporter, accelerator: Any, *, resume: bool,
           stop: StopFlag, progress: bool, on_step: Callable[[int, float], None] | None) -> TrainResult:
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    accumulation = config.gradient_accumulation(world)

    # --- data and null-text vectors (process 0 prepares; the others wait and then read the same files)
    # Disk and memory are checked before anything expensive: inside `prepare` right after the dataset scan, or
    # here when the job was prepared before (a resume, `prepare` then `train`, the other processes of a launch).
    with accelerator.main_process_first():
        if resume and accelerator.is_main_process:
            # A crash mid-save may have left the newest step in a hidden folder: move it into place first.
            checkpoints.recover_checkpoints(job.checkpoints_dir)
        prepared = read_prepared(job, config)
        if prepared is None:
            try:
                prepared = prepare(config, job, device=device, stop=stop, progress=progress, reporter=reporter,
                                   num_processes=world)
            except CacheInterrupted:
                # A stop request while encoding: the finished shards stay and a resume continues from them.
                message = "stopped while caching latents; resume continues from the finished shards"
                reporter.update(JobState.STOPPED, message=message)
                return TrainResult(JobState.STOPPED, 0, {}, None, message)
        else:
            preflight_job(config, num_images=prepared.num_images, num_processes=world, device=device)
    cache: LatentCache = open_latent_cache(job.cache_dir, prepared.cache_key)
    held_out = held_out_images(cache.num_images, config.validation_fraction, config.validation_min_images,
                               config.seed)
    entry_sizes = [cache.entry_size(e) for e in range(len(cache))]
    batches = BucketBatches(entry_groups(entry_sizes, training_entries(len(cache), cache.num_images, held_out)),
                            config.batch_size, config.seed)
    if held_out:
        log.info("validation: %d of %d images held out", len(held_out), cache.num_images)
    alphas_cumprod = sd1_alphas_cumprod().to(device)
    family = prepared.base_family
    scale_factor = latent_scale_factor(family)
    vector_input = VectorInput.load(job.path / VECTOR_INPUT_FILE) if family == SDXL else None

    # --- model, optimizer and (on resume) their state
    checkpoint = checkpoints.latest_checkpoint(job.checkpoints_dir) if resume else None
    if resume and checkpoint is None:
        log.info("no checkpoint in %s: starting from step 0", job.checkpoints_dir)
    state = resume_state(checkpoint) if checkpoint else None
    options = run_memory_options(config, state, device, world, accelerator)
    reporter.event({"type": "memory_options", **options.to_dict()})
    unet = load_training_unet(config, job, checkpoint, state, family, vector_input)
    if options.weight_dtype is WeightDtype.BF16:
        cast_weights_to_bf16(unet)
    unet = unet.to(device)
    use_sdpa_attention(unet)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(unet)
    ema = None
    if config.ema_decay:
        ema = EMA(unet, config.ema_decay, "cpu" if options.ema_device is EMADevice.CPU else None)
    optimizer = build_optimizer(list(unet.parameters()), config, device, options)
    if options.fused_backward:
        fuse_into_backward(unet.parameters(), optimizer, config.max_grad_norm)
    step = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            if state["ema"] is None:
                raise TrainingError(f"{checkpoint.path} has no EMA state but ema_decay={config.ema_decay}")
            ema.load_state_dict(state["ema"])
        step = state["step"]
    model, optimizer = accelerator.prepare(unet, optimizer)
    scaler = accelerator.scaler
    if scaler is not None and state is not None and state.get("grad_scaler"):
        scaler.load_state_dict(state["grad_scaler"])
    if config.compile:
        model = torch.compile(model)

    renderer = None
    if config.preview_every_steps and accelerator.is_main_process:
        from trainer.previews import PreviewRenderer

        dominant = dominant_bucket([Bucket(*size) for size in entry_sizes])
        renderer = PreviewRenderer(config, job.previews_dir, device=device, size=(dominant.width, dominant.height))

    def validate(at_step: int) -> None:
        """The held-out loss of the training weights (process 0, the unwrapped UNet: no DDP collective)."""
        with accelerator.autocast():
            value = validation_loss(unet, cache, held_out, config.seed, alphas_cumprod,
                                    batch_size=config.micro_batch_size, device=device, scale_factor=scale_factor,
                                    vectors=None if vector_input is None else vector_input.vectors)
        log.info("step %d: validation loss %.5g on %d held-out images", at_step, value, len(held_out))
        reporter.event({"type": "validation", "step": at_step, "loss": value, "images": len(held_out)})

    validating = bool(held_out) and config.validation_every_steps > 0 and accelerator.is_main_process
    if validating and step == 0:
        validate(0)  # the base model's value: where the curve starts

    log.info("training %s from step %d to %d: batch %d = %d processes x %d accumulation x %d micro-batch, "
             "%d images in cache", config.name, step, config.max_steps, config.batch_size, world, accumulation,
             config.micro_batch_size, len(cache))
    reporter.update(JobState.TRAINING, step=step, total_steps=config.max_steps, message="training")
    losses: dict[int, float] = {}
    last_checkpoint = checkpoint.path if checkpoint else None
    started = last_save = time.monotonic()
    start_step = step
    console = ConsoleProgress(config.max_steps, initial=step, desc=f"training {config.name}", unit="step",
                              enabled=progress)
    while step < config.max_steps:
        # 1) learning rate of this step, set by hand (nanoGPT style: the schedule is a pure function of the step)
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # 2) forward/backward over this process's micro-batches; DDP syncs gradients on the last one
        indices = batches.batch(step)  # one bucket per batch; a pure function of (seed, step)
        loss_sum = torch.zeros((), device=device)
        for a, micro_batch in enumerate(rank_micro_batches(indices, accumulation, world, rank)):
            generator = micro_batch_generator(config.seed, step, a * world + rank)
            with accelerator.accumulate(model):
                latents = cache.sample_latents(micro_batch, generator, scale_factor=scale_factor).to(device)
                mask = cache.masks(micro_batch)
                vector = vector_input.vectors(micro_batch).to(device) if vector_input is not None else None
                loss = diffusion_loss(model, latents, generator, alphas_cumprod, config,
                                      mask=None if mask is None else mask.to(device), vector=vector)
                loss_sum += loss.detach()
                if options.fused_backward and not math.isfinite(loss.item()):
                    break  # the backward would update the weights: stop before it (handled below)
                accelerator.backward(loss)  # divides by the accumulation steps itself
        step_loss = accelerator.reduce(loss_sum / accumulation, reduction="mean")
        loss_value = step_loss.item()  # a CPU-GPU sync point, once per optimizer step
        if not math.isfinite(loss_value):
            message = (f"loss is {loss_value} at step {step + 1}; stopped without updating the weights. "
                       f"Last good checkpoint: {last_checkpoint or 'none'}")
            log.error(message)
            reporter.event({"type": "error", "step": step + 1, "loss": str(loss_value), "message": message})
            reporter.update(JobState.FAILED, last_error=message, message="non-finite loss")
            console.close()
            return TrainResult(JobState.FAILED, step, losses, last_checkpoint, message)
        # 3) clip, step, EMA
        grad_norm = None
        if not options.fused_backward:  # else each parameter was clipped and updated inside the backward
            if config.max_grad_norm:
                grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(unet)
        step += 1
        losses[step] = loss_value
        if on_step is not None:
            on_step(step, loss_value)

        # 4) report, checkpoint, preview (process 0 only writes; every process agrees on stopping)
        elapsed = time.monotonic() - started
        images_per_s = (step - start_step) * config.batch_size / max(elapsed, 1e-9)
        eta = (config.max_steps - step) * config.batch_size / max(images_per_s, 1e-9)
        reporter.event({"type": "step", "step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                        "images_per_s": images_per_s})
        console.update(step, loss=f"{loss_value:.4g}", **{"images/s": f"{images_per_s:.3g}"})
        if validating and _due(step, config.validation_every_steps):
            validate(step)
        stop_now = bool(accelerator.reduce(torch.tensor(float(stop.is_set()), device=device), reduction="sum") > 0)
        save_now = (step == config.max_steps or stop_now or _due(step, config.checkpoint_every_steps)
                    or (config.checkpoint_every_minutes > 0
                        and time.monotonic() - last_save >= 60 * config.checkpoint_every_minutes))
        if save_now and accelerator.is_main_process:
            info = save_checkpoint(job, config, prepared, step, unet, optimizer, ema, scaler, options)
            last_checkpoint, last_save = info.path, time.monotonic()
            reporter.event({"type": "checkpoint", "step": step, "path": str(info.path)})
            reporter.loss_plot()
        if renderer is not None and _due(step, config.preview_every_steps):
            # bf16 weights take fp32 inputs (the timestep embedding) only under autocast, in previews too
            bf16 = (torch.autocast(device.type, dtype=torch.bfloat16) if options.weight_dtype is WeightDtype.BF16
                    else contextlib.nullcontext())
            with ema.swapped_into(unet) if ema else contextlib.nullcontext(unet) as weights, bf16:
                preview = renderer.render(weights, step)
            reporter.event({"type": "preview", "step": step, "path": str(preview)})
        reporter.update(JobState.STOPPING if stop_now else JobState.TRAINING, step=step, images_per_second=images_per_s,
                        eta_seconds=eta, last_checkpoint=str(last_checkpoint) if last_checkpoint else None,
                        message=f"{stop.reason}: saving and stopping" if stop_now else f"loss {loss_value:.4g}")
        if stop_now:
            break

    console.close()
    accelerator.wait_for_everyone()
    if step >= config.max_steps:
        final, message = JobState.COMPLETED, f"completed {step} steps"
    else:
        final, message = JobState.STOPPED, f"stopped at step {step} ({stop.reason}); resume to continue"
    reporter.update(final, step=step, eta_seconds=None, message=message,
                    last_checkpoint=str(last_checkpoint) if last_checkpoint else None)
    log.info(message)
    return TrainResult(final, step, losses, last_checkpoint, message)
