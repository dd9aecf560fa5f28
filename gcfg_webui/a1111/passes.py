"""One sampler run ("pass") on A1111: its fixed plan, and the controller that owns the state of each denoiser call.

A pass is one `sample()`/`sample_img2img()` of one sampler object: the first pass, then the hires pass with its
own sampler. `process_before_every_sampling` builds a `PassPlan` and a `PassController` for it; the controller
is the single owner of what changes during the run (the call in progress, the captured schedule, the
statistics), and the hooks in `routing`, `combine` and `install` only call its methods.

GCFG's step of a denoiser call is the position of its σ (k-diffusion) or timestep (DDIM/PLMS/UniPC) in the
schedule the sampler runs, not a count of denoiser calls: step i of n covers ``σᵢ ≥ σ > σᵢ₊₁``, so a Heun or
DPM2 corrector at σᵢ₊₁ belongs to step i+1 and a window ``{a-b}`` selects the same steps as in the standalone
sampler (`gcfg_core.denoiser.step_index`). For img2img and the hires pass the schedule is the part that runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from torch import Tensor

from gcfg_core.coefficients import GuidanceWeights, StepCoefficients, step_coefficients
from gcfg_webui.a1111.rows import Condition, ModelRunner, RowSource, RowStats, TermKey, unique_keys
from gcfg_webui.sampling_pass import Schedule, pass_is_noop
from gcfg_webui.uncond_slot import ImageNeeds, image_needs

logger = logging.getLogger("gcfg.a1111.passes")


@dataclass(frozen=True)
class PassPlan:
    """What one pass evaluates: the weights, each image's negative prompt, and a row source per (model, prompt)."""

    weights: GuidanceWeights  # cfg_scale is replaced at each call by the scale the WebUI combines with
    has_negative: tuple[bool, ...]
    sources: dict[TermKey, RowSource]
    prior: RowSource | None  # E₀ from the prior; None: E₀ is the current model's empty prompt
    main_empty: RowSource | None  # E₀ from the current model (the empty prompt, or the prompt: autoguidance)
    uses_side_models: bool = False
    host_row_is_uncond: bool = True  # the WebUI's uncond row of an image without negative prompt is E₀ itself

    @property
    def classic(self) -> bool:
        return self.weights.negative_scale is None

    @property
    def is_noop(self) -> bool:
        return pass_is_noop(self.weights, self.has_negative, self.prior, self.host_row_is_uncond)


@dataclass(frozen=True)
class Routed:
    """What the fast path evaluated inside the WebUI's batched call, for the combine step of the same call."""

    needs: tuple[ImageNeeds, ...]  # what each image's uncond row of x_out holds now
    negatives: dict[int, Tensor]  # image → its N row, kept aside where the uncond row holds E₀
    predictions: dict[TermKey, Tensor]  # every active term's rows (all images)
    uncond_condition: Condition  # the WebUI's conditioning of its B uncond rows


@dataclass
class CallState:
    """One denoiser call in progress: its batched inputs (from `on_cfg_denoiser`) and what has run so far."""

    params: object
    webui_rows: int = 0  # rows of the WebUI's own inner-model calls seen during this call
    routed: Routed | None = None


class CurrentModel:
    """The WebUI's current model through the original forward of the sampler's inner-model wrapper (a refiner
    switch replaces the wrapper); `runner` is the one runner every current-model row of a pass goes through, so
    that they can share one UNet call."""

    def __init__(self, forward: Callable) -> None:
        self.forward = forward
        self.runner = ModelRunner("main", lambda x, sigma, condition: self.forward(x, sigma, cond=condition))


@dataclass
class PassController:
    """The state owner of one pass: the plan, the call in progress, the schedule, the statistics."""

    denoiser: object
    plan: PassPlan
    current: CurrentModel
    routing: bool
    rebuild: Callable[[], PassPlan] | None = None  # a new plan for the current model after a refiner switch
    stats: RowStats = field(default_factory=RowStats)
    call: CallState | None = None
    foreign_combine: bool = False  # another extension's combine_denoised wrapper runs under GCFG's
    _schedule: Schedule | None = None
    _inner: object = None  # the inner-model wrapper whose forward GCFG wrapped
    _switched: bool = False  # the inner model was replaced (refiner); handled at the next sampling-path hook

    def __post_init__(self) -> None:
        self.stats.path = "routed" if self.routing else "overwrite"

    # --- main model ---------------------------------------------------------------------------------------------

    def main_runner(self) -> ModelRunner:
        """The current model through the original inner-model forward (x₀ or ε, like the WebUI's own rows)."""
        return self.current.runner

    # --- schedule and steps -------------------------------------------------------------------------------------

    def set_schedule(self, values: Tensor, descending: bool) -> None:
        self._schedule = Schedule.captured(values, descending)

    def step_of(self, sigma: Tensor) -> tuple[int, int]:
        """(GCFG step, steps) of a call at `sigma`; the denoiser's call count when no schedule was captured."""
        found = None if self._schedule is None else self._schedule.step_of(float(sigma.reshape(-1)[0]))
        if found is None:
            self.stats.step_source = "calls"
            steps = max(int(self.denoiser.total_steps or 1), 1)
            return min(max(int(self.denoiser.step), 0), steps - 1), steps
        return found

    # --- coefficients -------------------------------------------------------------------------------------------

    def coefficients(self, cond_scale: float, prompt_weights: Sequence[Sequence[float]],
                     sigma: Tensor) -> StepCoefficients:
        """The call's coefficients: `cond_scale` as the WebUI combines with it (CFG scale × its multiplier),
        `prompt_weights[b]` image b's AND weights, `sigma` the call's σ (or timestep) of the images' rows."""
        multiplier = float(getattr(self.denoiser, "cond_scale_miltiplier", 1.0) or 1.0)
        weights = replace(self.plan.weights, cfg_scale=float(cond_scale) / multiplier, multiplier=multiplier)
        step, steps = self.step_of(sigma)
        return step_coefficients(weights, prompt_weights, self.plan.has_negative, step, steps)

    def host_reads_slot(self) -> bool:
        """Whether something reads the uncond rows besides GCFG's own combination: DDIM CFG++'s renoising
        direction, or another extension's `combine_denoised` under GCFG's (it may use them as its base)."""
        return bool(getattr(self.denoiser, "need_last_noise_uncond", False)) or self.foreign_combine

    def needs(self, coefficients: StepCoefficients) -> tuple[ImageNeeds, ...]:
        return image_needs(coefficients, self.plan.has_negative, classic=self.plan.classic,
                           has_prior=self.plan.prior is not None, host_reads_slot=self.host_reads_slot(),
                           host_row_is_uncond=self.plan.host_row_is_uncond)

    def active_keys(self, coefficients: StepCoefficients) -> list[TermKey]:
        return unique_keys([term for term, _ in coefficients.terms])

    def source(self, key: TermKey) -> RowSource:
        return self.plan.sources[key]

    # --- the call in progress -----------------------------------------------------------------------------------

    def begin_call(self, params) -> None:
        """`on_cfg_denoiser`: a new call with these batched inputs."""
        self.call = CallState(params)

    def inner_changed(self) -> bool:
        """Whether the WebUI replaced its inner model since GCFG wrapped it (a refiner switch)."""
        return self._inner is not None and self.denoiser.inner_model is not self._inner

    def wrapped_inner(self, inner, original: Callable) -> None:
        """Record the inner-model wrapper GCFG wrapped and its original forward."""
        if self._inner is not None and inner is not self._inner:
            self._switched = True
        self._inner = inner
        self.current.forward = original

    def apply_model_switch(self) -> None:
        """After a refiner switch, from the sampling path: re-encode the current-model sources for the new model,
        or fail the request (GCFGRequestError) when GCFG's side models cannot be combined with it."""
        if not self._switched:
            return
        self._switched = False
        if self.rebuild is None:
            raise RuntimeError("GCFG: the WebUI switched models mid-sampling and this pass cannot follow")
        self.plan = self.rebuild()
        logger.info("GCFG: the WebUI switched to its refiner; the current model's terms were re-encoded")

    def end_call(self) -> CallState | None:
        call, self.call = self.call, None
        return call
