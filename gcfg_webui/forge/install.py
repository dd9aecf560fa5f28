"""Installing GCFG on one Forge pass and taking it off again.

Forge's patch API works on a clone of the main UNet patcher that the pass puts back as
`sd_model.forge_objects.unet` (Forge restores the un-patched one before every pass). On that clone GCFG sets:

* a conditioning modifier (last of the list, so it sees the CFG scale and conditions Forge will use): the call's
  coefficients; at calls Forge combines at scale 1 without the uncond (NGMS, Skip Early CFG) it drops the uncond
  as Forge's CFG-1 shortcut does, and GCFG stays out;
* the UNet function wrapper (Forge has one slot: a wrapper set before GCFG's is called by GCFG's, and routing is
  then off, since that wrapper may expect Forge's own chunk layout);
* a post-CFG function, first of the list;
* `disable_cfg1_optimization` where E₀ or N can matter at CFG 1 (terms, a numeric negative scale);
* the side models' patchers, for Forge's memory management (`add_extra_model_patcher_during_sampling`).

It also wraps the sampler's `get_sigmas` / `get_timesteps` (instance attributes) to read the schedule. Every hook
is a plain function (Forge deep-copies `model_options` when a later script clones the patcher) and does nothing
once the pass's controller is detached.
"""

from __future__ import annotations

import logging

from gcfg_webui.errors import GCFGRequestError
from gcfg_webui.forge.combine import gcfg_post_cfg
from gcfg_webui.forge.passes import PassController, is_ours, mark_ours
from gcfg_webui.forge.routing import gcfg_wrapper

logger = logging.getLogger("gcfg.forge.install")


class _Holder:
    """The controller a pass's hooks use; detached (None) when the generation ends."""

    def __init__(self, controller: PassController) -> None:
        self.controller: PassController | None = controller


def foreign_wrapper(unet) -> object | None:
    """Another extension's UNet function wrapper on this patcher, if any."""
    wrapper = unet.model_options.get("model_function_wrapper")
    return None if wrapper is None or getattr(wrapper, "_gcfg_forge_hook", False) else wrapper


def install(unet, controller: PassController, side_patchers) -> _Holder:
    """Put GCFG's hooks on the UNet patcher clone `unet`; returns the holder that `remove` detaches."""
    holder = _Holder(controller)
    options = unet.model_options

    def modifier(model, x, timestep, uncond, cond, cond_scale, model_options, seed):
        active = holder.controller
        if active is not None:
            call = active.begin_call(model, x, timestep, uncond, cond, cond_scale, model_options)
            if call.skipped:
                uncond = None
        return model, x, timestep, uncond, cond, cond_scale, model_options, seed

    previous = options.get("model_function_wrapper")

    def wrapper(apply_model, args):
        active = holder.controller
        if active is None:
            return previous(apply_model, args) if previous is not None else apply_model(
                args["input"], args["timestep"], **args["c"])
        return gcfg_wrapper(active, previous, apply_model, args)

    def post_cfg(args):
        active = holder.controller
        return args["denoised"] if active is None else gcfg_post_cfg(active, args)

    options.setdefault("conditioning_modifiers", []).append(mark_ours(modifier))
    options["model_function_wrapper"] = mark_ours(wrapper)
    options["sampler_post_cfg_function"] = [mark_ours(post_cfg), *options.get("sampler_post_cfg_function", [])]
    if controller.plan.needs_uncond_at_cfg_one:
        options["disable_cfg1_optimization"] = True
    for patcher in side_patchers:
        if patcher not in unet.extra_model_patchers_during_sampling:
            unet.add_extra_model_patcher_during_sampling(patcher)
    return holder


def _wrap_forward(denoiser, wrap) -> None:
    """Put `wrap(inner)` on the denoiser instance as its forward; another extension's instance wrapper found there is
    its `inner` and comes back with `remove_failure`."""
    remove_failure(denoiser)
    foreign = denoiser.__dict__.get("forward")
    forward = mark_ours(wrap(foreign if foreign is not None else type(denoiser).forward.__get__(denoiser)))
    forward.gcfg_below = foreign
    denoiser.forward = forward


def install_failure(denoiser, error: Exception) -> None:
    """Make the sampler's first denoiser call raise `error`: Forge swallows exceptions raised in script hooks, but
    not in the sampling path."""

    def wrap(_inner):
        def forward(*args, **kwargs):
            raise error

        return forward

    _wrap_forward(denoiser, wrap)


def hooks_not_called_error() -> GCFGRequestError:
    return GCFGRequestError("enabled", "GCFG's hooks were not called during a denoiser step: this Forge build "
                                       "samples without the UNet patcher's conditioning modifiers that GCFG's "
                                       "Forge adapter uses, so the image would not be guided; disable GCFG on this "
                                       "host")


def install_call_check(denoiser, holder: _Holder) -> None:
    """Make every denoiser call of the pass check that it went through GCFG's conditioning modifier.

    A Forge whose sampling function no longer calls the patcher's hooks (a changed backend, a continuation GCFG
    was not proven on) would otherwise sample an unguided image without a word; this way the first such step
    raises, in the sampling path, where Forge does not swallow it.
    """

    def wrap(inner):
        def forward(*args, **kwargs):
            controller = holder.controller
            calls_before = None if controller is None else controller.stats.calls
            result = inner(*args, **kwargs)
            if controller is not None and holder.controller is controller and controller.stats.calls == calls_before:
                raise hooks_not_called_error()
            return result

        return forward

    _wrap_forward(denoiser, wrap)


def remove_failure(denoiser) -> None:
    """Take off what `install_failure` or `install_call_check` put on the denoiser; a wrapper of another
    extension's that the check was put over comes back."""
    ours = denoiser.__dict__.get("forward")
    if not is_ours(ours):
        return
    below = getattr(ours, "gcfg_below", None)
    if below is None:
        del denoiser.__dict__["forward"]
    else:
        denoiser.forward = below
