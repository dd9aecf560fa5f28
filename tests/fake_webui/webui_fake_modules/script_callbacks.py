"""Global callbacks; every dispatcher swallows exceptions (the WebUI reports and continues)."""

from dataclasses import dataclass

from modules import errors

callbacks: dict[str, list] = {}


def _add(kind, fn):
    callbacks.setdefault(kind, []).append(fn)


def clear_callbacks():
    callbacks.clear()


def remove_callbacks_for_function(fn):
    for items in callbacks.values():
        while fn in items:
            items.remove(fn)


def _dispatch(kind, *args):
    for fn in list(callbacks.get(kind, [])):
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - faithful to the WebUI: callback errors never abort a generation
            errors.report(f"Error executing callback {kind}", exc_info=True)


@dataclass
class CFGDenoiserParams:
    x: object
    image_cond: object
    sigma: object
    sampling_step: int
    total_sampling_steps: int
    text_cond: object
    text_uncond: object
    denoiser: object = None


@dataclass
class CFGDenoisedParams:
    x: object
    sampling_step: int
    total_sampling_steps: int
    inner_model: object


def on_cfg_denoiser(fn, *, name=None):
    _add("cfg_denoiser", fn)


def on_cfg_denoised(fn, *, name=None):
    _add("cfg_denoised", fn)


def on_app_started(fn, *, name=None):
    _add("app_started", fn)


def on_ui_settings(fn, *, name=None):
    _add("ui_settings", fn)


def on_before_ui(fn, *, name=None):
    _add("before_ui", fn)


def on_infotext_pasted(fn, *, name=None):
    _add("infotext_pasted", fn)


def on_ui_tabs(fn, *, name=None):
    _add("ui_tabs", fn)


def on_script_unloaded(fn, *, name=None):
    _add("script_unloaded", fn)


def cfg_denoiser_callback(params):
    _dispatch("cfg_denoiser", params)


def cfg_denoised_callback(params):
    _dispatch("cfg_denoised", params)


def app_started_callback(demo, app):
    _dispatch("app_started", demo, app)


def ui_settings_callback():
    _dispatch("ui_settings")


def before_ui_callback():
    _dispatch("before_ui")


def infotext_pasted_callback(infotext, params):
    _dispatch("infotext_pasted", infotext, params)
