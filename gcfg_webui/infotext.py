"""Infotext (PNG info) writing and the paste-back field list, both derived from `gcfg_core.params.PARAMS`.

Only ``GCFG: True`` and the parameters that differ from their defaults are written, as the WebUI does for its own
optional features. Pasting fills the absent GCFG keys with their defaults (an `on_infotext_pasted` callback),
because the WebUI leaves a control unchanged when its key is missing; the fields stay plain `(component, key)`
pairs so that the "Send to img2img/inpaint" buttons, which copy fields by key, carry them too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping, Sequence

from gcfg_core.params import PARAMS, PARAMS_BY_NAME, GCFGSettings, ParamKind, infotext_value
from gcfg_webui.args import NONE_CHOICE, normalise_model_choice

ENABLED_KEY = PARAMS_BY_NAME["enabled"].infotext_key
PRIOR_KEY = PARAMS_BY_NAME["prior"].infotext_key


def _default_text(param) -> str:
    text = infotext_value(param, param.default)
    return NONE_CHOICE if param.kind is ParamKind.MODEL and text == "" else text


def generation_params(settings: GCFGSettings) -> dict[str, str]:
    """The `extra_generation_params` entries for `settings`: ``GCFG`` plus every non-default value (none when off)."""
    return settings.to_infotext()


def settings_from_infotext(params: Mapping[str, str]) -> GCFGSettings:
    """Settings from a parsed infotext dict (the inverse of `generation_params`; absent keys are defaults)."""
    values = dict(params)
    for param in PARAMS:
        if param.kind is ParamKind.MODEL and param.infotext_key in values:
            values[param.infotext_key] = normalise_model_choice(values[param.infotext_key])
    return GCFGSettings.from_infotext(values)


def ui_value(param, value: object) -> object:
    """A settings value as its UI component holds it (dropdowns: "None"; negative scale: text)."""
    if param.kind is ParamKind.MODEL:
        return value or NONE_CHOICE
    if param.kind is ParamKind.SCALE:
        return "classic" if value is None else format(float(value), "g")
    return value


def infotext_fields(components: Sequence[object]) -> list[tuple[object, str]]:
    """`(component, infotext key)` pairs, one per parameter, in `PARAMS` order (the `ui()` return order)."""
    if len(components) != len(PARAMS):
        raise ValueError(f"expected {len(PARAMS)} components, got {len(components)}")
    return [(component, param.infotext_key) for component, param in zip(components, PARAMS, strict=True)]


def paste_field_names() -> list[str]:
    return [param.infotext_key for param in PARAMS]


def complete_pasted(params: MutableMapping[str, str], prior_choice: Callable[[str], str] | None = None) -> None:
    """`on_infotext_pasted` body: no ``GCFG`` key → GCFG off; else absent keys → defaults, prior → a dropdown choice.

    `prior_choice` maps a written prior (a checkpoint name or an older title) to the title the prior dropdown
    offers now (titles gain a ``[hash]`` once the WebUI has hashed the file).
    """
    if ENABLED_KEY not in params:
        params[ENABLED_KEY] = "False"
        return
    for param in PARAMS:
        params.setdefault(param.infotext_key, _default_text(param))
    if prior_choice is not None and normalise_model_choice(params[PRIOR_KEY]) != "":
        params[PRIOR_KEY] = prior_choice(params[PRIOR_KEY])
