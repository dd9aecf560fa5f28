"""What the host's uncond rows must hold at one denoiser call, per image, decided from the coefficients.

Both hosts combine CFG from a block of "uncond" rows (A1111: the last B rows of `x_out`; Forge: `uncond_pred`).
GCFG keeps that structure and decides, per image, what those rows hold:

* `HOST` — the host's own uncond row: the negative prompt N (classic CFG: N is the base), or E₀ itself when the
  image has no negative prompt and E₀ comes from the current model;
* `PRIOR` — E₀ from the prior, routed into the host's batched call instead of the host's row;
* `MAIN_EMPTY` — E₀ from the current model evaluated by GCFG: the empty prompt where the image's own uncond row is
  its negative prompt (no prior, a numeric negative scale), or the image's prompt (autoguidance without a prior);
* `FILLER` — nothing: E₀'s coefficient is 0 and nobody reads the rows (CFG 1 with a prior, or weights summing
  to 1), so no model runs for them; they hold a copy of the image's first cond row, as the WebUI's own
  skipped-uncond rows do.

The combination then is ``host_combine(slot) + n·(N − slot) + Σₖ tₖ·(Tₖ − slot)``, which equals the coefficients'
``c₀·E₀ + Σp·P + n·N + Σt·T`` whatever a FILLER row holds, because its coefficient is 0. `negative_aside` marks
images that need N besides an E₀ slot (a numeric negative scale with E₀ also non-zero).

Hosts that read the uncond rows after the combination (DDIM CFG++'s renoising direction, another extension's
combine wrapper, Forge's post-CFG functions) need a real E₀ there even when its coefficient is 0.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from gcfg_core.coefficients import StepCoefficients


class Slot(enum.Enum):
    HOST = "host"
    PRIOR = "prior"
    MAIN_EMPTY = "main_empty"
    FILLER = "filler"


@dataclass(frozen=True)
class ImageNeeds:
    slot: Slot
    negative_aside: bool = False

    @property
    def needs_host_row(self) -> bool:
        return self.slot is Slot.HOST or self.negative_aside


def image_needs(coefficients: StepCoefficients, has_negative: Sequence[bool], *, classic: bool, has_prior: bool,
                host_reads_slot: bool, host_row_is_uncond: bool = True) -> tuple[ImageNeeds, ...]:
    """Per image of the batch: what its uncond row must hold, and whether N is needed besides it.

    `host_row_is_uncond`: the host's uncond row of an image without a negative prompt is E₀ (the current model's
    empty prompt); False when E₀ is conditioned on the prompt (autoguidance)."""
    needs = []
    for image, negative_present in enumerate(has_negative):
        if negative_present and classic:
            needs.append(ImageNeeds(Slot.HOST))
            continue
        wants_negative = negative_present and coefficients.needs_negative(image)
        if not (coefficients.needs_uncond(image) or host_reads_slot):
            # E₀ is not needed: the slot may hold N (its coefficient there is 0), or nothing at all.
            needs.append(ImageNeeds(Slot.HOST if wants_negative else Slot.FILLER))
            continue
        if has_prior:
            slot = Slot.PRIOR
        else:
            slot = Slot.MAIN_EMPTY if negative_present or not host_row_is_uncond else Slot.HOST
        needs.append(ImageNeeds(slot, negative_aside=wants_negative and slot is not Slot.HOST))
    return tuple(needs)
