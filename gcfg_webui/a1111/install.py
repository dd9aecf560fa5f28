"""Installing GCFG on one A1111 sampler and taking it off again.

Everything is per instance, so nothing shared is patched and nothing outlives the sampler:

* the CFGDenoiser's `combine_denoised` (an instance attribute wrapping whatever was there: the WebUI's method or
  another extension's wrapper), which runs `combine.gcfg_combine`;
* the sampler's inner-model wrapper's `forward` (created per CFGDenoiser, webui-internals §3.1), which runs the
  fast path `routing.intercept` and counts the WebUI's own rows; a refiner switch replaces that wrapper, and the
  `on_cfg_denoiser` callback wraps the new one before its first call;
* the sampler's `get_sigmas` / `get_timesteps`, to read the schedule the sampler runs (GCFG's steps);
* on a failed setup, the CFGDenoiser's `forward`, which raises the error at the first denoiser call: the WebUI
  swallows exceptions raised in callbacks and script hooks, but not in the sampling path.
"""

from __future__ import annotations

import logging

from gcfg_webui.a1111 import routing
from gcfg_webui.a1111.combine import gcfg_combine
from gcfg_webui.a1111.passes import PassController
from gcfg_webui.schedule_capture import WRAPPER_FLAG as _WRAPPER_FLAG
from gcfg_webui.schedule_capture import unwrap_attribute, unwrap_schedule, wrap_schedule

logger = logging.getLogger("gcfg.a1111.install")

CONTROLLER_ATTRIBUTE = "_gcfg_controller"


def controller_of(denoiser) -> PassController | None:
    return getattr(denoiser, CONTROLLER_ATTRIBUTE, None)


def capture_inputs(params) -> None:
    """`on_cfg_denoiser` callback: start the controller's call with its batched inputs."""
    controller = controller_of(params.denoiser)
    if controller is None:
        return
    controller.begin_call(params)
    if controller.inner_changed():
        wrap_inner_forward(params.denoiser, controller)


def _is_ours(function) -> bool:
    return getattr(function, _WRAPPER_FLAG, False)


def _original_combine(owner) -> object:
    return getattr(type(owner), "combine_denoised", None)


def combines_with_foreign_wrapper(denoiser) -> bool:
    """Whether the `combine_denoised` under GCFG's wrapper is another extension's rather than the WebUI's."""
    current = denoiser.__dict__.get("combine_denoised")
    below = getattr(current, "gcfg_original", None) if _is_ours(current) else current
    if below is None:
        return False
    return getattr(below, "__func__", None) is not _original_combine(denoiser)


def install(denoiser, sampler, controller: PassController) -> None:
    """Attach `controller` to the denoiser and wrap its combine step, its inner model and the schedule, once."""
    setattr(denoiser, CONTROLLER_ATTRIBUTE, controller)
    if not _is_ours(denoiser.__dict__.get("combine_denoised")):
        original = denoiser.combine_denoised

        def combine_denoised(x_out, conds_list, uncond, cond_scale):
            current = controller_of(denoiser)
            if current is None:
                return original(x_out, conds_list, uncond, cond_scale)
            return gcfg_combine(current, original, x_out, conds_list, uncond, cond_scale)

        setattr(combine_denoised, _WRAPPER_FLAG, True)
        combine_denoised.gcfg_original = original
        denoiser.combine_denoised = combine_denoised
    controller.foreign_combine = combines_with_foreign_wrapper(denoiser)
    wrap_inner_forward(denoiser, controller)
    wrap_schedule(sampler, controller)


def wrap_inner_forward(denoiser, controller: PassController) -> None:
    """Give the sampler's current inner-model wrapper an instance `forward` that runs the fast path first."""
    inner = denoiser.inner_model
    current = inner.__dict__.get("forward")
    if current is not None and _is_ours(current):
        controller.wrapped_inner(inner, current.gcfg_original)
        return
    original = inner.forward

    def forward(*args, **kwargs):
        active = controller_of(denoiser)
        if active is not None:
            out = routing.intercept(active, original, args, kwargs)
            if out is not None:
                return out
            if active.call is not None:  # one of the WebUI's own calls
                active.call.webui_rows += int(args[0].shape[0]) if args else 0
                active.stats.add_call("main")
        return original(*args, **kwargs)

    setattr(forward, _WRAPPER_FLAG, True)
    forward.gcfg_original = original
    inner.forward = forward
    controller.wrapped_inner(inner, original)


def remove(denoiser, sampler=None) -> None:
    """Detach the controller and undo every wrapper where it is still the outermost one."""
    if hasattr(denoiser, CONTROLLER_ATTRIBUTE):
        setattr(denoiser, CONTROLLER_ATTRIBUTE, None)
    unwrap_attribute(denoiser, "combine_denoised")
    inner = getattr(denoiser, "model_wrap", None)  # not the property: it would build a wrapper
    if inner is not None:
        unwrap_attribute(inner, "forward")
    if sampler is not None:
        unwrap_schedule(sampler)


def install_failure(denoiser, error: Exception) -> None:
    """Make the sampler's first denoiser call raise `error`: hooks swallow exceptions, the sampling path not."""

    def forward(*args, **kwargs):
        raise error

    denoiser.forward = forward


def remove_failure(denoiser) -> None:
    denoiser.__dict__.pop("forward", None)
