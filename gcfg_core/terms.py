"""Guidance terms of Generalized Classifier-free Guidance (Cao et al. 2023, arXiv 2312.08195, Eq. 3).

A term is one model evaluated with one condition and a signed weight, optionally only in a window of the
schedule; `gcfg_core.coefficients` turns the terms into the coefficients of each step.

A term's model is a plain string: one of the slots in `ModelSlot` (``"prior"``, ``"main"``, ``"concept"``) or
any other name (a checkpoint name); whoever runs the plan maps names to denoisers.

Step windows: step ``i`` (0-based) of ``n`` is active iff ``start ≤ i / n < end``. So ``StepWindow(0, 0.5)``
with 20 steps covers steps 0–9 and ``StepWindow(0.5, 1)`` covers steps 10–19; the two always partition the
steps exactly. Which step a sampler's model call belongs to is decided by its σ (`gcfg_core.denoiser.step_index`).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

# Every weight a user types (concept weight, negative scale, extra terms) lies within ±MAX_WEIGHT, the WebUI's CFG
# scale maximum: far beyond any useful guidance, and small enough that a typo such as 1e30 is refused before
# sampling instead of overflowing it.
MAX_WEIGHT = 30.0


def weight_range_problem(value: float) -> str | None:
    """The message for a weight outside [−MAX_WEIGHT, MAX_WEIGHT] (None when it is inside)."""
    if -MAX_WEIGHT <= value <= MAX_WEIGHT:
        return None
    return f"{value:g} is outside [{-MAX_WEIGHT:g}, {MAX_WEIGHT:g}]"


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
        check_step(step, steps)
        # Float division, not start·steps: step/steps rounds to the same double as the decimal the user wrote
        # (3/10 == 0.3), whereas 0.3·10 == 3.0000000000000004 would switch one step late.
        return self.start <= step / steps < self.end

    @property
    def is_full(self) -> bool:
        return self.start == 0.0 and self.end == 1.0


def check_step(step: int, steps: int) -> None:
    """Raise a ValueError unless 0 ≤ `step` < `steps` (0-based step of a schedule of `steps` steps)."""
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
