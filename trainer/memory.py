"""The memory options of a run (optimizer, weight precision, fused backward, where the EMA lives), their bytes per
parameter, the combinations that cannot work, and the choice of "auto" values from the device's memory.

Bytes per trainable parameter on the training device (the static part of `trainer.preflight`'s memory model):

    weights      4 (fp32 master weights) or 2 (bf16, stochastic rounding)
    gradients    as the weights, or 0 with the optimizer step fused into the backward pass
    optimizer    AdamW 8 (m, v in fp32); 8-bit AdamW 2 + 8/256 (codes + two fp32 block maxima per 256 values);
                 Adafactor ≈ 0.05 (a row and a column factor per weight matrix: SD 1.5 needs 0.02)
    EMA          4 when kept on the device, 0 on the CPU (there it needs 4 of host RAM instead)
    half copies  2 with fp32 weights under bf16/fp16 autocast without gradient checkpointing: each layer's weight is
                 cast once in the forward and the cast copy is saved for the backward (with checkpointing the copies
                 are made per block while it is recomputed, and freed with it)

plus, for the per-parameter rules, a transient of ≈24 bytes × the largest tensor (its fp32 gradient, weights and
dequantised moments while it is updated).

"auto" (per field) is resolved by `choose_memory_options`: of every combination of the auto fields that can run,
the one with the lowest *cost* whose modelled training peak fits in the memory the device has free. The costs
order what each option gives up: the EMA on the CPU (a copy over the bus per step) 1, the fused backward (per-tensor
clipping) 2, 8-bit moments 4, bf16 weights 8, Adafactor (no momentum) 16. The resolved values are stored in the
train state, so a resume keeps them whatever memory is free then.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any

from trainer.config import (
    AUTO,
    ConfigError,
    EMADevice,
    FusedBackward,
    MixedPrecision,
    Optimizer,
    TrainConfig,
    WeightDtype,
)
from trainer.optim import BLOCK

WEIGHT_BYTES = {WeightDtype.FP32: 4, WeightDtype.BF16: 2}
OPTIMIZER_BYTES = {Optimizer.ADAMW: 8.0, Optimizer.ADAMW_8BIT: 2.0 + 8 / BLOCK, Optimizer.ADAFACTOR: 0.05}
EMA_BYTES = 4
HALF_COPY_BYTES = 2
TRANSIENT_BYTES_PER_VALUE = 24
SD15_LARGEST_TENSOR = 1280 * 1280 * 9  # a 3×3 convolution of the 1280-channel blocks

_COST = {"ema_cpu": 1, "fused": 2, Optimizer.ADAMW_8BIT: 4, "bf16": 8, Optimizer.ADAFACTOR: 16}
_CHOICES: dict[str, tuple[Any, ...]] = {
    "optimizer": (Optimizer.ADAMW, Optimizer.ADAMW_8BIT, Optimizer.ADAFACTOR),
    "weight_dtype": (WeightDtype.FP32, WeightDtype.BF16),
    "fused_backward": (FusedBackward.OFF, FusedBackward.ON),
    "ema_device": (EMADevice.DEVICE, EMADevice.CPU),
}
MEMORY_FIELDS = tuple(_CHOICES)


@dataclass(frozen=True)
class MemoryOptions:
    """The resolved memory options of a run (no "auto" left)."""

    optimizer: Optimizer
    weight_dtype: WeightDtype
    fused_backward: bool
    ema_device: EMADevice

    def to_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.value, "weight_dtype": self.weight_dtype.value,
                "fused_backward": FusedBackward.ON.value if self.fused_backward else FusedBackward.OFF.value,
                "ema_device": self.ema_device.value}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MemoryOptions:
        return cls(Optimizer(data["optimizer"]), WeightDtype(data["weight_dtype"]),
                   FusedBackward(data["fused_backward"]) is FusedBackward.ON, EMADevice(data["ema_device"]))

    def apply(self, config: TrainConfig) -> TrainConfig:
        """`config` with these values in place of its memory fields."""
        return dataclasses.replace(config, **self.to_dict())

    @property
    def cost(self) -> int:
        return ((_COST["ema_cpu"] if self.ema_device is EMADevice.CPU else 0)
                + (_COST["fused"] if self.fused_backward else 0) + _COST.get(self.optimizer, 0)
                + (_COST["bf16"] if self.weight_dtype is WeightDtype.BF16 else 0))


def first_choice(config: TrainConfig) -> MemoryOptions:
    """The options an unresolved config is estimated with: each "auto" field at its most generous value."""
    values = {name: getattr(config, name) for name in MEMORY_FIELDS}
    picked = {name: _CHOICES[name][0] if _is_auto(value) else value for name, value in values.items()}
    return MemoryOptions(picked["optimizer"], picked["weight_dtype"], picked["fused_backward"] is FusedBackward.ON,
                         picked["ema_device"])


def _is_auto(value: Any) -> bool:
    return getattr(value, "value", value) == AUTO


def device_bytes_per_param(options: MemoryOptions, config: TrainConfig) -> float:
    """Static bytes per trainable parameter on the training device (module docstring)."""
    weights = WEIGHT_BYTES[options.weight_dtype]
    grads = 0 if options.fused_backward else weights
    ema = EMA_BYTES if config.ema_decay > 0 and options.ema_device is EMADevice.DEVICE else 0
    half_copies = (HALF_COPY_BYTES if options.weight_dtype is WeightDtype.FP32
                   and config.mixed_precision is not MixedPrecision.NO and not config.gradient_checkpointing else 0)
    return weights + grads + OPTIMIZER_BYTES[options.optimizer] + ema + half_copies


def host_bytes_per_param(options: MemoryOptions, config: TrainConfig) -> int:
    """Host RAM per parameter beyond the loading peak: the EMA when it is kept on the CPU."""
    return EMA_BYTES if config.ema_decay > 0 and options.ema_device is EMADevice.CPU else 0


def transient_bytes(options: MemoryOptions, largest_tensor: int = SD15_LARGEST_TENSOR) -> int:
    """Bytes in use while one tensor is updated by a per-parameter rule (0 for torch's fused AdamW)."""
    if options.optimizer is Optimizer.ADAMW and options.weight_dtype is WeightDtype.FP32 \
            and not options.fused_backward:
        return 0
    return TRANSIENT_BYTES_PER_VALUE * largest_tensor


def uses_low_memory_optimizer(options: MemoryOptions) -> bool:
    """Whether the run needs `trainer.optim.LowMemoryOptimizer` (torch's AdamW covers fp32 AdamW without fusing)."""
    return transient_bytes(options, 1) > 0


def incompatibilities(config: TrainConfig, options: MemoryOptions, num_processes: int = 1) -> list[str]:
    """Why `options` cannot run with `config` (one message per problem, naming the values); empty when they can."""
    problems = []
    if options.weight_dtype is WeightDtype.BF16 and config.mixed_precision is not MixedPrecision.BF16:
        problems.append(f"weight_dtype='bf16' needs mixed_precision='bf16' (bf16 weights compute under bf16 "
                        f"autocast), got mixed_precision={config.mixed_precision.value!r}; set "
                        "mixed_precision='bf16' or weight_dtype='fp32'")
    if options.fused_backward:
        accumulation = config.batch_size // max(1, config.micro_batch_size * num_processes)
        if accumulation > 1:
            problems.append(
                f"fused_backward='on' applies each gradient as soon as it is complete, so it cannot accumulate: "
                f"batch_size={config.batch_size} with micro_batch_size={config.micro_batch_size} × {num_processes} "
                f"process(es) is {accumulation} accumulation steps; set micro_batch_size="
                f"{config.batch_size // num_processes} or fused_backward='off'")
        if num_processes > 1:
            problems.append(f"fused_backward='on' runs in a single process only (got {num_processes} processes): "
                            "DDP reduces the gradients after the fused updates would have used them; set "
                            "fused_backward='off'")
        if config.mixed_precision is MixedPrecision.FP16:
            problems.append("fused_backward='on' cannot use mixed_precision='fp16': its loss scaling must see every "
                            "gradient before any update; use mixed_precision='bf16' or fused_backward='off'")
    return problems


def explicit_problems(config: TrainConfig, num_processes: int = 1) -> list[str]:
    """`incompatibilities` of the explicitly chosen (non-auto) memory options; "auto" fields never cause one."""
    fixed = [name for name in MEMORY_FIELDS if not _is_auto(getattr(config, name))]
    return [p for p in incompatibilities(config, first_choice(config), num_processes)
            if any(p.startswith(f"{name}=") for name in fixed)]


def check_memory_options(config: TrainConfig, num_processes: int = 1) -> None:
    """Raise `ConfigError` when the explicitly chosen (non-auto) memory options cannot run with `config`."""
    problems = explicit_problems(config, num_processes)
    if problems:
        raise ConfigError(problems)


def candidates(config: TrainConfig, num_processes: int = 1) -> list[MemoryOptions]:
    """Every runnable resolution of `config`'s auto fields, cheapest first (explicit fields kept)."""
    values = {name: getattr(config, name) for name in MEMORY_FIELDS}
    axes = [_CHOICES[name] if _is_auto(value) else (value,) for name, value in values.items()]
    found = []
    for optimizer, weight_dtype, fused, ema_device in itertools.product(*axes):
        options = MemoryOptions(optimizer, weight_dtype, fused is FusedBackward.ON, ema_device)
        if config.ema_decay == 0 and ema_device is EMADevice.CPU and _is_auto(values["ema_device"]):
            continue  # no EMA: where it would live changes nothing
        if not incompatibilities(config, options, num_processes):
            found.append(options)
    return sorted(found, key=lambda o: o.cost)


def choose_memory_options(config: TrainConfig, fits: Any, num_processes: int = 1) -> MemoryOptions:
    """The cheapest runnable options for which `fits(options)` is true; the leanest runnable ones when none fits
    (the preflight then reports the shortage), `first_choice` when nothing is auto."""
    found = candidates(config, num_processes)
    if not found:
        return first_choice(config)
    for options in found:
        if fits(options):
            return options
    return min(found, key=lambda o: (device_bytes_per_param(o, config), o.cost))


def resolve_on_resume(config: TrainConfig, stored: dict[str, Any] | None) -> MemoryOptions | None:
    """The options a resumed run continues with: the stored ones; an explicit config value that differs from them
    is a `ConfigError` naming both. None when the checkpoint predates stored options."""
    if not stored:
        return None
    options = MemoryOptions.from_dict(stored)
    if not _is_auto(config.ema_device):  # where the average lives may change (RESUME_MUTABLE_FIELDS)
        options = dataclasses.replace(options, ema_device=config.ema_device)
    problems = []
    for name, value in options.to_dict().items():
        given = getattr(config, name)
        if not _is_auto(given) and given.value != value:
            problems.append(f"{name} cannot change on resume (the run uses {value!r}, now {given.value!r}): the "
                            f"checkpoint's optimizer state and weights follow from it; use {name}={value!r} or "
                            "'auto', or start a new job")
    if problems:
        raise ConfigError(problems)
    return options
