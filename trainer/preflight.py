"""Pre-flight: estimate disk and memory for a job and refuse to start, with a clear message, when they are short.

OOM and full disks strike at transitions (preview, checkpoint save, EMA creation), not in the steady-state
step (anchors-training.md, complaints 1, 2 and 7), so the estimates include those peaks.

Memory model (bytes; P = UNet parameters, B = micro-batch, r = resolution / 512). Sources: perf-anchors.md §0
and §5; the activation constant is derived there from NVIDIA's MLPerf v4.0 NeMo runs (micro-batch 64 at 512 px
fits an 80 GB H100 with fp16 activations, flash attention, no activation checkpointing: (80 − 14) / 64 ≈ 1 GB
per sample):

    static      = P · bytes per parameter of the run's memory options (trainer.memory: weights fp32 4 / bf16 2,
                  gradients as the weights or 0 when fused into the backward, optimizer AdamW 8 / 8-bit AdamW
                  2.03 / Adafactor 0.05, EMA 4 on the device or 0 on the CPU, half-precision weight copies 2
                  under autocast without checkpointing) + a per-tensor update transient (≈24 B × largest tensor)
    activations = B · r² · 1.0 GB · (0.35 with gradient checkpointing) · (2 without mixed precision)
    preview     = the frozen prior UNet in fp16 (2 · P) + VAE (≈0.2 GB) + sampling (≈0.1 GB · r² per image);
                  it sits beside the training state while previews render
    overhead    = 1.5 GB (CUDA context, allocator) and 10 % fragmentation on top

The estimate is a planning figure (±30 %), not a guarantee: the check refuses only when the static state plus
one micro-batch cannot fit, and warns when the full peak (with previews) exceeds what is free.

Disk model: latent cache (entries · 8 · (res/8)² · 4 B, ×2 with flips, + images · (res/8)² · 4 B of masks with
the masked loss; buckets hold at most res² pixels, so this bounds them too) + two full checkpoints (the newest is
written while the previous one still holds its optimizer state), each concept UNet weights (fp32, 4 · P) + train
state (optimizer states, EMA, training weights), + (keep_last − 1) older checkpoints that keep their concept model
only (trainer.checkpoints) + previews (PNG, ≈1.5 B per pixel) + 5 % margin. Bytes already present in the job's
cache and checkpoint folders are counted as available, since they are reused or rotated.

When: `preflight_job` runs right after the dataset scan, before the latent cache is built or any model is loaded,
with the image count of the scan, the UNet size read from the base checkpoint's header and the latent shape of the
resolution, so a job that cannot fit is refused within seconds rather than after hours of caching.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from gcfg_core.checkpoint import UNET_PREFIX, read_state_dict_shapes
from trainer.config import ConfigError, MixedPrecision, Optimizer, TrainConfig
from trainer.memory import (
    OPTIMIZER_BYTES,
    SD15_LARGEST_TENSOR,
    MemoryOptions,
    choose_memory_options,
    device_bytes_per_param,
    first_choice,
    host_bytes_per_param,
    incompatibilities,
    transient_bytes,
)

log = logging.getLogger("gcfg.trainer.preflight")

GB = 1e9
SD15_UNET_PARAMS = 859_520_964  # perf-anchors.md §0 (ldm UNetModel, v1-inference.yaml); the null-text UNet is smaller
SD_VAE_PARAMS = 83_653_863
ACTIVATION_BYTES_PER_SAMPLE_512 = 1.0 * GB  # bf16/fp16, SDPA attention, no checkpointing (module docstring)
CHECKPOINTING_FACTOR = 0.35
FP32_ACTIVATION_FACTOR = 2.0
PREVIEW_SAMPLING_BYTES_512 = 0.1 * GB
RUNTIME_OVERHEAD_BYTES = 1.5 * GB
FRAGMENTATION = 1.10
PNG_BYTES_PER_PIXEL = 1.5
DISK_MARGIN = 1.05
# Weights a null-text conversion removes from each transformer block (gcfg_core.nulltext.convert_to_nulltext).
_CROSS_ATTENTION_KEY = re.compile(r"\.transformer_blocks\.\d+\.(attn2|norm2)\.")


class PreflightError(ValueError):
    """The machine cannot run this job as configured; the message says what is short and by how much."""

    def __init__(self, problems: list[str] | tuple[str, ...]):
        self.problems = tuple(problems)
        super().__init__("; ".join(self.problems))


def _gb(value: float) -> str:
    return f"{value / GB:.1f} GB"


@dataclass(frozen=True)
class DiskEstimate:
    cache_bytes: int
    checkpoint_bytes: int  # one full checkpoint (weights + train state)
    checkpoints_kept: int  # keep_last + 1 while a new one is written
    preview_bytes: int
    concept_bytes: int = 0  # an older checkpoint: its concept model only

    @property
    def full_checkpoints(self) -> int:
        """Checkpoints with their optimizer state at the peak: the one being written and the previous one."""
        return min(2, self.checkpoints_kept)

    @property
    def checkpoints_bytes(self) -> int:
        return (self.full_checkpoints * self.checkpoint_bytes
                + (self.checkpoints_kept - self.full_checkpoints) * self.concept_bytes)

    @property
    def total_bytes(self) -> int:
        return int(DISK_MARGIN * (self.cache_bytes + self.checkpoints_bytes + self.preview_bytes))


@dataclass(frozen=True)
class MemoryEstimate:
    static_bytes: int  # weights, grads, optimizer states, EMA
    activation_bytes: int  # one micro-batch
    preview_bytes: int  # extra while previews render
    overhead_bytes: int
    transient_bytes: int = 0  # while one tensor is updated by a per-parameter optimizer rule

    @property
    def training_bytes(self) -> int:
        """Steady-state training peak."""
        return int(FRAGMENTATION * (self.static_bytes + self.activation_bytes + self.transient_bytes)
                   + self.overhead_bytes)

    @property
    def peak_bytes(self) -> int:
        """Training peak plus the preview models (the transition where OOM usually happens)."""
        return int(FRAGMENTATION * (self.static_bytes + self.activation_bytes + self.transient_bytes
                                    + self.preview_bytes) + self.overhead_bytes)


@dataclass(frozen=True)
class PreflightReport:
    device: str
    disk: DiskEstimate
    memory: MemoryEstimate
    disk_path: str
    available_disk_bytes: int
    reusable_disk_bytes: int
    available_device_bytes: int | None  # None: unknown (e.g. MPS)
    available_ram_bytes: int
    warnings: tuple[str, ...] = ()
    problems: tuple[str, ...] = field(default=())
    memory_options: MemoryOptions | None = None  # the run's options, "auto" fields resolved

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        device_free = "unknown" if self.available_device_bytes is None else _gb(self.available_device_bytes)
        lines = [
            f"disk: needs {_gb(self.disk.total_bytes)} in {self.disk_path} (cache {_gb(self.disk.cache_bytes)}, "
            f"checkpoints {_gb(self.disk.checkpoints_bytes)}: {self.disk.full_checkpoints} × "
            f"{_gb(self.disk.checkpoint_bytes)} with optimizer state, "
            f"{self.disk.checkpoints_kept - self.disk.full_checkpoints} × {_gb(self.disk.concept_bytes)} older, "
            f"previews {_gb(self.disk.preview_bytes)}), "
            f"free {_gb(self.available_disk_bytes + self.reusable_disk_bytes)}",
            f"memory on {self.device}: training ≈{_gb(self.memory.training_bytes)}, with previews "
            f"≈{_gb(self.memory.peak_bytes)}, free {device_free}",
        ]
        if self.memory_options is not None:
            lines.append("memory options: " + ", ".join(f"{k}={v}" for k, v in self.memory_options.to_dict().items()))
        return "\n".join(lines + [f"warning: {w}" for w in self.warnings] + [f"problem: {p}" for p in self.problems])


def latent_shape_for(resolution: int, latent_channels: int = 4, downsample: int = 8) -> tuple[int, int, int]:
    """Shape of the cached posterior moments (mean and logvar) of one image."""
    return (2 * latent_channels, resolution // downsample, resolution // downsample)


def _optimizer_bytes_per_param(config: TrainConfig) -> float:
    # An unresolved "auto" is sized as AdamW, the largest state it may resolve to.
    return OPTIMIZER_BYTES.get(config.optimizer, OPTIMIZER_BYTES[Optimizer.ADAMW])


def estimate_disk_bytes(config: TrainConfig, num_images: int, latent_shape: tuple[int, ...] | None = None,
                        unet_param_count: int = SD15_UNET_PARAMS, cache_bytes_per_value: int = 4) -> DiskEstimate:
    """Disk a run will occupy at its peak (module docstring: disk model)."""
    shape = latent_shape or latent_shape_for(config.resolution)
    entries = num_images * (2 if config.flip else 1)
    cache = entries * math.prod(shape) * cache_bytes_per_value
    if config.masked_loss:  # one mask channel per image at latent resolution (mirrors read it mirrored)
        cache += num_images * math.prod(shape[1:]) * cache_bytes_per_value
    # With EMA the concept file holds the averaged weights and the train state both the shadow and the training
    # weights (trainer.loop.save_checkpoint).
    per_param = 4 + _optimizer_bytes_per_param(config) + (8 if config.ema_decay > 0 else 0)
    checkpoint = int(unet_param_count * per_param)
    previews = 0
    if config.preview_every_steps > 0:
        renders = config.max_steps // config.preview_every_steps + 1
        images = (1 + len(config.preview_prompts)) * len(config.preview_seeds)
        previews = int(renders * images * config.resolution**2 * PNG_BYTES_PER_PIXEL)
    return DiskEstimate(cache, checkpoint, config.keep_last + 1, previews, unet_param_count * 4)


def estimate_memory_bytes(config: TrainConfig, unet_param_count: int = SD15_UNET_PARAMS,
                          device: torch.device | str = "cuda", options: MemoryOptions | None = None,
                          largest_tensor: int = SD15_LARGEST_TENSOR) -> MemoryEstimate:
    """Memory of one training process on `device` with `options` (module docstring: memory model); an unresolved
    config is estimated with each "auto" field at its most generous value (`trainer.memory.first_choice`)."""
    options = options or first_choice(config)
    on_cpu = torch.device(device).type == "cpu"
    # On the CPU, device memory is host RAM: an EMA "on the CPU" still counts.
    static = int(unet_param_count * (device_bytes_per_param(options, config)
                                     + (host_bytes_per_param(options, config) if on_cpu else 0)))
    scale = (config.resolution / 512) ** 2
    per_sample = ACTIVATION_BYTES_PER_SAMPLE_512 * scale
    if config.gradient_checkpointing:
        per_sample *= CHECKPOINTING_FACTOR
    if config.mixed_precision is MixedPrecision.NO:
        per_sample *= FP32_ACTIVATION_FACTOR
    activations = int(config.micro_batch_size * per_sample)
    preview = 0
    if config.preview_every_steps > 0:
        preview = int(2 * unet_param_count + 2 * SD_VAE_PARAMS + PREVIEW_SAMPLING_BYTES_512 * scale
                      * len(config.preview_seeds))
    overhead = int(RUNTIME_OVERHEAD_BYTES) if torch.device(device).type == "cuda" else 0
    return MemoryEstimate(static, activations, preview, overhead, transient_bytes(options, largest_tensor))


def resolve_memory_options(config: TrainConfig, unet_param_count: int, device: torch.device | str,
                           available: int | None, num_processes: int = 1) -> MemoryOptions:
    """The run's memory options: each "auto" field resolved to the cheapest runnable choice whose modelled training
    peak fits in `available` bytes (trainer.memory); the most generous choice when `available` is unknown."""
    if available is None:
        return first_choice(config)

    def fits(options: MemoryOptions) -> bool:
        return estimate_memory_bytes(config, unet_param_count, device, options).training_bytes <= available

    return choose_memory_options(config, fits, num_processes)


def largest_micro_batch(config: TrainConfig, unet_param_count: int, device: torch.device | str,
                        available: int, *, with_previews: bool = False,
                        options: MemoryOptions | None = None) -> int:
    """Largest divisor of `batch_size` whose estimate fits in `available` bytes (0 if none)."""
    best = 0
    for micro in range(1, config.batch_size + 1):
        if config.batch_size % micro:
            continue
        est = estimate_memory_bytes(config.with_overrides(micro_batch_size=micro), unet_param_count, device, options)
        if (est.peak_bytes if with_previews else est.training_bytes) <= available:
            best = micro
    return best


def _savings_hint(config: TrainConfig, options: MemoryOptions) -> str:
    hints = []
    if options.optimizer is not Optimizer.ADAFACTOR:
        hints.append("optimizer='adamw8bit' or 'adafactor'" if options.optimizer is Optimizer.ADAMW
                     else "optimizer='adafactor'")
    if options.weight_dtype.value == "fp32":
        hints.append("weight_dtype='bf16' (with mixed_precision='bf16')")
    if not options.fused_backward:
        hints.append(f"fused_backward='on' (with micro_batch_size=batch_size={config.batch_size})")
    if config.ema_decay > 0 and options.ema_device.value == "device":
        hints.append("ema_device='cpu'")
    if not config.gradient_checkpointing:
        hints.append("gradient_checkpointing=true")
    if config.ema_decay > 0:
        hints.append("ema_decay=0")
    return "use " + ", ".join(hints + ["a device with more memory"])


def _resolve_device(config: TrainConfig) -> torch.device:
    if config.device != "auto":
        return torch.device(config.device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _existing_ancestor(path: Path) -> Path:
    path = path.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _folder_bytes(path: Path) -> int:
    if not path.is_dir():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def free_disk_bytes(path: Path) -> int:
    """Free bytes on the filesystem holding `path` (a seam for tests that simulate a full disk)."""
    return shutil.disk_usage(path).free


def nulltext_unet_param_count(base_checkpoint: str | os.PathLike) -> int:
    """Parameters of the null-text UNet trained from `base_checkpoint`, counted from the file's header.

    The UNet's weights minus each transformer block's cross-attention (`attn2`) and its norm (`norm2`), which the
    null-text conversion replaces by a constant buffer; a `.safetensors` file is not loaded for this.
    """
    shapes = read_state_dict_shapes(base_checkpoint)
    return sum(t.numel() for key, t in shapes.items()
               if key.startswith(UNET_PREFIX) and not _CROSS_ATTENTION_KEY.search(key))


def largest_unet_tensor(base_checkpoint: str | os.PathLike) -> int:
    """Values in the UNet's largest tensor, from the file's header (the per-tensor optimizer transient)."""
    shapes = read_state_dict_shapes(base_checkpoint)
    return max(t.numel() for key, t in shapes.items() if key.startswith(UNET_PREFIX))


def check_mixed_precision(config: TrainConfig, device: torch.device | str | None = None) -> None:
    """Raise `ConfigError` when `config.mixed_precision` cannot run on the (resolved) device.

    fp16 autocast needs a GPU and its gradient scaler; on the CPU Accelerate would fail mid-setup with a traceback.
    """
    device = torch.device(device) if device is not None else _resolve_device(config)
    if config.mixed_precision is MixedPrecision.FP16 and device.type == "cpu":
        raise ConfigError(f"mixed_precision='fp16' needs a GPU, but device={config.device!r} resolves to the CPU; "
                          "use mixed_precision='bf16' (CPUs with bfloat16 support) or 'no'")


def available_device_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device, free RAM for the CPU, None when unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        return int(psutil.virtual_memory().available)
    return None


def run_preflight(
    config: TrainConfig,
    *,
    num_images: int,
    latent_shape: tuple[int, ...] | None = None,
    unet_param_count: int = SD15_UNET_PARAMS,
    num_processes: int = 1,
    device: torch.device | str | None = None,
    available_disk_bytes: int | None = None,
    available_device_bytes: int | None = None,
    available_ram_bytes: int | None = None,
    reusable_disk_bytes: int | None = None,
    raise_on_error: bool = True,
) -> PreflightReport:
    """Estimate disk and memory, compare with what is free, raise `PreflightError` naming each shortage.

    The `available_*` and `reusable_disk_bytes` arguments replace the measured values (tests, remote planning);
    by default disk is read with `free_disk_bytes` (shutil.disk_usage) on the job folder's filesystem, device
    memory with `torch.cuda.mem_get_info`, RAM with psutil.
    """
    problems: list[str] = []
    warnings: list[str] = []
    try:
        config.gradient_accumulation(num_processes)
    except ConfigError as e:
        problems.extend(e.problems)
    device = torch.device(device) if device is not None else _resolve_device(config)

    job_dir = Path(config.job_dir)
    disk = estimate_disk_bytes(config, num_images, latent_shape, unet_param_count)
    disk_path = _existing_ancestor(job_dir)
    if available_disk_bytes is None:
        available_disk_bytes = free_disk_bytes(disk_path)
    if reusable_disk_bytes is None:
        reusable_disk_bytes = _folder_bytes(job_dir / "cache") + _folder_bytes(job_dir / "checkpoints")
    disk_free = available_disk_bytes + reusable_disk_bytes
    if disk.total_bytes > disk_free:
        problems.append(f"needs {_gb(disk.total_bytes)} free disk in {disk_path}, has {_gb(disk_free)} "
                        f"(cache {_gb(disk.cache_bytes)}, checkpoints {_gb(disk.checkpoints_bytes)}: "
                        f"{disk.full_checkpoints} of {_gb(disk.checkpoint_bytes)} with optimizer state and "
                        f"{disk.checkpoints_kept - disk.full_checkpoints} older of {_gb(disk.concept_bytes)}; lower "
                        "keep_last or free space)")

    if available_device_bytes is None:
        available_device_bytes = available_device_memory(device)
    options = resolve_memory_options(config, unet_param_count, device, available_device_bytes, num_processes)
    problems.extend(incompatibilities(config, options, num_processes))
    memory = estimate_memory_bytes(config, unet_param_count, device, options)
    if available_device_bytes is not None:
        where = "RAM" if device.type == "cpu" else f"memory on {device}"
        if memory.training_bytes > available_device_bytes:
            fits = largest_micro_batch(config, unet_param_count, device, available_device_bytes, options=options)
            hint = (f"try micro_batch_size={fits} (batch_size stays {config.batch_size} through accumulation)"
                    if fits else "even micro_batch_size=1 does not fit: " + _savings_hint(config, options))
            problems.append(f"needs ≈{_gb(memory.training_bytes)} {where} for micro_batch_size="
                            f"{config.micro_batch_size}, has {_gb(available_device_bytes)} free; {hint}")
        elif memory.peak_bytes > available_device_bytes:
            warnings.append(f"previews may not fit: ≈{_gb(memory.peak_bytes)} with previews, "
                            f"{_gb(available_device_bytes)} free; they will be rendered with the prior offloaded "
                            "or fail; set preview_every_steps=0 to turn them off")

    if available_ram_bytes is None:
        available_ram_bytes = int(psutil.virtual_memory().available)
    # Host RAM: the checkpoint is read once (≈4 B/param for the UNet, plus VAE) before moving to the device.
    ram_needed = int(4 * (unet_param_count + SD_VAE_PARAMS) + 2 * GB
                     + unet_param_count * host_bytes_per_param(options, config))  # + an EMA kept on the CPU
    if device.type != "cpu" and ram_needed > available_ram_bytes:
        problems.append(f"needs ≈{_gb(ram_needed)} free RAM to load the base checkpoint, has "
                        f"{_gb(available_ram_bytes)}")

    if device.type == "cuda" and config.mixed_precision is MixedPrecision.BF16 and torch.cuda.is_available() \
            and not torch.cuda.is_bf16_supported():
        problems.append(f"mixed_precision='bf16' is not supported on {torch.cuda.get_device_name(device)}; "
                        "use 'fp16'")

    report = PreflightReport(str(device), disk, memory, str(disk_path), int(available_disk_bytes),
                             int(reusable_disk_bytes), available_device_bytes, int(available_ram_bytes),
                             tuple(warnings), tuple(problems), options)
    for w in warnings:
        log.warning("preflight: %s", w)
    if problems and raise_on_error:
        raise PreflightError(problems)
    log.info("preflight ok (pid %d):\n%s", os.getpid(), report.summary())
    return report


def preflight_job(config: TrainConfig, *, num_images: int, num_processes: int = 1,
                  device: torch.device | str | None = None) -> PreflightReport:
    """The preflight of a job before any expensive step: the image count from the dataset scan, the UNet size
    from the base checkpoint's header and the latent shape from the resolution; raises `PreflightError`."""
    check_mixed_precision(config, device)
    return run_preflight(config, num_images=num_images, latent_shape=latent_shape_for(config.resolution),
                         unet_param_count=nulltext_unet_param_count(config.base_checkpoint),
                         num_processes=num_processes, device=device)
