"""Guidance terms and plans of Generalized Classifier-free Guidance (Cao et al. 2023, arXiv 2312.08195, Eq. 3).

A *plan* is an unconditional source plus signed terms. At a step it gives each term's final coefficient::

    D = c₀·D₀ + Σᵢ wᵢ·Dᵢ      with c₀ = 1 − Σᵢ wᵢ   (only the terms active at that step count)

which is Eq. 3, ``D₀ + Σᵢ wᵢ (Dᵢ − D₀)``, written as an affine combination. Terms whose coefficient is 0
are dropped so that they are never evaluated.

A term's model is a plain string: one of the slots in `ModelSlot` (``"prior"``, ``"main"``, ``"concept"``) or
any other name (a checkpoint name); whoever runs the plan maps names to denoisers.

Step windows: step ``i`` (0-based) of ``n`` is active iff ``start ≤ i / n < end``. So ``StepWindow(0, 0.5)``
with 20 steps covers steps 0–9 and ``StepWindow(0.5, 1)`` covers steps 10–19; the two always partition the
steps exactly. Which step a sampler's model call belongs to is decided by its σ (`gcfg_core.denoiser.step_index`).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass

# Coefficients this close to 0 (relative to the weights involved) are exact zeros that floating point
# rounding missed: the classic negative term has weight fl(1 − s), so 1 − s − fl(1 − s) can be ~1e-16.
_ZERO_TOLERANCE = 1e-12


class ModelSlot(str, enum.Enum):
    """The model slots every GCFG run knows; a term's model may also be any other (checkpoint) name."""

    PRIOR = "prior"
    MAIN = "main"
    CONCEPT = "concept"


@dataclass(frozen=True)
class StepWindow:
    """A fraction-of-schedule interval ``[start, end)``; step i of n is active iff start ≤ i/n < end."""

    start: float = 0.0
    end: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.start) and math.isfinite(self.end)):
            raise ValueError(f"step window bounds must be finite numbers, got {self.start!r}-{self.end!r}")
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ValueError(f"step window must satisfy 0 ≤ start < end ≤ 1, got {self.start:g}-{self.end:g}")

    def is_active(self, step: int, steps: int) -> bool:
        """Whether 0-based step `step` of `steps` falls in the window: ``start ≤ step/steps < end``."""
        _check_step(step, steps)
        # Float division, not start·steps: step/steps rounds to the same double as the decimal the user wrote
        # (3/10 == 0.3), whereas 0.3·10 == 3.0000000000000004 would switch one step late.
        return self.start <= step / steps < self.end

    @property
    def is_full(self) -> bool:
        return self.start == 0.0 and self.end == 1.0


def _check_step(step: int, steps: int) -> None:
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    if not 0 <= step < steps:
        raise ValueError(f"step must be in [0, {steps}), got {step}")


@dataclass(frozen=True)
class GuidanceTerm:
    """One GCFG term: model `model` evaluated with prompt `cond` (None = no text), signed weight, optional window."""

    model: str
    cond: str | None
    weight: float
    window: StepWindow | None = None
    label: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"term model must be a non-empty name, got {self.model!r}")
        if isinstance(self.model, ModelSlot):  # store the plain value so that equality and hashing are by text
            object.__setattr__(self, "model", self.model.value)
        if self.cond is not None and not isinstance(self.cond, str):
            raise ValueError(f"term condition must be a prompt string or None, got {self.cond!r}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, int | float) or not math.isfinite(self.weight):
            raise ValueError(f"term weight must be a finite number, got {self.weight!r}")
        object.__setattr__(self, "weight", float(self.weight))
        if self.window is not None and not isinstance(self.window, StepWindow):
            raise ValueError(f"term window must be a StepWindow or None, got {self.window!r}")
        if self.window is not None and self.window.is_full:  # one spelling of "always on", so that equality holds
            object.__setattr__(self, "window", None)

    def is_active(self, step: int, steps: int) -> bool:
        return self.window is None or self.window.is_active(step, steps)

    @property
    def key(self) -> tuple[str, str | None]:
        """What has to be evaluated for this term: (model, condition)."""
        return (self.model, self.cond)


@dataclass(frozen=True)
class GuidancePlan:
    """The unconditional source (`uncond_model` with prompt `uncond_cond`) plus the GCFG terms."""

    uncond_model: str
    terms: tuple[GuidanceTerm, ...] = ()
    uncond_cond: str | None = ""

    def __post_init__(self) -> None:
        if not isinstance(self.uncond_model, str) or not self.uncond_model.strip():
            raise ValueError(f"uncond model must be a non-empty name, got {self.uncond_model!r}")
        if isinstance(self.uncond_model, ModelSlot):
            object.__setattr__(self, "uncond_model", self.uncond_model.value)
        object.__setattr__(self, "terms", tuple(self.terms))
        for term in self.terms:
            if not isinstance(term, GuidanceTerm):
                raise ValueError(f"plan terms must be GuidanceTerm objects, got {term!r}")

    @property
    def uncond_term(self) -> GuidanceTerm:
        """The unconditional source as a term (its `weight` field is unused; see `coefficients`)."""
        return GuidanceTerm(self.uncond_model, self.uncond_cond, 0.0, label="uncond")

    def coefficients(self, step: int, steps: int) -> list[tuple[GuidanceTerm, float]]:
        """Every non-zero coefficient at 0-based `step` of `steps`: uncond (1 − Σ active wᵢ) first, then the terms."""
        _check_step(step, steps)
        active = [term for term in self.terms if term.is_active(step, steps)]
        weights = [term.weight for term in active]
        uncond = math.fsum([1.0, *(-w for w in weights)])
        if abs(uncond) <= _ZERO_TOLERANCE * (1.0 + math.fsum(abs(w) for w in weights)):
            uncond = 0.0
        pairs = [(self.uncond_term, uncond), *((term, term.weight) for term in active)]
        return [(term, coefficient) for term, coefficient in pairs if coefficient != 0.0]

    def models(self) -> frozenset[str]:
        """Every model name the plan may use at some step."""
        return frozenset([self.uncond_model, *(term.model for term in self.terms)])


def standard_plan(
    cfg_scale: float,
    prompt: str,
    negative_prompt: str = "",
    negative_scale: float | None = None,
    concept_weight: float = 0.0,
    extra_terms: Iterable[GuidanceTerm] = (),
    *,
    prior_slot: str = ModelSlot.PRIOR.value,
    main_slot: str = ModelSlot.MAIN.value,
    concept_slot: str = ModelSlot.CONCEPT.value,
) -> GuidancePlan:
    """The plan of a usual request: uncond from the prior, prompt at `cfg_scale`, negative, concept, extra terms.

    * the prompt is a `main` term with weight `cfg_scale` (paper: control guidance);
    * a non-empty negative prompt with `negative_scale` None ("classic") takes the unconditional role itself, as in
      the WebUI: the uncond source is the main model with the negative prompt, its coefficient ``1 − Σ wᵢ``
      (``1 − cfg_scale`` when there are no other terms, the paper's classic negative weight), so the prior is
      never evaluated (paper app. B);
    * a non-empty negative prompt with a number is a `main` term of that weight; the prior carries the rest;
    * an empty negative prompt is no term at all: the prior carries ``1 − cfg_scale`` (minus the other weights);
    * `concept_weight` ≠ 0 adds the text-free `concept` term (cond None);
    * `extra_terms` are appended as they are.
    """
    terms = [GuidanceTerm(main_slot, prompt, cfg_scale, label="prompt")]
    classic_negative = bool(negative_prompt) and negative_scale is None
    if negative_prompt and not classic_negative:
        terms.append(GuidanceTerm(main_slot, negative_prompt, negative_scale, label="negative"))
    if concept_weight:
        terms.append(GuidanceTerm(concept_slot, None, concept_weight, label="concept"))
    terms.extend(extra_terms)
    if classic_negative:
        return GuidancePlan(main_slot, tuple(terms), uncond_cond=negative_prompt)
    return GuidancePlan(prior_slot, tuple(terms))
