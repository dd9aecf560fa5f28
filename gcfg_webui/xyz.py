"""XYZ-plot axes for GCFG parameters: concept weight, negative scale, prior and extra terms.

An axis value is stored in `p.gcfg_overrides`; `process()` applies it over the accordion's values, so the
plot varies one parameter while GCFG's own controls stay as the user set them.
"""

from __future__ import annotations

import logging

from gcfg_core.params import PARAMS, ParamKind
from gcfg_webui.generation import OVERRIDES_ATTRIBUTE

logger = logging.getLogger("gcfg.xyz")

AXIS_PREFIX = "[GCFG] "
AXES = tuple(param.name for param in PARAMS if param.xyz_axis)


def _apply(name: str):
    def apply(p, value, values) -> None:
        overrides = dict(getattr(p, OVERRIDES_ATTRIBUTE, None) or {})
        overrides[name] = value
        setattr(p, OVERRIDES_ATTRIBUTE, overrides)

    return apply


def axis_specs(prior_choices):
    """(label, type, apply, choices) for each axis, labelled as in the accordion; choices for the prior."""
    return [(AXIS_PREFIX + param.label, float if param.kind is ParamKind.NUMBER else str, _apply(param.name),
             prior_choices if param.name == "prior" else None) for param in PARAMS if param.xyz_axis]


def add_axes(xyz_module, prior_choices) -> int:
    """Append the axes to the XYZ script's `axis_options` once; returns how many were added."""
    existing = {option.label for option in xyz_module.axis_options}
    added = 0
    for label, kind, apply, choices in axis_specs(prior_choices):
        if label in existing:
            continue
        xyz_module.axis_options.append(xyz_module.AxisOption(label, kind, apply, choices=choices))
        added += 1
    return added


def find_xyz_module(scripts_data):
    """The loaded `xyz_grid.py` script module, or None when the XYZ script is absent."""
    for data in scripts_data:
        if data.script_class.__module__ == "xyz_grid.py" and hasattr(data.module, "AxisOption"):
            return data.module
    return None
