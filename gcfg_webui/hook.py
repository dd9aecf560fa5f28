"""The CFG hook: prior uncond overwrite plus extra terms, through a per-sampler `combine_denoised` wrapper.

How it sits in the WebUI's `CFGDenoiser.forward` (webui-internals §3.3):

* an `on_cfg_denoiser` callback (registered once by the script file) stores the call's batched inputs on the
  run attached to the denoiser: the last B rows of x / sigma / image_cond are the inputs of the uncond rows;
* the wrapper, installed on the sampler's CFGDenoiser *instance* right before every sampler run (so the hires
  pass gets its own), overwrites the uncond rows of `x_out` in place with the unconditional prediction E₀
  where E₀ has a non-zero coefficient, calls whatever `combine_denoised` was there before (the WebUI's, or
  another extension's wrapper, which now combine around E₀), and adds the negative, concept and extra terms.

Everything runs inside the combine call rather than in `on_cfg_denoised` because the WebUI swallows exceptions
raised in callbacks; here a failure aborts the generation (a 422 over the API) instead of silently giving an
image without guidance. Rows with coefficient 0 are never evaluated.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gcfg_core.terms import GuidanceTerm, ModelSlot
from gcfg_webui.coefficients import StepCoefficients, step_coefficients

logger = logging.getLogger("gcfg.hook")

_WRAPPER_FLAG = "_gcfg_wrapper"
RUN_ATTRIBUTE = "_gcfg_run"


class SamplerSpace(enum.Enum):
    """The space the WebUI's `x_out` rows live in: denoised x₀ (k-diffusion) or noise ε (DDIM/PLMS/UniPC)."""

    DENOISED = "x0"
    NOISE = "eps"


# Evaluates one model on rows: (x, sigma, image_cond, denoiser_step) -> prediction in the sampler's space.
RowEvaluator = Callable[[Tensor, Tensor, Tensor | None, int], Tensor]


@dataclass
class RowStats:
    """UNet rows evaluated per denoiser call, by model: the WebUI's own rows and the ones GCFG adds."""

    calls: int = 0
    webui_rows: int = 0
    extra_rows: dict[str, int] = field(default_factory=dict)
    skipped_calls: int = 0

    def add(self, model: str, rows: int) -> None:
        self.extra_rows[model] = self.extra_rows.get(model, 0) + rows

    def per_call(self) -> dict[str, float]:
        calls = max(self.calls, 1)
        summary = {"webui": self.webui_rows / calls}
        summary.update({name: rows / calls for name, rows in sorted(self.extra_rows.items())})
        return summary


@dataclass
class PassRun:
    """Everything one sampler run needs: coefficients' inputs and the row evaluators per model."""

    has_negative: tuple[bool, ...]
    negative_scale: float | None
    terms: tuple[GuidanceTerm, ...]
    uncond: RowEvaluator | None  # None: the WebUI's uncond row already is E₀ where there is no negative prompt
    uncond_name: str
    evaluators: dict[tuple[str, str | None], RowEvaluator]
    skip_uncond: Callable[[object, Tensor], bool] = lambda denoiser, sigma: False
    stats: RowStats = field(default_factory=RowStats)
    inputs: object | None = None  # the CFGDenoiserParams of the current call

    @property
    def is_noop(self) -> bool:
        """True when the run can never change a row: no extra terms, a classic negative, and E₀ needed nowhere
        (every image has a negative prompt, or E₀ is the current model's row anyway)."""
        return not self.terms and self.negative_scale is None and (self.uncond is None or all(self.has_negative))


def capture_inputs(params) -> None:
    """`on_cfg_denoiser` callback: keep the call's batched inputs for the wrapper of the same denoiser."""
    run = getattr(params.denoiser, RUN_ATTRIBUTE, None)
    if run is not None:
        run.inputs = params


def _rows(tensor: Tensor | None, index: list[int] | slice) -> Tensor | None:
    return None if tensor is None else tensor[index]


def _uncond_rows_to_replace(run: PassRun, coefficients: StepCoefficients) -> list[int]:
    """Images whose uncond row must become E₀: E₀ has a coefficient and differs from what the row holds."""
    return [
        image for image in range(coefficients.batch_size)
        if coefficients.uncond[image] != 0.0 and (run.uncond is not None or run.has_negative[image])
    ]


def gcfg_combine(denoiser, original: Callable, x_out: Tensor, conds_list, uncond, cond_scale: float) -> Tensor:
    """The wrapper body: overwrite uncond rows with E₀, combine with `original`, add the remaining terms."""
    run: PassRun | None = getattr(denoiser, RUN_ATTRIBUTE, None)
    if run is None:
        return original(x_out, conds_list, uncond, cond_scale)
    params, run.inputs = run.inputs, None
    if params is None:
        raise RuntimeError("GCFG: the denoiser inputs were not captured; another extension may have replaced "
                           "CFGDenoiser.forward. Disable GCFG or that extension.")
    batch = len(conds_list)
    run.stats.calls += 1
    run.stats.webui_rows += int(x_out.shape[0])
    sigma = params.sigma[-batch:]
    if run.skip_uncond(denoiser, sigma):
        # Skip Early CFG / NGMS step: the WebUI uses the cond prediction alone (scale 1); GCFG stays out too.
        run.stats.skipped_calls += 1
        return original(x_out, conds_list, uncond, cond_scale)
    x = params.x[-batch:]
    image_cond = params.image_cond[-batch:] if isinstance(params.image_cond, Tensor) else None
    coefficients = step_coefficients(
        cond_scale, [sum(weight for _, weight in conds) for conds in conds_list], run.has_negative,
        run.negative_scale, run.terms, denoiser.step, denoiser.total_steps or 1,
    )
    rows = x_out[-batch:]
    replace = _uncond_rows_to_replace(run, coefficients)
    negative_rows = None
    if replace:
        if any(coefficients.negative[image] != 0.0 for image in replace):
            negative_rows = rows.clone()
        e0 = _evaluate_uncond(run, replace, x, sigma, image_cond, denoiser.step)
        rows[replace] = e0.to(rows.dtype)
    denoised = original(x_out, conds_list, uncond, cond_scale)
    if negative_rows is not None:
        weights = torch.tensor(coefficients.negative, dtype=rows.dtype, device=rows.device)
        denoised = denoised + weights.view(-1, *([1] * (rows.dim() - 1))) * (negative_rows - rows)
    for term, weight in coefficients.terms:
        prediction = run.evaluators[term.key](x, sigma, image_cond, denoiser.step)
        run.stats.add(term.model, batch)
        denoised = denoised + weight * (prediction.to(rows.dtype) - rows)
    if getattr(denoiser, "need_last_noise_uncond", False):
        # DDIM CFG++ stored the uncond before this call; keep its direction term consistent with E₀.
        denoiser.last_noise_uncond = rows.clone()
    return denoised


def _evaluate_uncond(run: PassRun, images: list[int], x: Tensor, sigma: Tensor, image_cond: Tensor | None,
                     step: int) -> Tensor:
    if run.uncond is not None:
        evaluator, name = run.uncond, run.uncond_name
    else:
        evaluator, name = run.evaluators[(ModelSlot.MAIN.value, "")], ModelSlot.MAIN.value
    run.stats.add(name, len(images))
    return evaluator(x[images], sigma[images], _rows(image_cond, images), step)


def is_installed(denoiser) -> bool:
    return getattr(denoiser.combine_denoised, _WRAPPER_FLAG, False)


def install(denoiser, run: PassRun) -> None:
    """Attach `run` to the denoiser instance and wrap its `combine_denoised` once (idempotent)."""
    setattr(denoiser, RUN_ATTRIBUTE, run)
    if is_installed(denoiser):
        return
    original = denoiser.combine_denoised

    def combine_denoised(x_out, conds_list, uncond, cond_scale):
        return gcfg_combine(denoiser, original, x_out, conds_list, uncond, cond_scale)

    setattr(combine_denoised, _WRAPPER_FLAG, True)
    combine_denoised.gcfg_original = original
    denoiser.combine_denoised = combine_denoised


def remove(denoiser) -> None:
    """Detach the run and undo the wrapper if it is still the outermost one (else leave it inert)."""
    if hasattr(denoiser, RUN_ATTRIBUTE):
        setattr(denoiser, RUN_ATTRIBUTE, None)
    current = denoiser.__dict__.get("combine_denoised")
    if current is not None and getattr(current, _WRAPPER_FLAG, False):
        original = current.gcfg_original
        if getattr(original, "__self__", None) is denoiser and getattr(original, "__func__", None) is getattr(
                type(denoiser), "combine_denoised", None):
            del denoiser.combine_denoised
        else:
            denoiser.combine_denoised = original


def install_failure(denoiser, error: Exception) -> None:
    """Make the sampler's first denoiser call raise `error`: hooks swallow exceptions, the sampling path not."""

    def forward(*args, **kwargs):
        raise error

    denoiser.forward = forward


def remove_failure(denoiser) -> None:
    denoiser.__dict__.pop("forward", None)


def unique_keys(terms: Sequence[GuidanceTerm]) -> list[tuple[str, str | None]]:
    """The distinct (model, prompt) pairs that the terms need evaluators for, in first-use order."""
    seen: dict[tuple[str, str | None], None] = {}
    for term in terms:
        seen.setdefault(term.key, None)
    return list(seen)
