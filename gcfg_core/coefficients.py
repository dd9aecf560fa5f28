"""The coefficient of every row source of GCFG, per step and per image: the one place that computes ``1 − Σw``.

Paper Eq. 3 (Cao et al. 2023, arXiv 2312.08195), ``E₀ + Σᵢ wᵢ (Eᵢ − E₀)``, written as an affine combination for
image b of a batch::

    D̂_b = c₀·E₀ + Σⱼ pⱼ·Pⱼ + n·N + Σₖ tₖ·Tₖ        with   c₀ = 1 − Σⱼ pⱼ − n − Σₖ tₖ

* E₀ — the unconditional prediction (the prior with the empty prompt, or whatever the uncond source is);
* Pⱼ — the prompt's parts: one, or the WebUI's AND sub-prompts with weights aⱼ: ``pⱼ = m·s·aⱼ`` (s = CFG scale);
* N — the image's negative prompt, if it has one;
* Tₖ — the concept term and the extra terms active at this step: ``tₖ = m·wₖ``.

Every weight a user types is on the CFG scale. A host that rescales CFG gives its `multiplier` m (DDIM CFG++
divides the CFG scale by 12.5, i.e. m = 1/12.5) and every weight is scaled by it, so that ``+w text`` stays
exactly the AND prompt ``text :w/s`` on every sampler.

The negative prompt:

* classic (`negative_scale` None): the negative prompt takes E₀'s place, as in the WebUI's own CFG:
  ``n = 1 − Σp − Σt`` and c₀ = 0, so the prior is never evaluated (paper app. B);
* a number n: the negative prompt is a term of weight m·n; E₀ carries the rest;
* an image without a negative prompt (empty text) has no negative term at all: n = 0 and E₀ carries ``1 − Σ``.

A coefficient that floating-point rounding leaves a hair away from 0 (``1 − s − fl(1 − s)`` ≈ 1e-16) is 0:
a source whose coefficient is 0 at a step is never evaluated (`StepCoefficients.needs_uncond` and friends).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from gcfg_core.terms import GuidanceTerm, check_step

# Relative to the weights involved: 1 − s − fl(1 − s) and friends are exact zeros that rounding missed.
_ZERO_TOLERANCE = 1e-12

# What DDIM CFG++ multiplies the CFG scale by (the WebUI's `cond_scale_miltiplier`).
CFG_PLUS_PLUS_MULTIPLIER = 1 / 12.5


@dataclass(frozen=True)
class GuidanceWeights:
    """The weights of one generation, as the user typed them (CFG scale units), and the host's CFG multiplier."""

    cfg_scale: float
    negative_scale: float | None = None  # None: classic, the negative prompt takes the unconditional's place
    terms: tuple[GuidanceTerm, ...] = ()  # the concept term and the extra terms
    multiplier: float = 1.0

    def __post_init__(self) -> None:
        for name in ("cfg_scale", "multiplier"):
            _check_finite(name, getattr(self, name))
        if self.negative_scale is not None:
            _check_finite("negative_scale", self.negative_scale)
        object.__setattr__(self, "terms", tuple(self.terms))
        for term in self.terms:
            if not isinstance(term, GuidanceTerm):
                raise ValueError(f"terms must be GuidanceTerm objects, got {term!r}")


def _check_finite(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


@dataclass(frozen=True)
class ImageCoefficients:
    """One image's coefficients: E₀, its negative prompt, and each part of its prompt."""

    uncond: float
    negative: float
    prompt: tuple[float, ...]


@dataclass(frozen=True)
class StepCoefficients:
    """Every non-zero coefficient of one denoiser call: per image, and the active terms (shared by all images)."""

    images: tuple[ImageCoefficients, ...]
    terms: tuple[tuple[GuidanceTerm, float], ...]

    @property
    def batch_size(self) -> int:
        return len(self.images)

    def needs_uncond(self, image: int) -> bool:
        """Whether image `image` needs E₀ evaluated (its coefficient is not 0)."""
        return self.images[image].uncond != 0.0

    def needs_negative(self, image: int) -> bool:
        return self.images[image].negative != 0.0

    @property
    def uncond_images(self) -> list[int]:
        return [image for image in range(self.batch_size) if self.needs_uncond(image)]

    @property
    def negative_images(self) -> list[int]:
        return [image for image in range(self.batch_size) if self.needs_negative(image)]


def _snap_zero(value: float, scale: float) -> float:
    return 0.0 if abs(value) <= _ZERO_TOLERANCE * (1.0 + scale) else value


def active_terms(terms: Sequence[GuidanceTerm], step: int, steps: int,
                 multiplier: float = 1.0) -> tuple[tuple[GuidanceTerm, float], ...]:
    """The terms active at 0-based `step` of `steps` with their coefficients (m·w), zero weights left out."""
    check_step(step, steps)
    return tuple((term, multiplier * term.weight) for term in terms
                 if term.weight != 0.0 and term.is_active(step, steps))


def step_coefficients(weights: GuidanceWeights, prompt_weights: Sequence[Sequence[float]],
                      has_negative: Sequence[bool], step: int, steps: int) -> StepCoefficients:
    """The coefficients of E₀, N, the prompt parts and the active terms at 0-based `step` of `steps`.

    `prompt_weights[b]` are image b's prompt-part weights aⱼ (``[1.0]`` for a plain prompt, the WebUI's AND
    weights otherwise); `has_negative[b]` whether image b has a non-empty negative prompt.
    """
    if len(prompt_weights) != len(has_negative):
        raise ValueError(f"prompt_weights has {len(prompt_weights)} images but has_negative {len(has_negative)}")
    m = weights.multiplier
    terms = active_terms(weights.terms, step, steps, m)
    term_sum = math.fsum(coefficient for _, coefficient in terms)
    term_scale = math.fsum(abs(coefficient) for _, coefficient in terms)
    images = []
    for parts, negative_present in zip(prompt_weights, has_negative, strict=True):
        prompt = tuple(m * weights.cfg_scale * float(a) for a in parts)
        prompt_sum = math.fsum(prompt)
        scale = math.fsum(abs(c) for c in prompt) + term_scale
        if negative_present and weights.negative_scale is None:
            negative = _snap_zero(math.fsum([1.0, -prompt_sum, -term_sum]), scale)
            images.append(ImageCoefficients(0.0, negative, prompt))
            continue
        negative = m * float(weights.negative_scale) if negative_present else 0.0
        uncond = _snap_zero(math.fsum([1.0, -prompt_sum, -negative, -term_sum]), scale + abs(negative))
        images.append(ImageCoefficients(uncond, negative, prompt))
    return StepCoefficients(tuple(images), terms)
