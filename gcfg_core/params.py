"""The one declared list of the user's GCFG parameters, and the settings object built from it.

`PARAMS` is data: the WebUI glue derives its widgets, API dict arguments, infotext keys and paste-back from it,
and `GCFGSettings` converts to and from infotext with the same records. Infotext values are plain strings
here; the infotext writer quotes values holding ``,``, ``:`` or line breaks as JSON (the WebUI's rule, see
`gcfg_core.pngmeta`), so the multi-line terms text survives a PNG round trip.

Infotext keys (written only when GCFG is enabled; absent keys take the defaults):
``GCFG``: "True"; ``GCFG prior``; ``GCFG concept``; ``GCFG concept weight``; ``GCFG negative scale``
("classic" or a number); ``GCFG terms`` (the terms box text, `gcfg_core.syntax`).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass

from gcfg_core.syntax import format_number, parse_terms
from gcfg_core.terms import GuidanceTerm

CLASSIC = "classic"


class ParamKind(str, enum.Enum):
    BOOL = "bool"
    TEXT = "text"  # one line
    MULTILINE = "multiline"
    NUMBER = "number"
    SCALE = "scale"  # a number, or "classic" = None
    MODEL = "model"  # a model name; "" = none


@dataclass(frozen=True)
class Param:
    """One user parameter: its field in `GCFGSettings`, UI label, type, default, range, infotext key and help."""

    name: str
    label: str
    kind: ParamKind
    default: object
    infotext_key: str
    help: str
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None


PARAMS: tuple[Param, ...] = (
    Param("enabled", "Enable GCFG", ParamKind.BOOL, False, "GCFG",
          "Generalized classifier-free guidance: uncond from a prior, concept model, weighted terms."),
    Param("prior", "Prior (unconditional model)", ParamKind.MODEL, "", "GCFG prior",
          "Checkpoint predicting the unconditional term, e.g. base SD 1.5; empty = the current model. It matters "
          "when the negative prompt is empty or not classic (paper: unconditional guidance drift)."),
    Param("concept", "Concept model", ParamKind.MODEL, "", "GCFG concept",
          "A text-free concept UNet file (.safetensors); empty = none."),
    Param("concept_weight", "Concept weight", ParamKind.NUMBER, 2.5, "GCFG concept weight",
          "Weight of the concept term (paper: 2.5).", minimum=-30.0, maximum=30.0, step=0.05),
    Param("negative_scale", "Negative prompt scale", ParamKind.SCALE, None, "GCFG negative scale",
          "Weight of the negative prompt term. 'classic' = the WebUI's behaviour: the negative prompt takes the "
          "unconditional's place (weight 1 − CFG scale − other weights), so the prior has no effect.",
          minimum=-30.0, maximum=30.0, step=0.5),
    Param("terms", "Extra terms", ParamKind.MULTILINE, "", "GCFG terms",
          "One term per line: <weight> [@model] [{start-end}] <prompt>, e.g. '+4 in Van Gogh style' or "
          "'-2 @prior {0-0.5} blurry'. # starts a comment line."),
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


@dataclass(frozen=True)
class GCFGSettings:
    """The user's GCFG settings (fields = `PARAMS` names); validated on construction."""

    enabled: bool = False
    prior: str = ""
    concept: str = ""
    concept_weight: float = 2.5
    negative_scale: float | None = None  # None = classic: the negative prompt replaces the uncond
    terms: str = ""

    def __post_init__(self) -> None:
        for param in PARAMS:
            object.__setattr__(self, param.name, convert_value(param, getattr(self, param.name)))
        self.parsed_terms()  # raises TermSyntaxError (a ValueError) naming line and column

    def parsed_terms(self) -> tuple[GuidanceTerm, ...]:
        return parse_terms(self.terms)

    @classmethod
    def from_dict(cls, values: Mapping[str, object]) -> GCFGSettings:
        """Build from named values (API dict args); unknown names are an error listing the valid ones."""
        unknown = sorted(set(values) - set(PARAMS_BY_NAME))
        if unknown:
            raise ValueError(f"unknown GCFG parameter(s) {unknown}; valid: {[p.name for p in PARAMS]}")
        return cls(**values)

    def to_infotext(self) -> dict[str, str]:
        """Infotext key → unquoted value; empty when disabled (nothing to write)."""
        if not self.enabled:
            return {}
        return {param.infotext_key: infotext_value(param, getattr(self, param.name)) for param in PARAMS}

    def changed_infotext(self) -> dict[str, str]:
        """The infotext the README's rule writes: ``GCFG: True`` and every value that differs from its default (no
        empty keys, no defaults); nothing when disabled. `from_infotext` restores the same settings."""
        values = self.to_infotext()
        return {param.infotext_key: values[param.infotext_key] for param in PARAMS
                if param.infotext_key in values
                and (param.name == "enabled" or values[param.infotext_key] != infotext_value(param, param.default))}

    @classmethod
    def from_infotext(cls, infotext: Mapping[str, str]) -> GCFGSettings:
        """Settings from parsed infotext; GCFG is enabled iff the ``GCFG`` key says True; missing keys default."""
        values = {}
        for param in PARAMS:
            if param.infotext_key in infotext:
                try:
                    values[param.name] = convert_value(param, infotext[param.infotext_key])
                except ValueError as error:
                    raise ValueError(f"infotext {param.infotext_key!r}: {error}") from None
        return cls(**values)

