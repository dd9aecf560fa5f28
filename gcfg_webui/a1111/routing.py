"""The fast path: GCFG's rows inside the WebUI's own batched inner-model call.

The WebUI evaluates one call ``[cond rows of every image…, B uncond rows]`` when the token lengths agree and
`batch_cond_uncond` is on (webui-internals §3.3 steps 7-11). GCFG recognises that call (the very tensors the
`on_cfg_denoiser` callback saw) and evaluates, with one call per model:

* the cond rows, as the WebUI would;
* for each image, what its uncond row must hold (`gcfg_webui.uncond_slot`): the WebUI's own row only where it is
  needed, the prior's E₀ instead of it, the current model's empty prompt, or nothing at all;
* N aside where a numeric negative scale needs it besides E₀, and every active term, the current model's terms
  joining the WebUI's call.

The combine step of the same call (`combine`) checks the result against the coefficients it computes itself
and evaluates anything still missing, so a call the fast path did not recognise, or predicted differently,
still gives the exact combination.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor

from gcfg_webui.a1111.passes import PassController, Routed
from gcfg_webui.a1111.rows import (
    Block,
    UnbatchableConditionError,
    mark_like_webui_uncond,
    row_counts,
    run_blocks,
    select_rows,
    source_block,
)
from gcfg_webui.uncond_slot import Slot

logger = logging.getLogger("gcfg.a1111.routing")


def _rows_of(value) -> int:
    shape = getattr(value, "shape", None)
    return -1 if shape is None else int(shape[0])


def _call_scale_and_weights(denoiser) -> tuple[float, list[list[float]]]:
    """The CFG scale and AND weights the WebUI will combine this call with (its sampler's extra args)."""
    extra = denoiser.sampler.sampler_extra_args
    multiplier = float(getattr(denoiser, "cond_scale_miltiplier", 1.0) or 1.0)
    weights = [[float(part.weight) for part in parts] for parts in extra["cond"].batch]
    return float(extra["cond_scale"]) * multiplier, weights


def _is_batched_call(controller: PassController, args: tuple, kwargs: dict) -> bool:
    """Whether this inner-model call is the WebUI's single call of cond rows + B uncond rows."""
    call = controller.call
    if call is None or call.routed is not None or len(args) != 2 or set(kwargs) != {"cond"}:
        return False
    x, sigma = args
    params = call.params
    if x is not params.x or sigma is not params.sigma:
        return False
    batch, total = len(controller.plan.has_negative), int(x.shape[0])
    if _rows_of(params.text_uncond) != batch or _rows_of(params.text_cond) + batch != total:
        return False  # the uncond rows were skipped (NGMS, Skip Early CFG), or an edit model's extra block
    condition = kwargs["cond"]
    try:
        return isinstance(condition, dict) and row_counts(condition) == {total}
    except UnbatchableConditionError:
        return False


def intercept(controller: PassController, original: Callable, args: tuple, kwargs: dict) -> Tensor | None:
    """Evaluate the WebUI's batched call with GCFG's rows in it; None: the caller runs the call unchanged."""
    if not controller.routing or not _is_batched_call(controller, args, kwargs):
        return None
    controller.apply_model_switch()
    denoiser, plan, call = controller.denoiser, controller.plan, controller.call
    x, sigma = args
    condition = kwargs["cond"]
    batch, total = len(plan.has_negative), int(x.shape[0])
    keep = total - batch  # the cond rows
    x_images, sigma_images = x[keep:], sigma[keep:]
    params = call.params
    image_cond = params.image_cond[keep:] if isinstance(params.image_cond, Tensor) else None

    cond_scale, prompt_weights = _call_scale_and_weights(denoiser)
    coefficients = controller.coefficients(cond_scale, prompt_weights, sigma_images)
    needs = controller.needs(coefficients)
    keys = controller.active_keys(coefficients)
    host_images = [image for image, need in enumerate(needs) if need.needs_host_row]
    prior_images = [image for image, need in enumerate(needs) if need.slot is Slot.PRIOR]
    empty_images = [image for image, need in enumerate(needs) if need.slot is Slot.MAIN_EMPTY]
    if not keys and not prior_images and not empty_images and len(host_images) == batch:
        return None  # nothing to route or join: the WebUI's own call is exactly what is needed

    uncond_condition = select_rows(condition, slice(keep, total))
    own_rows = list(range(keep)) + [keep + image for image in host_images]
    main = controller.main_runner()
    blocks = [Block(main, None, x[own_rows], sigma[own_rows], select_rows(condition, own_rows))]
    if prior_images:
        blocks.append(source_block(plan.prior, prior_images, x_images, sigma_images, image_cond, denoiser.step))
    if empty_images:
        block = source_block(plan.main_empty, empty_images, x_images, sigma_images, image_cond, denoiser.step)
        blocks.append(Block(block.runner, block.model, block.x, block.sigma,
                            mark_like_webui_uncond(block.condition, params.text_uncond)))
    all_images = list(range(batch))
    blocks.extend(source_block(controller.source(key), all_images, x_images, sigma_images, image_cond,
                               denoiser.step) for key in keys)
    outputs = run_blocks(blocks, controller.stats)
    own = outputs[0]
    rows = _first_cond_rows(own[:keep], prompt_weights).to(own.dtype)  # FILLER rows unless replaced below
    negatives: dict[int, Tensor] = {}
    for position, image in enumerate(host_images):
        host_row = own[keep + position]
        if needs[image].slot is Slot.HOST:
            rows[image] = host_row
        else:
            negatives[image] = host_row
    cursor = 1
    for images in (prior_images, empty_images):
        if images:
            rows[images] = outputs[cursor].to(rows.dtype)
            cursor += 1
    predictions = dict(zip(keys, outputs[cursor:], strict=True))
    call.routed = Routed(needs, negatives, predictions, uncond_condition)
    call.webui_rows += keep + len(host_images)
    controller.stats.routed_calls += 1
    return torch.cat([own[:keep], rows])


def _first_cond_rows(cond_rows: Tensor, prompt_weights: list[list[float]]) -> Tensor:
    """A copy of each image's first cond row, as the WebUI fills skipped uncond rows (§3.3 step 12)."""
    starts, position = [], 0
    for parts in prompt_weights:
        starts.append(position)
        position += len(parts)
    return cond_rows[starts].clone()
