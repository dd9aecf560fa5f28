"""One generation's GCFG state, shared by every host: validated settings → terms, the side models, the error.

A `Generation` is created in `process()` and attached to `p`. It never raises there (the WebUI would swallow
it) but keeps the error, which the host's sampling hook raises at the first denoiser call so the request stops
before any UNet row. The host adapter loads the side models (`load`), builds each pass and records statistics.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from gcfg_core.params import PARAMS, GCFGSettings
from gcfg_core.terms import GuidanceTerm, ModelSlot
from gcfg_webui.args import settings_from_args
from gcfg_webui.errors import GCFGRequestError

logger = logging.getLogger("gcfg.generation")

GENERATION_ATTRIBUTE = "gcfg_generation"
OVERRIDES_ATTRIBUTE = "gcfg_overrides"  # {param name: value}, set by the XYZ-plot axes


@dataclass
class Generation:
    """One generation: validated settings, the terms, the loaded side models (host objects), or the error."""

    settings: GCFGSettings
    terms: tuple[GuidanceTerm, ...] = ()
    prior: object | None = None
    concept: object | None = None
    checkpoints: dict[str, object] = field(default_factory=dict)
    error: Exception | None = None
    stats: list = field(default_factory=list)  # one row-statistics object per sampler pass
    cond_caches: dict[tuple, list] = field(default_factory=dict)

    @property
    def uses_side_models(self) -> bool:
        return bool(self.settings.prior) or any(term.model != ModelSlot.MAIN.value for term in self.terms)

    @property
    def changes_nothing(self) -> bool:
        """No term, no prior, a classic negative, the empty uncond prompt: enabled equals disabled everywhere (no
        checks either)."""
        settings = self.settings
        return (not self.terms and not settings.prior and settings.negative_scale is None
                and settings.uncond_prompt == "empty")


def generation_terms(settings: GCFGSettings) -> tuple[GuidanceTerm, ...]:
    """The concept term (when a concept model is chosen and its weight ≠ 0) followed by the extra terms."""
    terms = []
    if settings.concept and settings.concept_weight != 0.0:
        terms.append(GuidanceTerm(ModelSlot.CONCEPT.value, None, settings.concept_weight, label="concept"))
    terms.extend(settings.parsed_terms())
    return tuple(terms)


def settings_for(p, args: Sequence[object]) -> GCFGSettings:
    """The script args as settings, with the XYZ-plot overrides of `p` applied over them."""
    settings = settings_from_args(args)
    overrides = getattr(p, OVERRIDES_ATTRIBUTE, None)
    if overrides:
        settings = settings_from_args([{**{param.name: getattr(settings, param.name) for param in PARAMS},
                                        **overrides}])
    return settings


def start_generation(p, args: Sequence[object], load: Callable[[Generation, object], None]) -> Generation | None:
    """`process()` work: unpack and validate args, then the host's `load(generation, p)` checks the model and
    loads the side models. None when GCFG is disabled; errors are kept in the generation."""
    try:
        settings = settings_for(p, args)
    except GCFGRequestError as error:
        return Generation(GCFGSettings(), error=error)
    if not settings.enabled:
        return None
    generation = Generation(settings, terms=generation_terms(settings))
    if generation.changes_nothing:
        return generation
    try:
        load(generation, p)
    except GCFGRequestError as error:
        generation.error = error
    return generation


_last_run: dict = {}


def record_last_run(generation: Generation | None) -> None:
    """Keep the row counts of the latest generation for GET /gcfg/v1/last-run (diagnostics only)."""
    _last_run.clear()
    if generation is None:
        _last_run.update({"enabled": False})
        return
    _last_run.update({
        "enabled": True,
        "error": None if generation.error is None else str(generation.error),
        "passes": [{"path": stats.path, "calls": stats.calls, "skipped_calls": stats.skipped_calls,
                    "routed_calls": stats.routed_calls, "step_source": stats.step_source,
                    "steps": list(stats.steps_seen), "rows_per_call": stats.per_call(),
                    "model_calls_per_call": stats.calls_per_call()}
                   for stats in generation.stats],
    })


def last_run() -> dict:
    return dict(_last_run)
