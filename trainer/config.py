"""The one training-job config shared by the command line and the WebUI tab.

Defaults follow the paper (Cao et al. 2023, arXiv 2312.08195, §4.3 / appendix): AdamW, lr 1e-5, batch 32,
512×512, every UNet parameter trainable, the calibrated null-text vectors frozen.

Stored as JSON (`config.json` in the job folder), not TOML: the WebUI runs on Python 3.10, which has no
`tomllib`, JSON needs no extra dependency on either side, and the tab's JavaScript reads it natively.
Every field is declared once here, with its help text in the field metadata, so the CLI flags and the tab's
widgets can be generated from `config_fields()` instead of being listed again.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gcfg_core.fileio import atomic_write_text

CONFIG_VERSION = 1
CONFIG_FILENAME = "config.json"


class ConfigError(ValueError):
    """A config value is invalid; the message names every bad field, its value and what is allowed."""

    def __init__(self, problems: str | list[str] | tuple[str, ...]):
        self.problems: tuple[str, ...] = (problems,) if isinstance(problems, str) else tuple(problems)
        super().__init__("; ".join(self.problems))


class ResizePolicy(str, enum.Enum):
    """How a non-square image becomes `resolution`×`resolution` (square images are simply resized under both)."""

    CENTER_CROP = "center-crop"  # scale the short side to `resolution`, crop the long side's centre
    SQUASH = "squash"  # resize both sides to `resolution` without cropping (what the paper does for square data)


AUTO = "auto"  # a memory option the preflight chooses from the device's free memory (trainer.memory)


class ModelFamily(str, enum.Enum):
    """The base model's family, which fixes the concept UNet's architecture and conditioning."""

    AUTO = "auto"  # read from the base checkpoint's keys
    SD1 = "sd1"  # SD 1.x: 16 cross-attention blocks
    SDXL = "sdxl"  # SDXL base layout: 70 cross-attention blocks, pooled text and size embeddings


class Optimizer(str, enum.Enum):
    AUTO = AUTO
    ADAMW = "adamw"  # torch.optim.AdamW, fp32 states (16 B/param with grads and weights)
    ADAMW_8BIT = "adamw8bit"  # block-wise 8-bit states (trainer.optim; the UniDiffusion reference uses 8-bit Adam)
    ADAFACTOR = "adafactor"  # factored second moment, no momentum (trainer.optim)


class WeightDtype(str, enum.Enum):
    AUTO = AUTO
    FP32 = "fp32"  # fp32 master weights (autocast computes in mixed_precision)
    BF16 = "bf16"  # bf16 weights, each update stochastically rounded (trainer.optim)


class FusedBackward(str, enum.Enum):
    AUTO = AUTO
    ON = "on"  # each parameter updated, and its gradient freed, as soon as the gradient is complete
    OFF = "off"


class EMADevice(str, enum.Enum):
    AUTO = AUTO
    DEVICE = "device"  # beside the weights
    CPU = "cpu"  # in host RAM: no device memory, a copy over the bus per step


class LRSchedule(str, enum.Enum):
    CONSTANT = "constant"
    COSINE = "cosine"  # cosine decay to 0 at max_steps, after warmup
    LINEAR = "linear"  # linear decay to 0 at max_steps, after warmup


class MixedPrecision(str, enum.Enum):
    NO = "no"
    BF16 = "bf16"
    FP16 = "fp16"


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class TrainConfig:
    """A concept-UNet training job; construction coerces types and rejects bad values (`ConfigError`)."""

    # --- where (required)
    dataset_dir: str = field(metadata=_help("Folder of training images, searched recursively (jpg/png/webp/bmp)."))
    base_checkpoint: str = field(
        metadata=_help("SD 1.5 or SDXL base checkpoint the concept UNet starts from (.safetensors/.ckpt)."))
    job_dir: str = field(metadata=_help("Job folder: config, status, events, log, cache, checkpoints, previews."))
    name: str = field(metadata=_help("Job name; letters, digits, '.', '_' and '-' (used in file names)."))
    model_family: ModelFamily = field(
        default=ModelFamily.AUTO,
        metadata=_help("Base model family: 'auto' (read from the base checkpoint), 'sd1' or 'sdxl'; a checkpoint of "
                       "another family is refused."))
    # --- data
    resolution: int = field(default=512, metadata=_help(
        "Training size in pixels (a multiple of 64): the square's side, or the pixel count of a bucket, ≈ side²."))
    resize_policy: ResizePolicy = field(
        default=ResizePolicy.CENTER_CROP,
        metadata=_help("Image to its training size (square or bucket): 'center-crop' or 'squash' (resize without "
                       "crop). Square images: plain resize."))
    aspect_buckets: bool = field(default=True, metadata=_help(
        "Aspect-ratio buckets: each image trains at the size of ≈ resolution² pixels (sides multiples of 64) "
        "nearest its shape; batches stay within a bucket. Square datasets train exactly as without."))
    bucket_max_aspect: float = field(default=2.0, metadata=_help(
        "Longest side / shortest side of the widest bucket (≥ 1); more elongated images are cropped or squashed."))
    masked_loss: bool = field(default=False, metadata=_help(
        "Weight the loss per pixel by a mask: a same-named file in mask_dir, else the image's alpha channel; "
        "images without one train on every pixel."))
    mask_dir: str = field(default="", metadata=_help(
        "Folder of masks (greyscale, white = train), same relative paths and names as the images (any extension)."))
    min_image_size: int = field(
        default=256,
        metadata=_help("Images whose short side is below this many pixels are skipped and reported (0 = keep all)."))
    flip: bool = field(default=False, metadata=_help("Also train on horizontally flipped copies (cached separately)."))
    # --- optimisation (paper: AdamW, lr 1e-5, batch 32)
    learning_rate: float = field(default=1e-5, metadata=_help("Peak learning rate (paper: 1e-5)."))
    batch_size: int = field(
        default=32, metadata=_help("Effective batch: over all processes and gradient accumulation (paper: 32)."))
    micro_batch_size: int = field(default=4, metadata=_help("Images per process per forward pass (memory knob)."))
    adam_beta1: float = field(default=0.9, metadata=_help("AdamW β1."))
    adam_beta2: float = field(default=0.999, metadata=_help("AdamW β2."))
    adam_epsilon: float = field(default=1e-8, metadata=_help("AdamW ε."))
    weight_decay: float = field(default=1e-2, metadata=_help("AdamW decoupled weight decay."))
    optimizer: Optimizer = field(
        default=Optimizer.AUTO,
        metadata=_help("'adamw' (paper), 'adamw8bit' (8-bit states, plain torch), 'adafactor' (factored, least "
                       "memory) or 'auto' (AdamW when it fits the device, else the next leanest)."))
    weight_dtype: WeightDtype = field(
        default=WeightDtype.AUTO,
        metadata=_help("Trained weights: 'fp32' (master weights), 'bf16' (half the bytes, stochastic rounding; needs "
                       "mixed_precision 'bf16') or 'auto' (fp32 when it fits)."))
    fused_backward: FusedBackward = field(
        default=FusedBackward.AUTO,
        metadata=_help("Optimizer step inside the backward pass, freeing each gradient at once: 'on' (no gradient "
                       "accumulation, per-tensor clipping), 'off' or 'auto' (on only when needed to fit)."))
    ema_device: EMADevice = field(
        default=EMADevice.AUTO,
        metadata=_help("Where the EMA weights live: 'device', 'cpu' (host RAM) or 'auto' (device when it fits)."))
    lr_schedule: LRSchedule = field(
        default=LRSchedule.CONSTANT, metadata=_help("'constant', 'cosine' or 'linear' (decay to 0 at max_steps)."))
    warmup_steps: int = field(default=0, metadata=_help("Linear warm-up from 0, in optimizer steps."))
    max_steps: int = field(default=10000, metadata=_help("Training length in optimizer steps."))
    max_grad_norm: float = field(default=1.0, metadata=_help("Gradient clipping norm (0 = off)."))
    mixed_precision: MixedPrecision = field(
        default=MixedPrecision.BF16, metadata=_help("Autocast dtype: 'no', 'bf16' or 'fp16' (fp32 master weights)."))
    gradient_checkpointing: bool = field(
        default=True, metadata=_help("Recompute activations: less memory, ~30% slower."))
    ema_decay: float = field(default=0.0, metadata=_help("EMA of the weights (0 = off, else in (0, 1), e.g. 0.9999)."))
    min_snr_gamma: float = field(default=0.0, metadata=_help("Min-SNR loss weighting γ (0 = off; 5 is common)."))
    noise_offset: float = field(default=0.0, metadata=_help("Noise offset (0 = off; 0.05-0.1 typical)."))
    compile: bool = field(default=False, metadata=_help("torch.compile the UNet."))
    # --- validation (held-out images, never trained on)
    validation_fraction: float = field(default=0.05, metadata=_help(
        "Share of the images held out for the validation loss (0 = none); at least validation_min_images."))
    validation_min_images: int = field(default=8, metadata=_help(
        "Smallest held-out set; a dataset under four times this size is not split (no validation loss)."))
    validation_every_steps: int = field(default=500, metadata=_help(
        "Validation loss every N steps, at fixed noise and timesteps (0 = off)."))
    seed: int = field(default=0, metadata=_help("Seed of data order, noise and timesteps (exact resume)."))
    # --- checkpoints and previews
    checkpoint_every_steps: int = field(default=500, metadata=_help("Save every N optimizer steps (0 = off)."))
    checkpoint_every_minutes: float = field(default=30.0, metadata=_help("Also save every N minutes (0 = off)."))
    keep_last: int = field(default=3, metadata=_help("Checkpoints kept on disk; older ones are deleted."))
    preview_every_steps: int = field(default=500, metadata=_help("Preview grid every N steps (0 = off)."))
    preview_prompts: tuple[str, ...] = field(
        default=(), metadata=_help("Extra control prompts; the concept-only preview (no prompt) is always included."))
    preview_seeds: tuple[int, ...] = field(default=(0, 1, 2, 3), metadata=_help("Fixed preview seeds."))
    preview_concept_weight: float = field(default=2.5, metadata=_help("GCFG concept weight in previews (paper: 2.5)."))
    preview_steps: int = field(default=25, metadata=_help("Sampler steps per preview (paper: 25)."))
    preview_sampler: str = field(default="DPM++ 2M", metadata=_help("Preview sampler name (paper: DPM-Solver++)."))
    # --- preparation and runtime
    calibration_images: int = field(
        default=64, metadata=_help("Images used to calibrate the null-text vectors (before step 0)."))
    cache_batch_size: int = field(default=8, metadata=_help("Images per VAE forward when building the latent cache."))
    num_workers: int = field(default=0, metadata=_help("Data loader worker processes (0 = main process)."))
    device: str = field(default="auto", metadata=_help("'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'."))

    def __post_init__(self) -> None:
        problems: list[str] = []
        for f in dataclasses.fields(self):
            try:
                object.__setattr__(self, f.name, _coerce(f, getattr(self, f.name)))
            except ConfigError as e:
                problems.extend(e.problems)
        if not problems:  # range checks assume well-typed values
            problems = _value_problems(self)
        if problems:
            raise ConfigError(problems)

    # --- derived values

    def gradient_accumulation(self, num_processes: int = 1) -> int:
        """Micro-batches each process accumulates per optimizer step: batch / (micro_batch × processes)."""
        if num_processes < 1:
            raise ConfigError(f"num_processes={num_processes} must be ≥ 1")
        per_step = self.micro_batch_size * num_processes
        if self.batch_size % per_step:
            suggestion = _round_up(self.batch_size, per_step)
            raise ConfigError(
                f"batch_size={self.batch_size} is not a multiple of micro_batch_size × processes = "
                f"{self.micro_batch_size} × {num_processes}; use e.g. batch_size={suggestion}")
        return self.batch_size // per_step

    def validate(self, *, check_paths: bool = True, num_processes: int = 1) -> None:
        """Re-check every value (all problems in one `ConfigError`), the process split and, optionally, the paths."""
        problems = _value_problems(self)
        try:
            self.gradient_accumulation(num_processes)
        except ConfigError as e:
            problems.extend(e.problems)
        from trainer.memory import explicit_problems  # (trainer.memory builds on this module)

        problems.extend(explicit_problems(self, num_processes))
        if check_paths:
            problems.extend(_path_problems(self))
        if problems:
            raise ConfigError(problems)

    # --- (de)serialisation

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict: enums as their string values, tuples as lists."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Inverse of `to_dict`; unknown or missing required keys raise `ConfigError` naming them."""
        data = dict(data)
        version = data.pop("config_version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise ConfigError(f"config_version={version!r} is not supported (this trainer reads {CONFIG_VERSION})")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.default is dataclasses.MISSING and f.name not in data)
        if missing:
            raise ConfigError(f"missing required config key(s): {', '.join(missing)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps({"config_version": CONFIG_VERSION, **self.to_dict()}, indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a JSON object, got {type(data).__name__}")
        return cls.from_dict({**ABSENT_IN_OLDER_FILES, **data})

    def save(self, path: str | os.PathLike) -> None:
        """Write the config as JSON, atomically."""
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrainConfig:
        """Read a config written by `save` (values are validated; paths are not — call `validate`).

        A file that cannot be read or is not a config is a `ConfigError` whose first problem names the file.
        """
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError as e:
            raise ConfigError(f"config file {str(path)!r} does not exist") from e
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {str(path)!r} cannot be read: {e}") from e
        try:
            return cls.from_json(text)
        except ConfigError as e:
            if len(e.problems) == 1 and not _FIELD_PROBLEM.match(e.problems[0]):
                raise ConfigError(f"config file {str(path)!r}: {e.problems[0]}") from e
            raise ConfigError([f"config file {str(path)!r} has bad values", *e.problems]) from e

    def with_overrides(self, **overrides: Any) -> TrainConfig:
        """A copy with some fields replaced (CLI flags); `None` means "not given" and is ignored."""
        given = {k: v for k, v in overrides.items() if v is not None}
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(given) - names)
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **given)


# Fields added after config files were first written, with the value a file without them means: that run had
# no buckets and no held-out split, and resuming it must not change its data (buckets would re-cache the images
# at other sizes, a split would drop some from the data order: no longer the same run).
ABSENT_IN_OLDER_FILES: dict[str, Any] = {"aspect_buckets": False, "validation_fraction": 0.0}


# Fields a resumed run may change. Everything else defines the run (data, model, randomness, optimiser kind)
# and must stay as it was, or "resume" would silently become a different training (anchors-training.md,
# complaint 3; sd-scripts #1110: users could not change the learning rate on resume).
RESUME_MUTABLE_FIELDS: frozenset[str] = frozenset({
    "job_dir", "name",
    "learning_rate", "lr_schedule", "warmup_steps", "max_steps", "max_grad_norm",
    "adam_beta1", "adam_beta2", "adam_epsilon", "weight_decay",
    # Same effective batch and data order; only the split into forward passes changes (the OOM remedy).
    "micro_batch_size", "gradient_checkpointing", "compile",
    "checkpoint_every_steps", "checkpoint_every_minutes", "keep_last",
    "preview_every_steps", "preview_prompts", "preview_seeds", "preview_concept_weight", "preview_steps",
    "preview_sampler",
    "calibration_images",  # only used before step 0; the calibrated vectors are in the checkpoint
    "validation_every_steps",
    "cache_batch_size", "num_workers", "device",
    "ema_device",  # where the average lives does not change it
})


# Why each other field is fixed for the life of a job (said when a resume tries to change one).
_CACHE = "the latent cache was built with it"
_ORDER = "the data order and every step's noise follow from it (exact resume)"
_LOSS = "it defines the loss the run optimises"
RESUME_FIXED_REASONS: dict[str, str] = {
    "dataset_dir": _CACHE, "resolution": _CACHE, "resize_policy": _CACHE, "min_image_size": _CACHE, "flip": _CACHE,
    "aspect_buckets": _CACHE, "bucket_max_aspect": _CACHE, "masked_loss": _CACHE, "mask_dir": _CACHE,
    "validation_fraction": "the held-out images are left out of the data order",
    "validation_min_images": "the held-out images are left out of the data order",
    "base_checkpoint": "the concept UNet started from it and the null-text vectors were calibrated on it",
    "model_family": "the concept UNet's architecture and conditioning follow from it",
    "batch_size": _ORDER, "seed": _ORDER,
    "optimizer": "the checkpoint holds this optimizer's state",
    "weight_dtype": "the run's weights and their rounding follow from it",
    "fused_backward": "the checkpoint holds the state of the optimizer it selects",
    "mixed_precision": "the checkpoint's gradient-scaler state and the run's numerics follow from it",
    "ema_decay": "the checkpoint's EMA weights were averaged with it",
    "min_snr_gamma": _LOSS, "noise_offset": _LOSS,
}


# Memory options that may read "auto": the value a run resolved is in its train state and checked on resume
# (trainer.memory.resolve_on_resume), so "auto" on either side is not a change here.
AUTO_FIELDS = ("optimizer", "weight_dtype", "fused_backward", "ema_device")


def changed_fixed_fields(old: TrainConfig, new: TrainConfig) -> list[str]:
    """The fields outside `RESUME_MUTABLE_FIELDS` whose value differs, in declaration order."""
    def differs(name: str) -> bool:
        a, b = getattr(old, name), getattr(new, name)
        if name in AUTO_FIELDS and AUTO in (a.value, b.value):
            return False
        return a != b
    return [f.name for f in dataclasses.fields(TrainConfig) if f.name not in RESUME_MUTABLE_FIELDS and differs(f.name)]


def check_resume_compatible(old: TrainConfig, new: TrainConfig) -> None:
    """Raise `ConfigError` naming every field outside `RESUME_MUTABLE_FIELDS` whose value differs, and why."""
    changed = changed_fixed_fields(old, new)
    if changed:
        raise ConfigError([
            f"{name} cannot change on resume (was {_show(getattr(old, name))}, now {_show(getattr(new, name))}): "
            f"{RESUME_FIXED_REASONS.get(name, 'it defines the run')}; start a new job to change it"
            for name in changed
        ] + [f"fields that may change on resume: {', '.join(sorted(RESUME_MUTABLE_FIELDS))}"])


def check_resume_length(config: TrainConfig, step: int) -> None:
    """Raise `ConfigError` when `config.max_steps` is below `step`, the step the job has reached: a resume only
    continues a run (a shorter one is an earlier checkpoint of it, which the job keeps only while `keep_last`
    allows)."""
    if config.max_steps < step:
        raise ConfigError(f"max_steps={config.max_steps} is below this job's current step {step}: a resume continues "
                          f"the run, so it needs max_steps={step} or more")


@dataclass(frozen=True)
class FieldSpec:
    """One config field as a UI or CLI generator needs it."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    required: bool = False
    resume_mutable: bool = False


def config_fields() -> tuple[FieldSpec, ...]:
    """Every `TrainConfig` field with its type, default, help text and choices (for CLI flags and UI widgets)."""
    specs = []
    for f in dataclasses.fields(TrainConfig):
        kind = _FIELD_TYPES[f.name]
        choices = tuple(m.value for m in kind) if isinstance(kind, type) and issubclass(kind, enum.Enum) else ()
        required = f.default is dataclasses.MISSING
        specs.append(FieldSpec(f.name, kind, None if required else f.default, f.metadata.get("help", ""),
                               choices, required, f.name in RESUME_MUTABLE_FIELDS))
    return tuple(specs)


# --- coercion and validation (pure helpers)

_FIELD_TYPES: dict[str, Any] = {
    "dataset_dir": str, "base_checkpoint": str, "job_dir": str, "name": str, "model_family": ModelFamily,
    "resolution": int, "resize_policy": ResizePolicy, "min_image_size": int, "flip": bool,
    "aspect_buckets": bool, "bucket_max_aspect": float, "masked_loss": bool, "mask_dir": str,
    "validation_fraction": float, "validation_min_images": int, "validation_every_steps": int,
    "learning_rate": float, "batch_size": int, "micro_batch_size": int, "adam_beta1": float, "adam_beta2": float,
    "adam_epsilon": float, "weight_decay": float, "optimizer": Optimizer, "weight_dtype": WeightDtype,
    "fused_backward": FusedBackward, "ema_device": EMADevice, "lr_schedule": LRSchedule,
    "warmup_steps": int, "max_steps": int, "max_grad_norm": float, "mixed_precision": MixedPrecision,
    "gradient_checkpointing": bool, "ema_decay": float, "min_snr_gamma": float, "noise_offset": float,
    "compile": bool, "seed": int,
    "checkpoint_every_steps": int, "checkpoint_every_minutes": float, "keep_last": int,
    "preview_every_steps": int, "preview_prompts": tuple, "preview_seeds": tuple,
    "preview_concept_weight": float, "preview_steps": int, "preview_sampler": str,
    "calibration_images": int, "cache_batch_size": int, "num_workers": int, "device": str,
}
_TUPLE_ITEM_TYPES = {"preview_prompts": str, "preview_seeds": int}

_FIELD_PROBLEM = re.compile(r"^[a-z_][a-z0-9_]*(\[\d+\])?=")  # "learning_rate=2 must be ..."
_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")
DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_MAX_SEED = 2**32 - 1  # numpy's limit; torch accepts more but the loop may seed numpy too


def _show(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return repr(value.value)
    if isinstance(value, tuple):
        return repr(list(value))
    return repr(value)


def _round_up(value: int, multiple: int) -> int:
    return max(multiple, -(-value // multiple) * multiple)


def _coerce_scalar(name: str, kind: Any, value: Any) -> Any:
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        try:
            return kind(value.value if isinstance(value, enum.Enum) else value)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in kind)
            raise ConfigError(f"{name}={value!r} is not one of {allowed}") from None
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}={value!r} must be true or false")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{name}={value!r} must be an integer")
    if kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{name}={value!r} must be a number")
    if kind is str:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name}={value!r} must be a string")
    raise AssertionError(f"no coercion for {name}")


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    kind = _FIELD_TYPES[f.name]
    if kind is tuple:
        if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
            raise ConfigError(f"{f.name}={value!r} must be a list")
        item_kind = _TUPLE_ITEM_TYPES[f.name]
        return tuple(_coerce_scalar(f"{f.name}[{i}]", item_kind, v) for i, v in enumerate(value))
    return _coerce_scalar(f.name, kind, value)


def _value_problems(c: TrainConfig) -> list[str]:
    """Every out-of-range value, one message each naming the field, the value and what is allowed."""
    p: list[str] = []

    def need(ok: bool, name: str, allowed: str) -> None:
        if not ok:
            p.append(f"{name}={_show(getattr(c, name))} {allowed}")

    def finite(name: str) -> bool:
        return math.isfinite(getattr(c, name))

    for name in ("dataset_dir", "base_checkpoint", "job_dir"):
        need(bool(getattr(c, name).strip()), name, "must not be empty")
    need(bool(_NAME_RE.fullmatch(c.name)), "name",
         "must be 1-100 letters, digits, '.', '_' or '-' (not starting with '.')")
    need(64 <= c.resolution <= 4096 and c.resolution % 64 == 0, "resolution",
         "must be a multiple of 64 between 64 and 4096 (the VAE downsamples 8×, the UNet 8× more)")
    need(c.min_image_size >= 0, "min_image_size", "must be ≥ 0 (0 = keep every size)")
    need(finite("bucket_max_aspect") and 1 <= c.bucket_max_aspect <= 8, "bucket_max_aspect", "must be in [1, 8]")
    need(not c.mask_dir or c.masked_loss, "mask_dir", "is set but masked_loss is off; turn masked_loss on or clear "
         "mask_dir")
    need(finite("validation_fraction") and 0 <= c.validation_fraction < 0.5, "validation_fraction",
         "must be in [0, 0.5) (0 = no held-out images)")
    need(c.validation_min_images >= 1, "validation_min_images", "must be ≥ 1")
    need(c.validation_every_steps >= 0, "validation_every_steps", "must be ≥ 0 (0 = off)")
    need(finite("learning_rate") and 0 < c.learning_rate <= 1, "learning_rate", "must be in (0, 1] (paper: 1e-5)")
    need(c.micro_batch_size >= 1, "micro_batch_size", "must be ≥ 1")
    need(c.batch_size >= 1, "batch_size", "must be ≥ 1")
    if c.batch_size >= 1 and c.micro_batch_size >= 1 and c.batch_size % c.micro_batch_size:
        p.append(f"batch_size={c.batch_size} is not a multiple of micro_batch_size × processes = "
                 f"{c.micro_batch_size} × 1; use e.g. batch_size={_round_up(c.batch_size, c.micro_batch_size)}")
    need(0 <= c.adam_beta1 < 1, "adam_beta1", "must be in [0, 1)")
    need(0 <= c.adam_beta2 < 1, "adam_beta2", "must be in [0, 1)")
    need(finite("adam_epsilon") and c.adam_epsilon > 0, "adam_epsilon", "must be > 0")
    need(finite("weight_decay") and c.weight_decay >= 0, "weight_decay", "must be ≥ 0")
    need(c.max_steps >= 1, "max_steps", "must be ≥ 1")
    need(0 <= c.warmup_steps <= max(c.max_steps, 0), "warmup_steps", f"must be in [0, max_steps={c.max_steps}]")
    need(finite("max_grad_norm") and c.max_grad_norm >= 0, "max_grad_norm", "must be ≥ 0 (0 = no clipping)")
    need(c.ema_decay == 0 or 0 < c.ema_decay < 1, "ema_decay", "must be 0 (off) or in (0, 1)")
    need(finite("min_snr_gamma") and c.min_snr_gamma >= 0, "min_snr_gamma", "must be ≥ 0 (0 = off)")
    need(finite("noise_offset") and 0 <= c.noise_offset <= 1, "noise_offset", "must be in [0, 1] (0 = off)")
    need(0 <= c.seed <= _MAX_SEED, "seed", f"must be in [0, {_MAX_SEED}]")
    need(c.checkpoint_every_steps >= 0, "checkpoint_every_steps", "must be ≥ 0 (0 = off)")
    need(finite("checkpoint_every_minutes") and c.checkpoint_every_minutes >= 0, "checkpoint_every_minutes",
         "must be ≥ 0 (0 = off)")
    need(c.keep_last >= 1, "keep_last", "must be ≥ 1")
    need(c.preview_every_steps >= 0, "preview_every_steps", "must be ≥ 0 (0 = off)")
    need(all(s.strip() for s in c.preview_prompts), "preview_prompts", "must not contain empty prompts "
         "(the concept-only preview is always included)")
    need(all(0 <= s <= _MAX_SEED for s in c.preview_seeds), "preview_seeds", f"must all be in [0, {_MAX_SEED}]")
    need(bool(c.preview_seeds) or c.preview_every_steps == 0, "preview_seeds",
         "must not be empty while previews are on (preview_every_steps > 0)")
    need(finite("preview_concept_weight"), "preview_concept_weight", "must be a finite number")
    need(c.preview_steps >= 1, "preview_steps", "must be ≥ 1")
    need(bool(c.preview_sampler.strip()), "preview_sampler", "must not be empty")
    need(c.calibration_images >= 1, "calibration_images", "must be ≥ 1")
    need(c.cache_batch_size >= 1, "cache_batch_size", "must be ≥ 1")
    need(c.num_workers >= 0, "num_workers", "must be ≥ 0")
    need(bool(DEVICE_RE.match(c.device)), "device", "must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    return p


def _path_problems(c: TrainConfig) -> list[str]:
    p = []
    if not Path(c.dataset_dir).is_dir():
        p.append(f"dataset_dir={c.dataset_dir!r} is not an existing folder")
    if c.mask_dir and not Path(c.mask_dir).is_dir():
        p.append(f"mask_dir={c.mask_dir!r} is not an existing folder")

    if not Path(c.base_checkpoint).is_file():
        p.append(f"base_checkpoint={c.base_checkpoint!r} is not an existing file")
    else:
        p.extend(_family_problems(c))
    problem = folder_problem(Path(c.job_dir))
    if problem:
        p.append(f"job_dir={c.job_dir!r} {problem}")
    return p


def checkpoint_family(path: str | os.PathLike) -> str:
    """The trainable family ("sd1", "sdxl") of a base checkpoint, from its header; `ConfigError` for any other."""
    from gcfg_core.checkpoint import CheckpointError, base_family
    from gcfg_core.checkpoint import ModelFamily as FileFamily
    from gcfg_core.model_files import file_family

    try:
        family = file_family(path)
    except CheckpointError as e:
        raise ConfigError(f"base_checkpoint={os.fspath(path)!r} cannot be read: {e}") from e
    if family in (FileFamily.SD1, FileFamily.SDXL):
        return family.value
    hint = f" (its base family is {base_family(family).label})" if base_family(family) is not family else ""
    raise ConfigError(f"base_checkpoint={os.fspath(path)!r} is {family.label}{hint}; concept UNets are trained from "
                      "an SD 1.x or an SDXL base checkpoint (text-to-image, 4-channel UNet)")


def resolved_family(c: TrainConfig) -> str:
    """The job's family: `model_family`, or the base checkpoint's when 'auto'; a mismatch is a `ConfigError`."""
    found = checkpoint_family(c.base_checkpoint)
    if c.model_family is not ModelFamily.AUTO and c.model_family.value != found:
        labels = {"sd1": "SD 1.x", "sdxl": "SDXL"}
        raise ConfigError(f"model_family={c.model_family.value!r} ({labels[c.model_family.value]}) but "
                          f"base_checkpoint={c.base_checkpoint!r} is an {labels[found]} checkpoint ({found}); "
                          f"use model_family='{found}' or 'auto', or another base checkpoint")
    return found


def _family_problems(c: TrainConfig) -> list[str]:
    """A family the trainer cannot use, or one other than `model_family`; a file whose header cannot be read is
    reported when it is loaded, with the loader's own message."""
    from gcfg_core.checkpoint import CheckpointError
    from gcfg_core.model_files import file_family

    try:
        file_family(c.base_checkpoint)
    except (CheckpointError, OSError):
        return []
    try:
        resolved_family(c)
    except ConfigError as e:
        return list(e.problems)
    return []


def folder_problem(path: Path) -> str | None:
    """Why `path` cannot be (or become) a folder to write in, without creating anything; None when it can.

    Looks at `path` or, when it does not exist yet, at its nearest existing parent: that must be a folder this
    process may create entries in (`os.access`, which cannot see every reason, e.g. for root; the command line
    also tries a real write before anything expensive).
    """
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        where = "exists and" if existing == path else f"cannot be created: {str(existing)!r}"
        return f"{where} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return ("is not writable" if existing == path else
                f"cannot be created: {str(existing)!r} is not writable")
    return None
