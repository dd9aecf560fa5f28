"""Low-memory optimizers for a full UNet fine-tune on 8–12 GB GPUs, in plain torch (no bitsandbytes).

One optimizer class, `LowMemoryOptimizer`, updates one parameter at a time (`step_param`) with one of three rules,
and writes the result into weights of either precision:

* **AdamW** (Loshchilov & Hutter 2019; torch's decoupled weight decay and bias correction): m and v in fp32,
  8 bytes per parameter.
* **8-bit AdamW** (the idea of Dettmers et al. 2022, arXiv 2110.02861, written here from the paper's description):
  m and v stored as 8-bit codes of blocks of `BLOCK` values, each block scaled by its absolute maximum (fp32).
  m uses a signed, v an unsigned logarithmic code book (relative error ≤ 2.7 % within 3 resp. 6 decades of the
  block's maximum); ≈2.03 bytes per parameter. Tensors under `MIN_8BIT_SIZE` values keep fp32 states (their bytes
  do not matter and the biases of small layers are the most sensitive).
* **Adafactor** (Shazeer & Stern 2018, arXiv 1804.04235) without momentum, with update clipping, at a fixed
  learning rate: the second moment of each weight of two or more dimensions is kept as a row and a column
  factor of its matrix view (out × in·k·k), a few bytes per *row*; transformers' Adafactor factors only the last
  two dimensions, which for a 3×3 convolution keeps 2/3 of a full second moment.

Weights are fp32 ("master weights", the update applied exactly) or bf16: each update is computed in fp32 and
rounded to bf16 **stochastically** (round up with probability equal to the remainder's share of the gap), so the
expected weight equals the fp32 result and updates far below bf16's resolution still move the weights on
average (Gupta et al. 2015; the rounding noise of step `s` comes from a generator seeded by (seed, s, parameter),
so a resumed run draws the same noise).

`fuse_into_backward` registers `Tensor.register_post_accumulate_grad_hook` (torch ≥ 2.1) on every parameter: its
update runs as soon as its gradient is complete and the gradient is freed at once, so at most a few gradients
exist at any time instead of a full copy of the model. The whole gradient is never seen at once, hence: no
gradient accumulation (the first micro-batch's gradient would already have been applied), gradient clipping by
each tensor's own norm (as sd-scripts' fused backward pass does) instead of the global norm, no fp16 loss scaling,
and a single process (DDP reduces gradients in buckets after these hooks). `trainer.memory` refuses those
combinations before a run starts.
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

BLOCK = 256
MIN_8BIT_SIZE = 4096


class UpdateRule(str, enum.Enum):
    ADAMW = "adamw"
    ADAMW_8BIT = "adamw8bit"
    ADAFACTOR = "adafactor"


# ----------------------------------------------------------------------------------------------------------------
# 8-bit block-wise codes


def _log_levels(count: int, smallest: float) -> torch.Tensor:
    """`count` magnitudes from `smallest` to 1, evenly spaced in log scale."""
    return torch.logspace(math.log10(smallest), 0.0, count, dtype=torch.float64).float()


# m: sign × {0, 127 log-spaced magnitudes from 1e-3 to 1} (int8 codes −127…127); v ≥ 0: 256 log-spaced values
# from 1e-6 to 1 with no zero (uint8). Both level ratios are ≈1.056, so a value within range is stored within
# 2.7 %. Below range, m rounds to 0 or 1e-3 of its block's maximum, and v rounds *up* to 1e-6 of it: the update of
# a weight whose gradient is a thousand times smaller than its block's largest is damped, never amplified (a v
# rounded to 0 would divide by ε alone). Wider ranges tracked fp32 AdamW less closely in
# tests/test_train_memory.py (1e-5/1e-10: 11.7 % of the distance travelled apart; these: 6.9 %).
SIGNED_LEVELS = torch.cat([torch.zeros(1), _log_levels(127, 1e-3)])
UNSIGNED_LEVELS = _log_levels(256, 1e-6)


def _midpoints(levels: torch.Tensor) -> torch.Tensor:
    return (levels[1:] + levels[:-1]) / 2


_SIGNED_BOUNDS = _midpoints(SIGNED_LEVELS)
_UNSIGNED_BOUNDS = _midpoints(UNSIGNED_LEVELS)


def _blocks(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1)
    pad = (-flat.numel()) % BLOCK
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, BLOCK)


def quantize_blockwise(x: torch.Tensor, *, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, absmax) of `x` (fp32): int8 codes for signed values, uint8 for non-negative ones; one fp32 absmax
    per block of `BLOCK` values. Each value maps to the nearest level of its block's code book."""
    blocks = _blocks(x.float())
    absmax = blocks.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    normalized = blocks / absmax[:, None]
    bounds = (_SIGNED_BOUNDS if signed else _UNSIGNED_BOUNDS).to(x.device)
    index = torch.bucketize(normalized.abs(), bounds, out_int32=True)
    if signed:
        codes = (index * torch.sign(normalized).to(torch.int32)).to(torch.int8)
    else:
        codes = index.to(torch.uint8)
    return codes, absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The fp32 values of `quantize_blockwise`'s output, in `shape`."""
    if codes.dtype == torch.int8:
        index = codes.to(torch.int64)
        values = SIGNED_LEVELS.to(codes.device)[index.abs()] * torch.sign(index)
    else:
        values = UNSIGNED_LEVELS.to(codes.device)[codes.to(torch.int64)]
    flat = (values * absmax[:, None]).reshape(-1)
    return flat[:math.prod(shape)].view(shape)


# ----------------------------------------------------------------------------------------------------------------
# stochastic rounding to bf16


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`x` (fp32) rounded to bf16 up or down at random, up with probability (x − down) / (up − down): unbiased.

    bf16 is fp32 without its low 16 mantissa bits; adding a uniform random 16-bit integer to those bits and
    truncating carries into the kept bits exactly with that probability (sign-magnitude: the same holds for
    negative values, by symmetry). Non-finite values are left to ordinary rounding.
    """
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    rounded = ((bits + noise) & -65536).view(torch.float32)
    rounded = torch.where(torch.isfinite(x), rounded, x)
    return rounded.to(torch.bfloat16)  # exact: the low bits are zero


def _seed(*parts: object) -> int:
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


# ----------------------------------------------------------------------------------------------------------------
# the optimizer


def _matrix_shape(shape: torch.Size) -> tuple[int, int] | None:
    """The (rows, columns) Adafactor factors a tensor over (out × everything else), or None for vectors."""
    if len(shape) < 2:
        return None
    return shape[0], math.prod(shape[1:])


class LowMemoryOptimizer(torch.optim.Optimizer):
    """AdamW, 8-bit AdamW or Adafactor, one parameter at a time, into fp32 or bf16 (stochastically rounded) weights.

    `step()` updates every parameter that has a gradient; `step_param(p)` updates one (what the fused backward
    hooks call). The state dict holds tensors and numbers only (loadable with `torch.load(weights_only=True)`).
    """

    def __init__(self, params: Iterable[nn.Parameter], *, rule: UpdateRule | str, lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 seed: int = 0, adafactor_eps: tuple[float, float] = (1e-30, 1e-3), clip_threshold: float = 1.0,
                 decay_rate: float = -0.8):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adafactor_eps=adafactor_eps,
                        clip_threshold=clip_threshold, decay_rate=decay_rate)
        super().__init__(params, defaults)
        self.rule = UpdateRule(rule)
        self.seed = seed
        self._index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        self._group = {p: g for g in self.param_groups for p in g["params"]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loading, except that state tensors keep their dtype: torch casts every floating-point state to
        the parameter's dtype, which would round fp32 moments of bf16 weights and turn 8-bit codes into floats."""
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for index, entries in saved.items():
            p = params[int(index)]
            self.state[p] = {key: (value.to(p.device, copy=True) if key != "step" else value.clone())
                             if torch.is_tensor(value) else value for key, value in entries.items()}
        self._group = {p: g for g in self.param_groups for p in g["params"]}  # torch made new group dicts

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.step_param(p)
        return loss

    @torch.no_grad()
    def step_param(self, p: nn.Parameter) -> None:
        """Apply this rule's update to `p` from `p.grad` (which is left in place)."""
        group, state = self._group[p], self.state[p]
        grad = p.grad.float()
        weights = p.float() if p.dtype != torch.float32 else p
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
        state["step"] += 1
        step = int(state["step"].item())
        if self.rule is UpdateRule.ADAFACTOR:
            new = self._adafactor(weights, grad, state, group, step)
        else:
            new = self._adamw(weights, grad, state, group, step)
        if p.dtype == torch.bfloat16:
            generator = torch.Generator(device=p.device).manual_seed(_seed("sr", self.seed, step, self._index[p]))
            p.copy_(stochastic_round_to_bf16(new, generator))
        elif new is not p:
            p.copy_(new)

    # --- AdamW (torch.optim.AdamW's arithmetic), states in fp32 or 8-bit

    def _moments(self, p: torch.Tensor, state: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        eight_bit = self.rule is UpdateRule.ADAMW_8BIT and p.numel() >= MIN_8BIT_SIZE
        if "exp_avg" in state:
            return state["exp_avg"], state["exp_avg_sq"]
        if eight_bit and "exp_avg_codes" in state:
            return (dequantize_blockwise(state["exp_avg_codes"], state["exp_avg_absmax"], p.shape),
                    dequantize_blockwise(state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"], p.shape))
        zeros = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        return zeros, zeros.clone()

    def _store_moments(self, p: torch.Tensor, state: dict[str, Any], m: torch.Tensor, v: torch.Tensor) -> None:
        if self.rule is UpdateRule.ADAMW_8BIT and p.numel() >= MIN_8BIT_SIZE:
            state["exp_avg_codes"], state["exp_avg_absmax"] = quantize_blockwise(m, signed=True)
            state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"] = quantize_blockwise(v, signed=False)
        else:
            state["exp_avg"], state["exp_avg_sq"] = m, v

    def _adamw(self, weights: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any],
               step: int) -> torch.Tensor:
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        m, v = self._moments(weights, state)
        weights.mul_(1 - lr * group["weight_decay"])
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias1, bias2 = 1 - beta1 ** step, 1 - beta2 ** step
        denominator = (v.sqrt() / math.sqrt(bias2)).add_(eps)
        weights.addcdiv_(m, denominator, value=-lr / bias1)
        self._store_moments(weights, state, m, v)
        return weights

    # --- Adafactor (no momentum, fixed learning rate, update clipping; transformers' arithmetic on 2-D tensors)

    def _adafactor(self, weights: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any],
                   step: int) -> torch.Tensor:
        lr, eps1 = group["lr"], group["adafactor_eps"][0]
        beta2 = 1.0 - step ** group["decay_rate"]
        matrix = _matrix_shape(grad.shape)
        squared = grad.square().add_(eps1)
        if matrix is not None:
            g2 = squared.view(matrix)
            if "exp_avg_sq_row" not in state:
                state["exp_avg_sq_row"] = torch.zeros(matrix[0], device=grad.device)
                state["exp_avg_sq_col"] = torch.zeros(matrix[1], device=grad.device)
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2).add_(g2.mean(dim=1), alpha=1 - beta2)
            col.mul_(beta2).add_(g2.mean(dim=0), alpha=1 - beta2)
            # v ≈ row · colᵀ / mean(row): the rank-1 estimate of the second moment (paper, Algorithm 4)
            row_factor = (row / row.mean()).rsqrt_().unsqueeze(1)
            update = (row_factor * col.rsqrt().unsqueeze(0)).view(grad.shape).mul_(grad)
        else:
            if "exp_avg_sq" not in state:
                state["exp_avg_sq"] = torch.zeros_like(grad)
            v = state["exp_avg_sq"]
            v.mul_(beta2).add_(squared, alpha=1 - beta2)
            update = v.rsqrt().mul_(grad)
        rms = update.norm(2) / math.sqrt(update.numel())
        update.div_((rms / group["clip_threshold"]).clamp_(min=1.0))
        if group["weight_decay"]:
            weights.add_(weights, alpha=-group["weight_decay"] * lr)
        weights.add_(update, alpha=-lr)
        return weights


# ----------------------------------------------------------------------------------------------------------------
# the optimizer step fused into the backward pass


def fuse_into_backward(params: Iterable[nn.Parameter], optimizer: LowMemoryOptimizer,
                       max_grad_norm: float = 0.0) -> list[Any]:
    """Update each parameter as soon as its gradient is complete and free that gradient (module docstring).

    `max_grad_norm` > 0 clips each tensor's gradient to that norm. Returns the hook handles (`.remove()` them to
    return to ordinary steps).
    """

    def hook(p: nn.Parameter) -> None:
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p], max_grad_norm)
        optimizer.step_param(p)
        p.grad = None

    return [p.register_post_accumulate_grad_hook(hook) for p in params if p.requires_grad]


# ----------------------------------------------------------------------------------------------------------------
# weight precision


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.GroupNorm | nn.LayerNorm | nn.BatchNorm2d)


def cast_weights_to_bf16(model: nn.Module) -> int:
    """Store every parameter in bf16 except those of normalisation layers (a few thousand values in a UNet, kept
    in fp32 because ldm's norms compute in fp32). Returns the number of parameters cast."""
    keep = {id(p) for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False)}
    cast = 0
    for p in model.parameters():
        if id(p) not in keep and p.dtype == torch.float32:
            p.data = p.data.to(torch.bfloat16)
            cast += p.numel()
    return cast
