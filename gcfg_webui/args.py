"""Script arguments to `GCFGSettings`: positional values in UI order, or one dict of named values (API).

Both forms are derived from `gcfg_core.params.PARAMS`; the UI's `ui()` returns one component per parameter in
that order, so `p.script_args[args_from:args_to]` lines up with `PARAMS`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from gcfg_core.params import PARAMS, PARAMS_BY_NAME, GCFGSettings, ParamKind
from gcfg_core.syntax import TermSyntaxError
from gcfg_webui.errors import GCFGRequestError

# UI and API spellings of "no prior model: use the current checkpoint" / "no concept model".
NONE_CHOICE = "None"
PRIOR_NONE_LABEL = "None — current checkpoint"
CONCEPT_NONE_LABEL = "None"
_NONE_SPELLINGS = {"", "none", PRIOR_NONE_LABEL.lower(), "none - current checkpoint"}


def normalise_model_choice(value: object) -> object:
    """Map the UI/API spellings of "none" to the settings' empty string; other values pass through."""
    if value is None:
        return ""
    if isinstance(value, str) and value.strip().lower() in _NONE_SPELLINGS:
        return ""
    return value


def _convert(name: str, value: object) -> object:
    param = PARAMS_BY_NAME[name]
    if param.kind is ParamKind.MODEL:
        return normalise_model_choice(value)
    return value


def _without_prefix(message: str, name: str) -> str:
    # gcfg_core's messages start with the parameter name, which GCFGRequestError already puts first.
    prefix = f"{name}: "
    return message[len(prefix):] if message.startswith(prefix) else message


def _settings(values: Mapping[str, object]) -> GCFGSettings:
    converted = {name: _convert(name, value) for name, value in values.items()}
    for name, value in converted.items():
        try:
            GCFGSettings(**{name: value})
        except TermSyntaxError as error:
            raise GCFGRequestError(name, f"{error} (in the extra terms text)") from error
        except ValueError as error:
            raise GCFGRequestError(name, _without_prefix(str(error), name)) from error
    return GCFGSettings(**converted)


def settings_from_args(args: Sequence[object]) -> GCFGSettings:
    """Settings from the script's argument slice: positional values in `PARAMS` order, or a single dict.

    Missing trailing positional values keep their defaults (the WebUI API pads with UI defaults too); unknown
    dict keys and invalid values are `GCFGRequestError`s naming the argument.
    """
    args = list(args)
    if args and isinstance(args[0], Mapping):
        # The WebUI fills the slots after the dict with the UI defaults: only the dict counts.
        named = dict(args[0])
        unknown = sorted(str(key) for key in named if key not in PARAMS_BY_NAME)
        if unknown:
            raise GCFGRequestError(unknown[0], f"unknown argument; valid names: {', '.join(p.name for p in PARAMS)}")
        return _settings(named)
    if len(args) > len(PARAMS):
        raise GCFGRequestError("args", f"expected at most {len(PARAMS)} positional values "
                                       f"({', '.join(p.name for p in PARAMS)}), got {len(args)}")
    values = {param.name: value for param, value in zip(PARAMS, args, strict=False) if value is not None}
    return _settings(values)


def positional_args(settings: GCFGSettings) -> list[object]:
    """The positional argument list (UI order) for `settings`: the inverse of `settings_from_args`."""
    return [getattr(settings, param.name) for param in PARAMS]
