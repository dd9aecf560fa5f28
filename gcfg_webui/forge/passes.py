"""Forge: one sampler run ("pass"), its fixed plan, and the controller that owns the state of each denoiser call.

A pass is one `sample()`/`sample_img2img()`: the first pass, then the hires pass. `process_before_every_sampling`
builds a `PassPlan` and a `PassController` and installs three hooks on a clone of the main UNet patcher
(`install`); each denoiser call then runs them in Forge's order:

1. the conditioning modifier (`begin_call`) sees the call's x, σ, conditions and the CFG scale Forge combines with,
   and computes the coefficients (`gcfg_core.coefficients`) and what each image's uncond row must hold
   (`gcfg_webui.uncond_slot`);
2. the UNet wrapper (`routing`) evaluates Forge's batched call with GCFG's rows in it;
3. the post-CFG function (`combine`), first of the list, completes the combination, so that post-CFG functions
   after it (PAG, …) and Forge's own readers of the uncond prediction see GCFG's result and the prior's E₀.

GCFG's step is the σ's position in the schedule the sampler runs (`gcfg_webui.sampling_pass.Schedule`).
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from torch import Tensor

from gcfg_core.coefficients import GuidanceWeights, StepCoefficients, step_coefficients
from gcfg_webui.sampling_pass import RowStats, Schedule, TermKey, pass_is_noop, unique_keys
from gcfg_webui.uncond_slot import ImageNeeds, Slot, image_needs

logger = logging.getLogger("gcfg.forge.passes")


@dataclass(frozen=True)
class Source:
    """One (model, prompt) pair: where its rows run and the conditioning of given images' rows."""

    name: str  # statistics name ("main", "prior", "concept", a checkpoint's name)
    side: object | None  # a `side_models.SideModel`; None: the main model, in Forge's own call
    condition: Callable[[int, Sequence[int]], object]  # (prompt step, images) -> [n, T, C] or crossattn/vector dict


@dataclass(frozen=True)
class PassPlan:
    weights: GuidanceWeights  # cfg_scale is replaced at each call by the scale Forge combines with
    has_negative: tuple[bool, ...]
    sources: dict[TermKey, Source]
    prior: Source | None  # E₀ from the prior; None: E₀ is the main model's empty prompt
    main_empty: Source | None  # E₀ from the main model (the empty prompt, or the prompt: autoguidance)
    configured_scale: float  # the pass's CFG scale (the hires pass has its own)
    host_row_is_uncond: bool = True  # Forge's uncond row of an image without negative prompt is E₀ itself

    @property
    def classic(self) -> bool:
        return self.weights.negative_scale is None

    @property
    def is_noop(self) -> bool:
        return pass_is_noop(self.weights, self.has_negative, self.prior, self.host_row_is_uncond)

    @property
    def needs_uncond_at_cfg_one(self) -> bool:
        """Whether E₀ or N can have a non-zero coefficient at CFG 1 (then Forge's CFG-1 shortcut must stay off)."""
        return bool(self.weights.terms) or not self.classic


class Holds(enum.Enum):
    """What an image's row of Forge's uncond prediction holds after the UNet calls."""

    E0 = "E0"
    NEGATIVE = "N"
    NOTHING = "nothing"  # zeros or a filler: its coefficient is 0 or the combination corrects it


def holds_for(need: ImageNeeds, has_negative: bool) -> Holds:
    if need.slot is Slot.HOST:
        return Holds.NEGATIVE if has_negative else Holds.E0
    if need.slot in (Slot.PRIOR, Slot.MAIN_EMPTY):
        return Holds.E0
    return Holds.NOTHING


@dataclass
class CallState:
    """One denoiser call: its inputs (from the conditioning modifier) and what GCFG evaluated so far."""

    x: Tensor
    sigma: Tensor
    cond_scale: float
    coefficients: StepCoefficients
    needs: tuple[ImageNeeds, ...]
    has_negative: tuple[bool, ...]
    keys: list[TermKey]
    prompt_step: int
    model: object  # the main KModel
    model_options: dict
    image_cond: Tensor | None
    control: object
    expects_slot: bool  # Forge will evaluate an uncond chunk in this call
    skipped: bool = False  # Forge combines at scale 1 without the uncond (NGMS, Skip Early CFG)
    holds: list[Holds] = field(default_factory=list)
    slot_placed: bool = False
    terms_done: bool = False
    e0: dict[int, Tensor] = field(default_factory=dict)  # E₀ kept aside, where the slot does not hold it
    negatives: dict[int, Tensor] = field(default_factory=dict)  # N kept aside, where the slot holds E₀
    predictions: dict[TermKey, Tensor] = field(default_factory=dict)  # each active term's B rows

    @property
    def batch(self) -> int:
        return int(self.x.shape[0])


@dataclass
class PassController:
    """The state owner of one pass: the plan, the call in progress, the schedule, the statistics."""

    p: object
    plan: PassPlan
    routing: bool
    stats: RowStats = field(default_factory=RowStats)
    call: CallState | None = None
    evaluating: bool = False  # GCFG's own evaluations run through Forge's batching: the wrapper stays out
    schedule: Schedule | None = None
    sigma_of_timestep: Callable[[Tensor], Tensor] | None = None  # timesteps samplers: Forge's timestep → σ

    def __post_init__(self) -> None:
        self.stats.path = "routed" if self.routing else "overwrite"

    @property
    def denoiser(self):
        return self.p.sampler.model_wrap_cfg

    # --- schedule and steps -------------------------------------------------------------------------------------

    def set_schedule(self, values: Tensor, descending: bool) -> None:
        if self.sigma_of_timestep is not None:
            values = self.sigma_of_timestep(values)
            descending = not descending
        self.schedule = Schedule.captured(values, descending)

    def step_of(self, sigma: Tensor) -> tuple[int, int]:
        found = None if self.schedule is None else self.schedule.step_of(float(sigma.reshape(-1)[0]))
        if found is None:
            self.stats.step_source = "calls"
            steps = max(int(getattr(self.denoiser, "total_steps", 1) or 1), 1)
            return min(max(int(self.denoiser.step), 0), steps - 1), steps
        return found

    # --- a denoiser call ----------------------------------------------------------------------------------------

    def host_reads_slot(self, model_options: dict) -> bool:
        """Whether something besides GCFG reads Forge's uncond prediction: DDIM CFG++'s renoising direction, another
        extension's CFG function (dynamic thresholding) or post-CFG function (PAG, …)."""
        posts = [fn for fn in model_options.get("sampler_post_cfg_function", []) if not is_ours(fn)]
        return (bool(getattr(self.denoiser, "need_last_noise_uncond", False))
                or "sampler_cfg_function" in model_options or bool(posts))

    def begin_call(self, model, x: Tensor, sigma: Tensor, uncond, cond, cond_scale: float,
                   model_options: dict) -> CallState:
        """The conditioning modifier's work: coefficients and per-image needs of this call."""
        plan = self.plan
        batch = int(x.shape[0])
        cond_scale = float(cond_scale)
        skipped = math.isclose(cond_scale, 1.0) and not math.isclose(plan.configured_scale, 1.0)
        # Forge drops the negative prompts of a pass whose CFG is 1 (hires at hires CFG 1): then so does GCFG.
        has_negative = plan.has_negative if uncond is not None else (False,) * batch
        prompt_weights = [[float(entry.get("strength", 1.0)) for entry in cond]] * batch
        step, steps = self.step_of(sigma)
        weights = replace(plan.weights, cfg_scale=cond_scale, multiplier=1.0)
        coefficients = step_coefficients(weights, prompt_weights, has_negative, step, steps)
        needs = image_needs(coefficients, has_negative, classic=plan.classic, has_prior=plan.prior is not None,
                            host_reads_slot=self.host_reads_slot(model_options),
                            host_row_is_uncond=plan.host_row_is_uncond)
        cfg_one_shortcut = math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization")
        first = cond[0] if cond else {}
        image_cond = getattr(first.get("model_conds", {}).get("c_concat"), "cond", None)
        self.call = CallState(
            x=x, sigma=sigma, cond_scale=cond_scale, coefficients=coefficients, needs=needs,
            has_negative=tuple(has_negative), keys=unique_keys([term for term, _ in coefficients.terms]),
            prompt_step=int(getattr(self.denoiser, "step", 0)), model=model, model_options=model_options,
            image_cond=image_cond, control=first.get("control"),
            expects_slot=uncond is not None and not cfg_one_shortcut and not skipped, skipped=skipped,
            holds=[Holds.NOTHING] * batch)
        self.stats.calls += 1
        if skipped:
            self.stats.skipped_calls += 1
        else:
            self.stats.steps_seen.append(step)
        return self.call

    def end_call(self) -> CallState | None:
        call, self.call = self.call, None
        return call


GCFG_HOOK_FLAG = "_gcfg_forge_hook"


def is_ours(function) -> bool:
    return getattr(function, GCFG_HOOK_FLAG, False)


def mark_ours(function):
    setattr(function, GCFG_HOOK_FLAG, True)
    return function
