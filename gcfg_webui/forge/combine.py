"""The post-CFG function: GCFG's combination on top of Forge's (paper Eq. 3 per image).

Forge has combined ``X + s·Σⱼaⱼ(Pⱼ − X)`` (or another extension's CFG function has) around its uncond prediction X,
which holds, per image, what `routing` put there: E₀, the negative prompt N, or nothing. With the coefficients of
`gcfg_core.coefficients`, GCFG adds what that combination lacks:

    + c₀·(E₀ − X)   unless X holds E₀       + n·(N − X)   unless X holds N       + Σₖ tₖ·(Tₖ − X)

which gives ``c₀E₀ + ΣpP + nN + ΣtT`` whatever X holds, because ``c₀ + Σp + n + Σt = 1``. Running first among
the post-CFG functions, it hands the next ones (PAG, …) GCFG's result as ``denoised`` and X as the uncond.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from gcfg_webui.forge.passes import Holds, PassController
from gcfg_webui.forge.routing import complete

logger = logging.getLogger("gcfg.forge.combine")


class UnobservedCallError(RuntimeError):
    """GCFG's conditioning modifier did not run for a denoiser call: something replaced Forge's sampling function."""


def gcfg_post_cfg(controller: PassController, args: dict) -> Tensor:
    denoised = args["denoised"]
    call = controller.end_call()
    if call is None:
        raise UnobservedCallError("GCFG: the denoiser call's conditions were not seen; another extension may have "
                                  "replaced Forge's sampling function. Disable GCFG or that extension.")
    if call.skipped:
        return denoised
    complete(controller, call)
    uncond = args["uncond_denoised"]
    coefficients = call.coefficients
    deltas = torch.zeros_like(denoised)
    for image, holds in enumerate(call.holds):
        slot = uncond[image]
        c0, n = coefficients.images[image].uncond, coefficients.images[image].negative
        if c0 != 0.0 and holds is not Holds.E0:
            deltas[image] += c0 * (call.e0[image].to(slot) - slot)
        if n != 0.0 and holds is not Holds.NEGATIVE:
            deltas[image] += n * (call.negatives[image].to(slot) - slot)
    result = denoised + deltas
    for term, weight in coefficients.terms:
        result = result + weight * (call.predictions[term.key].to(uncond) - uncond)
    return result
