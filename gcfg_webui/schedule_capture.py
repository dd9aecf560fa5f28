"""Capture the noise schedule a sampler computes, for GCFG's σ-based step windows (shared by every host adapter).

Both AUTOMATIC1111 and Forge samplers compute their schedule with `get_sigmas` (k-diffusion, σ descending) or
`get_timesteps` (DDIM/PLMS/UniPC family, ascending). GCFG wraps these per sampler instance so each pass's
controller sees the schedule the sampler actually uses, instead of re-deriving it.
"""

from __future__ import annotations

import functools

SCHEDULE_METHODS = (("get_sigmas", True), ("get_timesteps", False))  # (method, schedule descending)
WRAPPER_FLAG = "_gcfg_wrapper"
SCHEDULE_ATTRIBUTE = "_gcfg_schedule_controller"


def is_ours(function) -> bool:
    return getattr(function, WRAPPER_FLAG, False)


def wrap_schedule(sampler, controller) -> None:
    """Route the schedule `sampler` computes to `controller.set_schedule` (idempotent per sampler)."""
    for name, descending in SCHEDULE_METHODS:
        original = sampler.__dict__.get(name) or getattr(sampler, name, None)
        if original is None or is_ours(original):
            continue

        def capture(*args, _original=original, _descending=descending, **kwargs):
            values = _original(*args, **kwargs)
            active = getattr(sampler, SCHEDULE_ATTRIBUTE, None)
            if active is not None:
                active.set_schedule(values, _descending)
            return values

        wrapper = functools.wraps(original)(capture)
        setattr(wrapper, WRAPPER_FLAG, True)
        wrapper.gcfg_original = original
        setattr(sampler, name, wrapper)
    setattr(sampler, SCHEDULE_ATTRIBUTE, controller)


def unwrap_attribute(owner, name: str) -> None:
    """Undo our instance attribute `name` if it is the outermost one (else leave it inert)."""
    current = owner.__dict__.get(name)
    if current is None or not is_ours(current):
        return
    original = current.gcfg_original
    if getattr(original, "__self__", None) is owner and getattr(original, "__func__", None) is getattr(
            type(owner), name, None):
        delattr(owner, name)
    else:
        setattr(owner, name, original)


def unwrap_schedule(sampler) -> None:
    """Undo `wrap_schedule` where our wrappers are still the outermost ones, and detach the controller."""
    for name, _ in SCHEDULE_METHODS:
        unwrap_attribute(sampler, name)
    sampler.__dict__.pop(SCHEDULE_ATTRIBUTE, None)
