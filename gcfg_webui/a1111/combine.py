"""The `combine_denoised` wrapper: GCFG's combination on top of the WebUI's own (paper Eq. 3 per image).

For each denoiser call, with the coefficients of `gcfg_core.coefficients` and the needs of
`gcfg_webui.uncond_slot`:

1. the uncond rows of `x_out` get what each image needs there (E₀ from the prior or the current model, the
   WebUI's own row, or nothing); whatever the fast path did not evaluate is evaluated now, batched per model;
2. the WebUI's combination (or another extension's wrapper under this one) runs on that: it weighs the prompt's
   rows with the CFG scale and AND weights, around the uncond rows;
3. the negative prompt (where it is a term of its own) and every active term are added:
   ``+ n·(N − slot) + Σₖ tₖ·(Tₖ − slot)``.

Calls where the WebUI skipped the uncond rows (NGMS, Skip Early CFG — observed from the rows it evaluated) use
the cond prediction alone, as the WebUI does; GCFG stays out of them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor

from gcfg_webui.a1111.passes import PassController
from gcfg_webui.a1111.rows import Block, mark_like_webui_uncond, run_blocks, select_rows, source_block
from gcfg_webui.uncond_slot import Slot

logger = logging.getLogger("gcfg.a1111.combine")


class UnobservedCallError(RuntimeError):
    """GCFG saw none of the WebUI's UNet rows of a call: another extension replaced the denoiser's internals."""


def gcfg_combine(controller: PassController, original: Callable, x_out: Tensor, conds_list, uncond,
                 cond_scale: float) -> Tensor:
    call = controller.end_call()
    if call is None:
        raise UnobservedCallError("GCFG: the denoiser inputs were not captured; another extension may have "
                                  "replaced CFGDenoiser.forward. Disable GCFG or that extension.")
    controller.apply_model_switch()
    plan, stats, denoiser = controller.plan, controller.stats, controller.denoiser
    batch = len(conds_list)
    stats.calls += 1
    stats.webui_rows += call.webui_rows
    routed = call.routed
    if routed is None and call.webui_rows == int(x_out.shape[0]) - batch:
        # The WebUI evaluated the cond rows only (NGMS / Skip Early CFG) and combines them at scale 1.
        stats.skipped_calls += 1
        return original(x_out, conds_list, uncond, cond_scale)
    if routed is None and call.webui_rows == 0:
        raise UnobservedCallError("GCFG: the WebUI's UNet call was not observed; another extension may have "
                                  "replaced the sampler's inner model. Disable GCFG or that extension.")

    params = call.params
    x, sigma = params.x[-batch:], params.sigma[-batch:]
    image_cond = params.image_cond[-batch:] if isinstance(params.image_cond, Tensor) else None
    prompt_weights = [[weight for _, weight in conds] for conds in conds_list]
    coefficients = controller.coefficients(cond_scale, prompt_weights, sigma)
    stats.steps_seen.append(controller.step_of(sigma)[0])
    needs = controller.needs(coefficients)
    rows = x_out[-batch:]
    held = [need.slot for need in routed.needs] if routed is not None else [Slot.HOST] * batch
    negatives = dict(routed.negatives) if routed is not None else {}
    predictions = dict(routed.predictions) if routed is not None else {}

    # N kept aside where the slot will hold E₀; where the slot already holds the WebUI's row, copy it first.
    for image, need in enumerate(needs):
        if need.negative_aside and image not in negatives and held[image] is Slot.HOST:
            negatives[image] = rows[image].clone()

    main = controller.main_runner()
    late_host = [image for image, need in enumerate(needs)
                 if (need.slot is Slot.HOST and held[image] is not Slot.HOST)
                 or (need.negative_aside and image not in negatives)]
    wanted = {slot: [image for image, need in enumerate(needs) if need.slot is slot and held[image] is not slot]
              for slot in (Slot.PRIOR, Slot.MAIN_EMPTY)}
    missing = [key for key in controller.active_keys(coefficients) if key not in predictions]

    blocks: list[Block] = []
    if late_host:  # the WebUI's own uncond rows, which the fast path left out
        blocks.append(Block(main, None, x[late_host], sigma[late_host],
                            select_rows(routed.uncond_condition, late_host)))
        stats.webui_rows += len(late_host)
    if wanted[Slot.PRIOR]:
        blocks.append(source_block(plan.prior, wanted[Slot.PRIOR], x, sigma, image_cond, denoiser.step))
    if wanted[Slot.MAIN_EMPTY]:
        block = source_block(plan.main_empty, wanted[Slot.MAIN_EMPTY], x, sigma, image_cond, denoiser.step)
        blocks.append(Block(block.runner, block.model, block.x, block.sigma,
                            mark_like_webui_uncond(block.condition, params.text_uncond)))
    all_images = list(range(batch))
    blocks.extend(source_block(controller.source(key), all_images, x, sigma, image_cond, denoiser.step)
                  for key in missing)
    outputs = iter(run_blocks(blocks, stats))

    if late_host:
        host_rows = next(outputs).to(rows.dtype)
        for position, image in enumerate(late_host):
            if needs[image].slot is Slot.HOST:
                rows[image] = host_rows[position]
            else:
                negatives[image] = host_rows[position]
    for slot in (Slot.PRIOR, Slot.MAIN_EMPTY):
        if wanted[slot]:
            rows[wanted[slot]] = next(outputs).to(rows.dtype)
    predictions.update(zip(missing, outputs, strict=True))

    if getattr(denoiser, "need_last_noise_uncond", False):
        # DDIM CFG++ renoises with the uncond prediction it stored before this call: the rows GCFG combines around.
        denoiser.last_noise_uncond = rows.clone()
    denoised = original(x_out, conds_list, uncond, cond_scale)
    aside = [image for image, need in enumerate(needs) if need.negative_aside]
    if aside:
        weights = torch.zeros(batch, dtype=rows.dtype, device=rows.device)
        deltas = torch.zeros_like(rows)
        for image in aside:
            weights[image] = coefficients.images[image].negative
            deltas[image] = negatives[image].to(rows.dtype) - rows[image]
        denoised = denoised + weights.view(-1, *([1] * (rows.dim() - 1))) * deltas
    for term, weight in coefficients.terms:
        denoised = denoised + weight * (predictions[term.key].to(rows.dtype) - rows)
    return denoised
