"""Infotext (PNG info) writing and the paste-back field list, both derived from `gcfg_core.params.PARAMS`.

Model parameters are written as "None" when empty, which is also the dropdowns' "none" choice, so every key
pastes by name (the WebUI's send-to buttons copy fields by infotext key only).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from gcfg_core.params import PARAMS, GCFGSettings, ParamKind
from gcfg_webui.args import NONE_CHOICE, normalise_model_choice


def generation_params(settings: GCFGSettings) -> dict[str, str]:
    """The `extra_generation_params` entries for `settings` (empty when disabled)."""
    values = settings.to_infotext()
    for param in PARAMS:
        if param.kind is ParamKind.MODEL and values.get(param.infotext_key) == "":
            values[param.infotext_key] = NONE_CHOICE
    return values


def settings_from_infotext(params: Mapping[str, str]) -> GCFGSettings:
    """Settings from a parsed infotext dict (the inverse of `generation_params`)."""
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


def disable_when_absent(infotext: str, params: dict) -> None:
    """`on_infotext_pasted` callback: an image without GCFG keys pastes as "GCFG off", not "unchanged"."""
    enabled_key = PARAMS[0].infotext_key
    if enabled_key not in params:
        params[enabled_key] = "False"
