"""What a standalone GCFG generation evaluates: the uncond source, the prompt, the negative prompt, the weights.

The plan names the row sources as (model, prompt) pairs; `gcfg_core.coefficients` gives each its coefficient
at each step, and `gcfg_core.denoiser.GCFGDenoiser` evaluates the pairs whose coefficient is not 0.

A model is a plain string: one of the slots in `ModelSlot` (``"prior"``, ``"main"``, ``"concept"``) or any other
name (a checkpoint); whoever runs the plan maps names to denoisers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from gcfg_core.coefficients import GuidanceWeights, StepCoefficients
from gcfg_core.terms import GuidanceTerm, ModelSlot

SourceKey = tuple[str, str | None]  # (model, prompt); prompt None = no text (the text-free concept UNet)


@dataclass(frozen=True)
class GuidancePlan:
    """E₀ from `uncond_model` with `uncond_prompt`, the prompt and negative prompt on `main_model`, the weights.

    `uncond_prompt` "" is the paper's unconditional term; the generation's own prompt there, with a weaker model
    as `uncond_model`, is autoguidance (Karras et al. 2024). Classic CFG is `uncond_model` = `main_model`.
    """

    weights: GuidanceWeights
    prompt: str
    negative_prompt: str = ""
    uncond_model: str = ModelSlot.PRIOR.value
    uncond_prompt: str = ""
    main_model: str = ModelSlot.MAIN.value

    def __post_init__(self) -> None:
        for name in ("uncond_model", "main_model"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{name} must be a non-empty model name, got {value!r}")
            if isinstance(value, ModelSlot):  # the plain text, so that keys compare by text
                object.__setattr__(self, name, value.value)
        for name in ("prompt", "negative_prompt", "uncond_prompt"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")

    @property
    def has_negative(self) -> bool:
        return bool(self.negative_prompt.strip())

    @property
    def uncond_key(self) -> SourceKey:
        return (self.uncond_model, self.uncond_prompt)

    @property
    def prompt_key(self) -> SourceKey:
        return (self.main_model, self.prompt)

    @property
    def negative_key(self) -> SourceKey:
        return (self.main_model, self.negative_prompt)

    def keys(self) -> list[SourceKey]:
        """Every (model, prompt) the plan may evaluate at some step, E₀ first."""
        keys = [self.uncond_key]
        if self.has_negative:
            keys.append(self.negative_key)
        keys.append(self.prompt_key)
        keys.extend(term.key for term in self.weights.terms)
        return list(dict.fromkeys(keys))

    def models(self) -> frozenset[str]:
        return frozenset(model for model, _ in self.keys())

    def source_coefficients(self, coefficients: StepCoefficients) -> dict[SourceKey, list[float]]:
        """Per source, its coefficient for each image (equal keys summed), zero sources left out, E₀ first."""
        batch = coefficients.batch_size
        per_source: dict[SourceKey, list[float]] = {}

        def add(key: SourceKey, values: Iterable[float]) -> None:
            current = per_source.setdefault(key, [0.0] * batch)
            for image, value in enumerate(values):
                current[image] += value

        # E₀, then the negative prompt: the first source with a coefficient is the base of `combine_sources`, so
        # a classic step computes exactly the WebUI's N + s·(P − N).
        add(self.uncond_key, (image.uncond for image in coefficients.images))
        if self.has_negative:
            add(self.negative_key, (image.negative for image in coefficients.images))
        add(self.prompt_key, (sum(image.prompt) for image in coefficients.images))
        for term, coefficient in coefficients.terms:
            add(term.key, [coefficient] * batch)
        return {key: values for key, values in per_source.items() if any(value != 0.0 for value in values)}


def standard_plan(
    cfg_scale: float,
    prompt: str,
    negative_prompt: str = "",
    negative_scale: float | None = None,
    concept_weight: float = 0.0,
    extra_terms: Iterable[GuidanceTerm] = (),
    *,
    uncond_prompt: str = "",
    multiplier: float = 1.0,
) -> GuidancePlan:
    """The plan of a usual request: E₀ from the prior, prompt at `cfg_scale`, negative, concept, extra terms.

    `concept_weight` ≠ 0 adds the text-free ``concept`` term first; `extra_terms` follow as they are. See
    `gcfg_core.coefficients` for what the negative scale means.
    """
    terms = [GuidanceTerm(ModelSlot.CONCEPT.value, None, concept_weight, label="concept")] if concept_weight else []
    terms.extend(extra_terms)
    weights = GuidanceWeights(cfg_scale, negative_scale, tuple(terms), multiplier)
    return GuidancePlan(weights, prompt, negative_prompt, uncond_prompt=uncond_prompt)


def classic_plan(cfg_scale: float, prompt: str, negative_prompt: str = "") -> GuidancePlan:
    """Classic CFG on the main model: the WebUI's ``N + s·(P − N)``, or ``E₀ + s·(P − E₀)`` without a negative."""
    return GuidancePlan(GuidanceWeights(cfg_scale), prompt, negative_prompt, uncond_model=ModelSlot.MAIN.value)
