"""The one declared list of the user's GCFG parameters, and the settings object built from it.

`PARAMS` is data: the WebUI glue derives its widgets, API dict arguments, infotext keys and paste-back from it,
and `GCFGSettings` converts to and from infotext with the same records. Infotext values are plain strings
here; the infotext writer quotes values holding ``,``, ``:`` or line breaks as JSON (the WebUI's rule, see
`gcfg_core.pngmeta`), so the multi-line terms text survives a PNG round trip.

Infotext keys (written only when GCFG is enabled, and then only ``GCFG`` and the values that differ from their
defaults; absent keys take the defaults):
``GCFG``: "True"; ``GCFG prior``; ``GCFG concept``; ``GCFG concept weight``; ``GCFG negative scale``
("classic" or a number); ``GCFG terms`` (the terms box text, `gcfg_core.syntax`); ``GCFG uncond prompt``
("empty" or "prompt").
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass

from gcfg_core.syntax import format_number, parse_terms
from gcfg_core.terms import MAX_WEIGHT, GuidanceTerm

CLASSIC = "classic"


class ParamKind(str, enum.Enum):
    BOOL = "bool"
    TEXT = "text"  # one line
    MULTILINE = "multiline"
    NUMBER = "number"
    SCALE = "scale"  # a number, or "classic" = None
    MODEL = "model"  # a model name; "" = none
    CHOICE = "choice"  # one of `Param.choices`


class Widget(str, enum.Enum):
    """How the accordion shows a parameter (the WebUI glue maps each to a gradio component)."""

    ACCORDION = "accordion"  # the accordion's own on/off checkbox
    CHECKPOINT = "checkpoint"  # a dropdown of the WebUI's checkpoints, with a refresh button
    CONCEPT = "concept"  # a dropdown of the concept-model folder, with a refresh button
    SLIDER = "slider"
    TEXT = "text"  # a one-line text box
    TEXTAREA = "textarea"
    RADIO = "radio"


@dataclass(frozen=True)
class Param:
    """One user parameter: its settings field, label (UI and XYZ axis), type, default, range, infotext key, help,
    and where the accordion shows it (`widget`, in layout row `row`)."""

    name: str
    label: str
    kind: ParamKind
    default: object
    infotext_key: str
    help: str
    widget: Widget
    row: int
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    placeholder: str = ""
    xyz_axis: bool = True
    choices: tuple[str, ...] = ()


PARAMS: tuple[Param, ...] = (
    Param("enabled", "GCFG", ParamKind.BOOL, False, "GCFG",
          "Generalized classifier-free guidance: uncond from a prior, concept model, weighted terms.",
          Widget.ACCORDION, 0, xyz_axis=False),
    Param("prior", "Prior checkpoint", ParamKind.MODEL, "", "GCFG prior",
          "Checkpoint predicting the unconditional term, e.g. base SD 1.5; None = the current model. It matters "
          "when the negative prompt is empty or not classic (paper: unconditional guidance drift).",
          Widget.CHECKPOINT, 1),
    Param("concept", "Concept model", ParamKind.MODEL, "", "GCFG concept",
          "A text-free concept UNet file (.safetensors) from models/GCFG; None = no concept term.",
          Widget.CONCEPT, 2),
    Param("concept_weight", "Concept weight", ParamKind.NUMBER, 2.5, "GCFG concept weight",
          "Weight of the concept term on the CFG scale (paper: 2.5).", Widget.SLIDER, 2,
          minimum=-MAX_WEIGHT, maximum=MAX_WEIGHT, step=0.05),
    Param("negative_scale", "Negative prompt scale", ParamKind.SCALE, None, "GCFG negative scale",
          "Weight of the negative prompt term. 'classic' = the WebUI's behaviour: the negative prompt takes the "
          "unconditional's place (weight 1 − CFG scale − other weights), so the prior has no effect.",
          Widget.TEXT, 3, minimum=-MAX_WEIGHT, maximum=MAX_WEIGHT, step=0.5,
          placeholder="classic, or a number such as -2"),
    Param("terms", "Extra terms", ParamKind.MULTILINE, "", "GCFG terms",
          "One term per line: <weight> [@model] [{start-end}] <prompt>, e.g. '+4 in Van Gogh style' or "
          "'-2 @prior {0-0.5} blurry'. # starts a comment line.", Widget.TEXTAREA, 4,
          placeholder="+4 in Van Gogh style"),
    # Last, so that positional API args of earlier versions keep their meaning; the accordion shows it by the prior.
    Param("uncond_prompt", "Unconditional prompt", ParamKind.CHOICE, "empty", "GCFG uncond prompt",
          "What the unconditional term ε₀ (the prior) is conditioned on: 'empty', the empty prompt (the paper), or "
          "'prompt', the generation's own prompt — with an earlier or smaller checkpoint of the same family as the "
          "prior that is autoguidance (Karras et al. 2024). No effect with a classic negative prompt.",
          Widget.RADIO, 1, choices=("empty", "prompt")),
)
PARAMS_BY_NAME: dict[str, Param] = {param.name: param for param in PARAMS}


def _number(param: Param, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{param.name}: expected a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{param.name}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{param.name}: expected a finite number, got {value!r}")
    if (param.minimum is not None and number < param.minimum) or (param.maximum is not None and number > param.maximum):
        raise ValueError(f"{param.name}: {number:g} is outside [{param.minimum:g}, {param.maximum:g}]")
    return number


def convert_value(param: Param, value: object) -> object:
    """`value` (a Python value or its infotext/API string) as the field's type; ValueError naming the parameter."""
    if param.kind is ParamKind.BOOL:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise ValueError(f"{param.name}: expected true or false, got {value!r}")
    if param.kind is ParamKind.NUMBER:
        return _number(param, value)
    if param.kind is ParamKind.SCALE:
        if value is None or (isinstance(value, str) and value.strip().lower() in (CLASSIC, "")):
            return None
        return _number(param, value)
    if param.kind is ParamKind.CHOICE:
        text = value.strip().lower() if isinstance(value, str) else None
        if text not in param.choices:
            raise ValueError(f"{param.name}: expected one of {', '.join(param.choices)}, got {value!r}")
        return text
    if not isinstance(value, str):
        raise ValueError(f"{param.name}: expected text, got {value!r}")
    if param.kind in (ParamKind.TEXT, ParamKind.MODEL) and ("\n" in value or "\r" in value):
        raise ValueError(f"{param.name}: expected one line, got {value!r}")
    return value.strip() if param.kind is ParamKind.MODEL else value


def infotext_value(param: Param, value: object) -> str:
    """The unquoted infotext text for a field value (inverse of `convert_value`)."""
    if param.kind is ParamKind.BOOL:
        return str(bool(value))
    if param.kind is ParamKind.SCALE and value is None:
        return CLASSIC
    if param.kind in (ParamKind.NUMBER, ParamKind.SCALE):
        return format_number(float(value))
    return str(value)


class _SettingsMethods:
    """Behaviour of `GCFGSettings`; its fields are made from `PARAMS` below, so no default is written twice."""

    def __post_init__(self) -> None:
        for param in PARAMS:
            object.__setattr__(self, param.name, convert_value(param, getattr(self, param.name)))
        self.parsed_terms()  # raises TermSyntaxError (a ValueError) naming line and column

    def parsed_terms(self) -> tuple[GuidanceTerm, ...]:
        return parse_terms(self.terms)

    @classmethod
    def from_dict(cls, values: Mapping[str, object]):
        """Build from named values (API dict args); unknown names are an error listing the valid ones."""
        unknown = sorted(set(values) - set(PARAMS_BY_NAME))
        if unknown:
            raise ValueError(f"unknown GCFG parameter(s) {unknown}; valid: {[p.name for p in PARAMS]}")
        return cls(**values)

    def to_infotext(self) -> dict[str, str]:
        """Infotext key → unquoted value: ``GCFG`` and every value that differs from its default; nothing when
        disabled (the WebUI's rule for optional features: an absent key means the default)."""
        if not self.enabled:
            return {}
        values = {}
        for param in PARAMS:
            value = getattr(self, param.name)
            if param.name == "enabled" or value != param.default:
                values[param.infotext_key] = infotext_value(param, value)
        return values

    def changed_infotext(self) -> dict[str, str]:
        """The infotext the README's rule writes: ``GCFG: True`` and every value that differs from its default (no
        empty keys, no defaults); nothing when disabled. `from_infotext` restores the same settings."""
        values = self.to_infotext()
        return {param.infotext_key: values[param.infotext_key] for param in PARAMS
                if param.infotext_key in values
                and (param.name == "enabled" or values[param.infotext_key] != infotext_value(param, param.default))}

    @classmethod
    def from_infotext(cls, infotext: Mapping[str, str]):
        """Settings from parsed infotext; GCFG is enabled iff the ``GCFG`` key says True; missing keys default."""
        values = {}
        for param in PARAMS:
            if param.infotext_key in infotext:
                try:
                    values[param.name] = convert_value(param, infotext[param.infotext_key])
                except ValueError as error:
                    raise ValueError(f"infotext {param.infotext_key!r}: {error}") from None
        return cls(**values)


_FIELD_TYPES = {ParamKind.BOOL: bool, ParamKind.NUMBER: float, ParamKind.SCALE: float | None}

# The user's GCFG settings (fields = `PARAMS` names, defaults = their defaults); validated on construction.
GCFGSettings = dataclasses.make_dataclass(
    "GCFGSettings",
    [(param.name, _FIELD_TYPES.get(param.kind, str), dataclasses.field(default=param.default)) for param in PARAMS],
    bases=(_SettingsMethods,), frozen=True,
)
GCFGSettings.__module__ = __name__  # for repr and pickling; make_dataclass names its own module otherwise
GCFGSettings.__doc__ = "The user's GCFG settings: one field per `PARAMS` entry, validated on construction."
