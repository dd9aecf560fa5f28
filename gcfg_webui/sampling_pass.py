"""What every host adapter keeps per sampler run ("pass"): the schedule it runs, GCFG's step of a call, and the row
statistics behind GET /gcfg/v1/last-run.

GCFG's step of a denoiser call is the position of its σ (or timestep) in the schedule the sampler runs, not a count
of denoiser calls: step i of n covers ``σᵢ ≥ σ > σᵢ₊₁`` (`gcfg_core.denoiser.step_index`), so a Heun corrector at
σᵢ₊₁ belongs to step i+1 and a window ``{a-b}`` selects the same steps as in the standalone sampler. For img2img and
the hires pass the schedule is the part that runs: its start is the σ of the first call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gcfg_core.denoiser import step_index

TermKey = tuple[str, str | None]


def unique_keys(terms) -> list[TermKey]:
    """The distinct (model, prompt) pairs that the terms need evaluators for, in first-use order."""
    return list(dict.fromkeys(term.key for term in terms))


@dataclass
class Schedule:
    """The σ (or timestep) points of the schedule a sampler computed, in descending order."""

    points: list[float]
    start: int | None = None  # index of the first point this pass runs (img2img and hires start later)

    @classmethod
    def captured(cls, values, descending: bool) -> Schedule:
        points = [float(v) for v in torch.as_tensor(values).flatten().tolist()]
        return cls(points if descending else points[::-1])

    def step_of(self, value: float) -> tuple[int, int] | None:
        """(step, steps) of a call at σ `value`; None when the schedule is too short to tell."""
        if len(self.points) < 2:
            return None
        if self.start is None:
            self.start = step_index(value, torch.tensor(self.points, dtype=torch.float64))
        tail = self.points[self.start:]
        if len(tail) < 2:
            return 0, 1
        return step_index(value, torch.tensor(tail, dtype=torch.float64)), len(tail) - 1


@dataclass
class RowStats:
    """UNet rows and calls per denoiser call, by model: the host's own rows and the ones GCFG adds."""

    calls: int = 0
    webui_rows: int = 0
    extra_rows: dict[str, int] = field(default_factory=dict)
    model_calls: dict[str, int] = field(default_factory=dict)
    skipped_calls: int = 0
    routed_calls: int = 0
    path: str = "overwrite"  # "routed" when the fast path may run; "overwrite" when routing is off
    step_source: str = "schedule"  # "schedule" (σ or timestep position) or "calls" (denoiser call count)
    steps_seen: list[int] = field(default_factory=list)  # the GCFG step index of each denoiser call

    def add(self, model: str, rows: int) -> None:
        self.extra_rows[model] = self.extra_rows.get(model, 0) + rows

    def add_call(self, model: str) -> None:
        self.model_calls[model] = self.model_calls.get(model, 0) + 1

    def per_call(self) -> dict[str, float]:
        calls = max(self.calls, 1)
        summary = {"webui": self.webui_rows / calls}
        summary.update({name: rows / calls for name, rows in sorted(self.extra_rows.items())})
        return summary

    def calls_per_call(self) -> dict[str, float]:
        """UNet calls per denoiser call by model (the main model's count includes the host's own calls)."""
        calls = max(self.calls, 1)
        return {name: count / calls for name, count in sorted(self.model_calls.items())}


def pass_is_noop(weights, has_negative, prior, host_row_is_uncond: bool) -> bool:
    """Whether no call of a pass can change a row: no terms, a classic negative, and E₀ wanted nowhere (every
    image has its own negative prompt, or there is no prior and the host's uncond row is E₀ itself)."""
    return (not weights.terms and weights.negative_scale is None
            and (all(has_negative) or (prior is None and host_row_is_uncond)))
