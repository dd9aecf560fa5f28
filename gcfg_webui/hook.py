"""The CFG hook: the prior's unconditional rows and the extra terms, with one UNet call per model and denoiser call.

How it sits in the WebUI's `CFGDenoiser.forward` (webui-internals §3.3):

* an `on_cfg_denoiser` callback (registered once by the script file) stores the call's batched inputs on the
  run attached to the denoiser: the last B rows of x / sigma / image_cond are the inputs of the uncond rows;
* fast path: the sampler instance's own inner-model wrapper (`denoiser.inner_model`, a k-diffusion or timesteps
  wrapper created per sampler) gets an instance `forward` that recognises the WebUI's single batched call (the
  very tensors the callback saw: cond rows + the B uncond rows, `batch_cond_uncond` on, one token length). When no
  image needs the WebUI's own uncond row (a prior and no negative prompt), those B rows go to the prior instead
  of the main model; the main-model extra terms join that call and every other model gets one call;
* the `combine_denoised` wrapper, installed on the sampler's CFGDenoiser *instance* right before every sampler
  run (so the hires pass gets its own), takes the fast path's predictions, or else (sliced calls, different
  token lengths, a refiner's new inner model, ...) overwrites the uncond rows of `x_out` in place with E₀ and
  evaluates the terms itself, still batched per model. It then calls whatever `combine_denoised` was there
  before (the WebUI's, or another extension's wrapper, which now combine around E₀) and adds the negative,
  concept and extra terms. Both paths evaluate the same rows on the same models; only the batching differs.

Everything runs inside the sampling path rather than in callbacks because the WebUI swallows exceptions raised
in callbacks; here a failure aborts the generation (a 422 over the API) instead of silently giving an image
without guidance. Rows with coefficient 0 are never evaluated.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gcfg_core.terms import GuidanceTerm, ModelSlot
from gcfg_webui.coefficients import StepCoefficients, active_terms, step_coefficients

logger = logging.getLogger("gcfg.hook")

_WRAPPER_FLAG = "_gcfg_wrapper"
RUN_ATTRIBUTE = "_gcfg_run"

# A conditioning dict as the WebUI passes it to the inner model: {"c_crossattn": [T], "c_concat": [I]}, or
# SDXL's {"crossattn": T, "vector": V, "c_concat": [I]}; every tensor has one row per x row.
Condition = dict
TermKey = tuple[str, str | None]


class SamplerSpace(enum.Enum):
    """The space the WebUI's `x_out` rows live in: denoised x₀ (k-diffusion) or noise ε (DDIM/PLMS/UniPC)."""

    DENOISED = "x0"
    NOISE = "eps"


class UnbatchableConditionError(ValueError):
    """A conditioning value that is neither a tensor nor a list of tensors, so its rows cannot be selected."""


@dataclass(frozen=True, eq=False)
class ModelRunner:
    """One UNet: `call(x, sigma, condition)` evaluates rows in the sampler's space; `name` is its statistics key."""

    name: str
    call: Callable[[Tensor, Tensor, Condition], Tensor]


@dataclass(frozen=True)
class RowSource:
    """One (model, prompt) pair: the UNet that evaluates it and its conditioning for `rows` image rows."""

    model: str  # row-statistics name (an @prior term run by the main model counts as "prior")
    runner: ModelRunner
    condition: Callable[[int, int, Tensor | None], Condition]  # (denoiser step, rows, image_cond rows)


@dataclass
class RowStats:
    """UNet rows and calls per denoiser call, by model: the WebUI's own rows and the ones GCFG adds."""

    calls: int = 0
    webui_rows: int = 0
    extra_rows: dict[str, int] = field(default_factory=dict)
    model_calls: dict[str, int] = field(default_factory=dict)
    skipped_calls: int = 0
    routed_calls: int = 0

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
        """UNet calls per denoiser call by model (the main model's count includes the WebUI's own calls)."""
        calls = max(self.calls, 1)
        return {name: count / calls for name, count in sorted(self.model_calls.items())}


@dataclass(frozen=True)
class _Prepared:
    """What the fast path computed for one denoiser call, for the `combine_denoised` wrapper of the same call."""

    params: object
    routed: bool  # the uncond rows of x_out already are the prior's E₀
    predictions: dict[TermKey, Tensor]
    uncond_condition: Condition | None  # the WebUI's conditioning of its uncond rows (to evaluate them if needed)


@dataclass
class PassRun:
    """Everything one sampler run needs: coefficients' inputs and the row sources per (model, prompt)."""

    has_negative: tuple[bool, ...]
    negative_scale: float | None
    terms: tuple[GuidanceTerm, ...]
    uncond: RowSource | None  # None: the WebUI's uncond row already is E₀ where there is no negative prompt
    sources: dict[TermKey, RowSource]
    main_runner: ModelRunner | None = None
    skip_uncond: Callable[[object, Tensor], bool] = lambda denoiser, sigma: False
    stats: RowStats = field(default_factory=RowStats)
    inputs: object | None = None  # the CFGDenoiserParams of the current call
    prepared: _Prepared | None = None
    busy: bool = False  # GCFG's own UNet call in progress (not one of the WebUI's)

    @property
    def is_noop(self) -> bool:
        """True when the run can never change a row: no extra terms, a classic negative, and E₀ needed nowhere
        (every image has a negative prompt, or E₀ is the current model's row anyway)."""
        return not self.terms and self.negative_scale is None and (self.uncond is None or all(self.has_negative))

    def uncond_source(self) -> RowSource:
        return self.uncond if self.uncond is not None else self.sources[(ModelSlot.MAIN.value, "")]


def capture_inputs(params) -> None:
    """`on_cfg_denoiser` callback: keep the call's batched inputs for the hooks of the same denoiser."""
    run = getattr(params.denoiser, RUN_ATTRIBUTE, None)
    if run is not None:
        run.inputs = params
        run.prepared = None


# --- conditioning dicts -------------------------------------------------------------------------------------------

def condition_dict(cond, image_cond: Tensor | None) -> Condition:
    """The inner model's conditioning for text conds `cond` (tensor or SDXL dict) and image conds (§3.3 step 6)."""
    if isinstance(cond, dict):
        return {**cond, "c_concat": [image_cond]}
    return {"c_crossattn": [cond], "c_concat": [image_cond]}


# sd-webui-controlnet marks every context row with one extra leading token, +1024 for cond rows and -1024 for
# uncond rows, and treats unmarked rows as cond. E₀ taken from the current model stands where the WebUI's uncond
# rows stand, so it must carry their mark; otherwise "ControlNet is more important" would control it.
CONTROLNET_UNCOND_MARK = -1024.0


def mark_like_webui_uncond(condition: Condition, text_uncond) -> Condition:
    """`condition` with the WebUI's uncond rows' ControlNet mark prepended, when they carry one; else unchanged."""
    crossattn = condition.get("c_crossattn")
    if not isinstance(text_uncond, Tensor) or text_uncond.dim() != 3 or not crossattn:
        return condition
    cond = crossattn[0]
    if not isinstance(cond, Tensor) or cond.shape[1] + 1 != text_uncond.shape[1]:
        return condition
    if not bool((text_uncond[:, 0] == CONTROLNET_UNCOND_MARK).all()):
        return condition
    mark = text_uncond[:1, :1].to(cond).expand(cond.shape[0], 1, cond.shape[2])
    return {**condition, "c_crossattn": [torch.cat([mark, cond], dim=1)]}


def _map_condition(condition: Condition, function: Callable[[Tensor], Tensor]) -> Condition:
    mapped = {}
    for key, value in condition.items():
        if isinstance(value, Tensor):
            mapped[key] = function(value)
        elif isinstance(value, list) and all(isinstance(item, Tensor) for item in value):
            mapped[key] = [function(item) for item in value]
        else:
            raise UnbatchableConditionError(f"conditioning {key!r} holds {type(value).__name__}")
    return mapped


def select_rows(condition: Condition, index: list[int] | slice) -> Condition:
    """The conditioning of the rows `index` (every tensor sliced along its first dimension)."""
    return _map_condition(condition, lambda tensor: tensor[index])


def _row_counts(condition: Condition) -> set[int]:
    """The first-dimension sizes of every tensor in the conditioning."""
    counts: set[int] = set()
    for value in condition.values():
        for tensor in value if isinstance(value, list) else [value]:
            if not isinstance(tensor, Tensor):
                raise UnbatchableConditionError(f"conditioning holds {type(tensor).__name__}")
            counts.add(int(tensor.shape[0]))
    return counts


def _shape_key(condition: Condition) -> tuple | None:
    """Equal keys for conditionings that can be stacked into one call: same keys, shapes past the batch dimension
    and dtypes; None when something in it is not a tensor (that block gets a call of its own)."""
    parts = []
    for key, value in sorted(condition.items()):
        tensors = value if isinstance(value, list) else [value]
        if not all(isinstance(tensor, Tensor) for tensor in tensors):
            return None
        parts.append((key, tuple((tuple(tensor.shape[1:]), tensor.dtype) for tensor in tensors)))
    return tuple(parts)


def _cat_conditions(conditions: Sequence[Condition]) -> Condition:
    first = conditions[0]
    return {key: [torch.cat(items) for items in zip(*(c[key] for c in conditions), strict=True)]
            if isinstance(value, list) else torch.cat([c[key] for c in conditions])
            for key, value in first.items()}


def _rows_of(value) -> int:
    shape = getattr(value, "shape", None)
    return -1 if shape is None else int(shape[0])


# --- evaluating rows --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Block:
    runner: ModelRunner
    model: str | None  # row-statistics name; None for rows the WebUI would have evaluated itself
    x: Tensor
    sigma: Tensor
    condition: Condition


def _source_block(source: RowSource, x: Tensor, sigma: Tensor, image_cond: Tensor | None, step: int) -> _Block:
    return _Block(source.runner, source.model, x, sigma, source.condition(step, int(x.shape[0]), image_cond))


def _run_blocks(run: PassRun, blocks: Sequence[_Block], main_call: Callable | None = None) -> list[Tensor]:
    """Evaluate blocks with one UNet call per model and conditioning shape.

    Blocks whose conditionings differ past the batch dimension (e.g. 77 vs 154 tokens) go to separate calls:
    padding them as the WebUI does would change the cross-attention, so results stay those of separate calls.
    `main_call` replaces the main runner's call (the fast path calls the wrapped inner model directly).
    """
    groups: dict[tuple, list[int]] = {}
    for index, block in enumerate(blocks):
        shape = _shape_key(block.condition)
        groups.setdefault((id(block.runner), shape if shape is not None else ("single", index)), []).append(index)
    outputs: list[Tensor | None] = [None] * len(blocks)
    for indices in groups.values():
        members = [blocks[index] for index in indices]
        runner = members[0].runner
        call = main_call if main_call is not None and runner is run.main_runner else runner.call
        if len(members) == 1:
            x, sigma, condition = members[0].x, members[0].sigma, members[0].condition
        else:
            x = torch.cat([block.x for block in members])
            sigma = torch.cat([block.sigma for block in members])
            condition = _cat_conditions([block.condition for block in members])
        run.stats.add_call(runner.name)
        run.busy = True
        try:
            out = call(x, sigma, condition)
        finally:
            run.busy = False
        sizes = [int(block.x.shape[0]) for block in members]
        for index, block, part in zip(indices, members, out.split(sizes), strict=True):
            outputs[index] = part
            if block.model is not None:
                run.stats.add(block.model, int(block.x.shape[0]))
    return outputs


def _active_keys(run: PassRun, step: int, steps: int) -> list[TermKey]:
    return unique_keys([term for term, _ in active_terms(run.terms, step, steps)])


def main_runner(denoiser) -> ModelRunner:
    """The current model through the sampler's inner-model wrapper (x₀ or ε, like the WebUI's own rows)."""
    return ModelRunner(ModelSlot.MAIN.value,
                       lambda x, sigma, condition: denoiser.inner_model(x, sigma, cond=condition))


# --- fast path: the WebUI's batched inner-model call ---------------------------------------------------------------

def intercept_call(run: PassRun, denoiser, original: Callable, args: tuple, kwargs: dict) -> Tensor | None:
    """Evaluate the WebUI's single cond+uncond call with the uncond rows on the prior and the terms batched in.

    Returns None (the caller runs the call unchanged) unless this is the batched call the `on_cfg_denoiser`
    callback saw and there is something to gain: uncond rows no image needs, or main-model terms to join.
    """
    params = run.inputs
    if params is None or run.busy or run.prepared is not None or len(args) != 2 or set(kwargs) != {"cond"}:
        return None
    x, sigma = args
    if x is not params.x or sigma is not params.sigma or run.main_runner is None:
        return None
    batch, total = len(run.has_negative), int(x.shape[0])
    if _rows_of(params.text_uncond) != batch or _rows_of(params.text_cond) + batch != total:
        return None  # e.g. an edit model's extra block
    condition = kwargs["cond"]
    try:
        if not isinstance(condition, dict) or _row_counts(condition) != {total}:
            return None
    except UnbatchableConditionError:
        return None
    step = denoiser.step
    keys = _active_keys(run, step, denoiser.total_steps or 1)
    # No image needs the WebUI's own uncond row: each has no negative prompt, so E₀ is the prior's.
    route = run.uncond is not None and not any(run.has_negative)
    if not route and not any(run.sources[key].runner is run.main_runner for key in keys):
        return None
    keep = total - batch if route else total
    x_images, sigma_images = x[-batch:], sigma[-batch:]
    image_cond = params.image_cond[-batch:] if isinstance(params.image_cond, Tensor) else None
    own = _Block(run.main_runner, None, x[:keep] if route else x, sigma[:keep] if route else sigma,
                 select_rows(condition, slice(0, keep)) if route else condition)
    blocks = [own]
    if route:
        blocks.append(_source_block(run.uncond, x_images, sigma_images, image_cond, step))
    blocks.extend(_source_block(run.sources[key], x_images, sigma_images, image_cond, step) for key in keys)
    outputs = _run_blocks(run, blocks, main_call=lambda x_rows, sigma_rows, rows_condition: original(
        x_rows, sigma_rows, cond=rows_condition))
    x_out = torch.cat([outputs[0], outputs[1].to(outputs[0].dtype)]) if route else outputs[0]
    run.prepared = _Prepared(params, route, dict(zip(keys, outputs[1 + route:], strict=True)),
                             select_rows(condition, slice(keep, total)) if route else None)
    if route:
        run.stats.routed_calls += 1
    return x_out


# --- the combine wrapper -------------------------------------------------------------------------------------------

def _uncond_rows_to_replace(run: PassRun, coefficients: StepCoefficients) -> list[int]:
    """Images whose uncond row must become E₀: E₀ has a coefficient and differs from what the row holds."""
    return [
        image for image in range(coefficients.batch_size)
        if coefficients.uncond[image] != 0.0 and (run.uncond is not None or run.has_negative[image])
    ]


def gcfg_combine(denoiser, original: Callable, x_out: Tensor, conds_list, uncond, cond_scale: float) -> Tensor:
    """The wrapper body: uncond rows → E₀, combine with `original`, add the remaining terms."""
    run: PassRun | None = getattr(denoiser, RUN_ATTRIBUTE, None)
    if run is None:
        return original(x_out, conds_list, uncond, cond_scale)
    params, run.inputs = run.inputs, None
    prepared, run.prepared = run.prepared, None
    if params is None:
        raise RuntimeError("GCFG: the denoiser inputs were not captured; another extension may have replaced "
                           "CFGDenoiser.forward. Disable GCFG or that extension.")
    if prepared is not None and prepared.params is not params:
        prepared = None
    batch = len(conds_list)
    routed = prepared is not None and prepared.routed
    run.stats.calls += 1
    run.stats.webui_rows += int(x_out.shape[0]) - (batch if routed else 0)
    sigma = params.sigma[-batch:]
    if prepared is None and run.skip_uncond(denoiser, sigma):
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
    if routed:
        own = [image for image in range(batch) if image not in replace]
        if own:  # E₀ has coefficient 0 there: the WebUI's own row, as without the fast path
            block = _Block(run.main_runner, None, x[own], sigma[own], select_rows(prepared.uncond_condition, own))
            rows[own] = _run_blocks(run, [block])[0].to(rows.dtype)
            run.stats.webui_rows += len(own)
        replace = []
    predictions = {} if prepared is None else dict(prepared.predictions)
    missing = [key for key in unique_keys([term for term, _ in coefficients.terms]) if key not in predictions]
    blocks = [_source_block(run.sources[key], x, sigma, image_cond, denoiser.step) for key in missing]
    if replace:
        block = _source_block(run.uncond_source(), x[replace], sigma[replace], _rows(image_cond, replace),
                              denoiser.step)
        if run.uncond is None:  # E₀ from the current model: it takes the place of the WebUI's uncond rows
            block = dataclasses.replace(block, condition=mark_like_webui_uncond(block.condition, params.text_uncond))
        blocks.append(block)
    outputs = _run_blocks(run, blocks)
    predictions.update(zip(missing, outputs[:len(missing)], strict=True))
    negative_rows = None
    if replace:
        if any(coefficients.negative[image] != 0.0 for image in replace):
            negative_rows = rows.clone()
        rows[replace] = outputs[-1].to(rows.dtype)
    denoised = original(x_out, conds_list, uncond, cond_scale)
    if negative_rows is not None:
        weights = torch.tensor(coefficients.negative, dtype=rows.dtype, device=rows.device)
        denoised = denoised + weights.view(-1, *([1] * (rows.dim() - 1))) * (negative_rows - rows)
    for term, weight in coefficients.terms:
        denoised = denoised + weight * (predictions[term.key].to(rows.dtype) - rows)
    if getattr(denoiser, "need_last_noise_uncond", False):
        # DDIM CFG++ stored the uncond before this call; keep its direction term consistent with E₀.
        denoiser.last_noise_uncond = rows.clone()
    return denoised


def _rows(tensor: Tensor | None, index: list[int]) -> Tensor | None:
    return None if tensor is None else tensor[index]


# --- installing and removing ---------------------------------------------------------------------------------------

def is_installed(denoiser) -> bool:
    return getattr(denoiser.combine_denoised, _WRAPPER_FLAG, False)


def install(denoiser, run: PassRun) -> None:
    """Attach `run` to the denoiser instance, wrap its `combine_denoised` and its inner model's `forward` once."""
    setattr(denoiser, RUN_ATTRIBUTE, run)
    _wrap_inner_forward(denoiser)
    if is_installed(denoiser):
        return
    original = denoiser.combine_denoised

    def combine_denoised(x_out, conds_list, uncond, cond_scale):
        return gcfg_combine(denoiser, original, x_out, conds_list, uncond, cond_scale)

    setattr(combine_denoised, _WRAPPER_FLAG, True)
    combine_denoised.gcfg_original = original
    denoiser.combine_denoised = combine_denoised


def _wrap_inner_forward(denoiser) -> None:
    """Give this sampler's own inner-model wrapper an instance `forward` that runs `intercept_call` first.

    The wrapper object is created per CFGDenoiser (`inner_model` property, webui-internals §3.1), so nothing
    shared is patched; a refiner switch replaces it with a fresh, unwrapped one, which leaves the fallback path.
    """
    inner = denoiser.inner_model
    current = inner.__dict__.get("forward")
    if current is not None and getattr(current, _WRAPPER_FLAG, False):
        return
    original = inner.forward

    def forward(*args, **kwargs):
        run = getattr(denoiser, RUN_ATTRIBUTE, None)
        if run is not None:
            out = intercept_call(run, denoiser, original, args, kwargs)
            if out is not None:
                return out
            if not run.busy:
                run.stats.add_call(ModelSlot.MAIN.value)  # one of the WebUI's own calls
        return original(*args, **kwargs)

    setattr(forward, _WRAPPER_FLAG, True)
    forward.gcfg_original = original
    inner.forward = forward


def _unwrap(owner, name: str) -> None:
    """Undo our instance attribute `name` if it is the outermost one (else leave it inert)."""
    current = owner.__dict__.get(name)
    if current is None or not getattr(current, _WRAPPER_FLAG, False):
        return
    original = current.gcfg_original
    if getattr(original, "__self__", None) is owner and getattr(original, "__func__", None) is getattr(
            type(owner), name, None):
        delattr(owner, name)
    else:
        setattr(owner, name, original)


def remove(denoiser) -> None:
    """Detach the run and undo both wrappers where they are still the outermost ones."""
    if hasattr(denoiser, RUN_ATTRIBUTE):
        setattr(denoiser, RUN_ATTRIBUTE, None)
    _unwrap(denoiser, "combine_denoised")
    inner = getattr(denoiser, "model_wrap", None)  # not the property: it would build a wrapper
    if inner is not None:
        _unwrap(inner, "forward")


def install_failure(denoiser, error: Exception) -> None:
    """Make the sampler's first denoiser call raise `error`: hooks swallow exceptions, the sampling path not."""

    def forward(*args, **kwargs):
        raise error

    denoiser.forward = forward


def remove_failure(denoiser) -> None:
    denoiser.__dict__.pop("forward", None)


def unique_keys(terms: Sequence[GuidanceTerm]) -> list[TermKey]:
    """The distinct (model, prompt) pairs that the terms need evaluators for, in first-use order."""
    seen: dict[TermKey, None] = {}
    for term in terms:
        seen.setdefault(term.key, None)
    return list(seen)
