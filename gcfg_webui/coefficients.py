"""Per-step, per-image GCFG coefficients on top of the WebUI's own CFG combination (paper Eq. 3, arXiv 2312.08195).

The WebUI combines, per image i, ``U + s·Σⱼ aᵢⱼ (Xᵢⱼ − U)`` with U its uncond row (the negative prompt) and aᵢⱼ the
AND weights. GCFG wants ``c₀·E₀ + s·Σⱼ aᵢⱼ Xᵢⱼ + w_neg·N + Σₖ wₖ Tₖ`` with the coefficients summing to 1, where E₀ is
the unconditional prediction (the prior's, or the current model's for the empty prompt), N the negative prompt's
prediction and Tₖ the extra terms (concept model included). This module computes those coefficients; the hook
decides from them which rows to evaluate (a coefficient of 0 is never evaluated).

"Classic" negative scale: the negative prompt takes the unconditional role, i.e. its weight is whatever makes
c₀ = 0 (``1 − s·Σaᵢⱼ − Σwₖ``; ``1 − CFG`` without AND weights or extra terms), exactly the WebUI's own CFG. So a
classic negative never runs the prior. An empty negative prompt is no term at all: E₀ then carries ``1 − Σ``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from gcfg_core.terms import GuidanceTerm

_ZERO_TOLERANCE = 1e-12


@dataclass(frozen=True)
class StepCoefficients:
    """Coefficients of one denoiser call: per image (lists of length B) and per active non-zero extra term."""

    uncond: tuple[float, ...]
    negative: tuple[float, ...]
    terms: tuple[tuple[GuidanceTerm, float], ...]

    @property
    def batch_size(self) -> int:
        return len(self.uncond)


def _snap_zero(value: float, scale: float) -> float:
    return 0.0 if abs(value) <= _ZERO_TOLERANCE * (1.0 + scale) else value


def active_terms(terms: Sequence[GuidanceTerm], step: int, steps: int) -> tuple[tuple[GuidanceTerm, float], ...]:
    """The extra terms active at 0-based denoiser call `step` of `steps`, without zero weights."""
    steps = max(int(steps), 1)
    step = min(max(int(step), 0), steps - 1)  # adaptive samplers may call the denoiser more often than estimated
    return tuple((term, term.weight) for term in terms if term.weight != 0.0 and term.is_active(step, steps))


def step_coefficients(
    cond_scale: float,
    and_weight_sums: Sequence[float],
    has_negative: Sequence[bool],
    negative_scale: float | None,
    terms: Sequence[GuidanceTerm],
    step: int,
    steps: int,
) -> StepCoefficients:
    """Coefficients of E₀, N (per image) and the active extra terms at one denoiser call.

    `cond_scale` is the scale the WebUI passes to `combine_denoised` (CFG scale times its multiplier),
    `and_weight_sums[i]` the sum of image i's AND weights, `has_negative[i]` whether image i has a non-empty
    negative prompt in this pass, `negative_scale` None for classic.
    """
    if len(and_weight_sums) != len(has_negative):
        raise ValueError(f"and_weight_sums has {len(and_weight_sums)} images but has_negative {len(has_negative)}")
    active = active_terms(terms, step, steps)
    extra_sum = math.fsum(weight for _, weight in active)
    uncond, negative = [], []
    for and_sum, has_neg in zip(and_weight_sums, has_negative, strict=True):
        prompt_sum = cond_scale * and_sum
        scale = abs(prompt_sum) + math.fsum(abs(weight) for _, weight in active)
        if has_neg and negative_scale is None:
            negative.append(_snap_zero(math.fsum([1.0, -prompt_sum, -extra_sum]), scale))
            uncond.append(0.0)
            continue
        neg = float(negative_scale) if has_neg else 0.0
        negative.append(neg)
        uncond.append(_snap_zero(math.fsum([1.0, -prompt_sum, -neg, -extra_sum]), scale + abs(neg)))
    return StepCoefficients(tuple(uncond), tuple(negative), active)
