"""The UNet wrapper: GCFG's rows inside Forge's batched call (``model_function_wrapper``).

Forge evaluates a denoiser call's cond dicts in batched UNet calls, one chunk of B rows each, flagged by
``cond_or_uncond`` (0: the prompt's parts, 1: the negative prompt). In the call that holds the uncond chunk, each
image's uncond row gets what `gcfg_webui.uncond_slot` says it must hold:

* `HOST` — the host's own row (its negative prompt, or the empty prompt without one);
* `PRIOR` — the prior's E₀ instead: the host's row is not evaluated at all;
* `MAIN_EMPTY` — the main model's empty prompt, evaluated in the same call instead of the negative prompt;
* `FILLER` — nothing is evaluated; the row holds zeros (its coefficient is 0 and nobody reads it).

Where a numeric negative scale needs N besides E₀, the host's row is evaluated too and kept aside. The main
model's GCFG terms join the same call as chunks of their own (copying the x, image conditioning and ControlNet
residuals of the prompt's first chunk); each side model gets one call. With routing off (the setting, or another
extension wrapping Forge's UNet call) the host's call runs unchanged, GCFG's rows run in calls of their own and the
uncond rows are overwritten afterwards. Whatever no batched call evaluated is evaluated by `complete` before the
combination, so an unexpected call layout still gives the exact combination.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gcfg_webui.forge import host_api
from gcfg_webui.forge.batching import Chunk, assemble, chunk_options, common_length, host_chunks, repeat_to
from gcfg_webui.forge.passes import CallState, Holds, PassController, holds_for
from gcfg_webui.uncond_slot import Slot

logger = logging.getLogger("gcfg.forge.routing")

_ATTN2_PATCHES = ("attn2_patch", "attn2_output_patch")


@dataclass(frozen=True, eq=False)
class SideRows:
    """Rows of one side model: x, σ and their context, for one purpose (`role`)."""

    side: object  # side_models.SideModel
    name: str  # statistics name
    flag: int  # 1: E₀ rows (unconditional), 0: a term's rows
    x: Tensor
    sigma: Tensor
    context: Tensor  # [1 or n, T, C]
    role: tuple  # ("slot", images), ("e0", images) or ("term", key)

    @property
    def rows(self) -> int:
        return int(self.x.shape[0])


def main_call_of(previous: Callable | None, apply_model: Callable) -> Callable[[dict], Tensor]:
    """The call below GCFG's wrapper: another extension's wrapper if one was installed before, else Forge's."""
    if previous is not None:
        return lambda args: previous(apply_model, args)
    return lambda args: apply_model(args["input"], args["timestep"], **args["c"])


def gcfg_wrapper(controller: PassController, previous: Callable | None, apply_model: Callable,
                 args: dict) -> Tensor:
    main_call = main_call_of(previous, apply_model)
    call = controller.call
    if controller.evaluating:
        return main_call(args)
    if call is None or call.skipped:
        if call is not None:  # a call Forge combines at scale 1: its own rows only
            controller.stats.webui_rows += int(args["input"].shape[0])
            controller.stats.add_call("main")
        return main_call(args)
    return _evaluate(controller, call, main_call, args)


def _slot_chunk(call: CallState, chunks: list[tuple[int, list[int]]]) -> int | None:
    """The index of the uncond chunk whose rows GCFG decides (the first full one of the call)."""
    if call.slot_placed:
        return None
    return next((index for index, (flag, rows) in enumerate(chunks) if flag == 1 and len(rows) == call.batch), None)


def _template(call: CallState, args: dict, chunks: list[tuple[int, list[int]]]) -> list[int] | None:
    """Rows of the call's first full-size prompt chunk: joined term rows copy its x, image conditioning and
    ControlNet residuals (the prompt's rows are the ones ControlNet treats as conditional)."""
    for flag, rows in chunks:
        if flag == 0 and len(rows) == call.batch and tuple(args["input"].shape[1:]) == tuple(call.x.shape[1:]):
            return rows
    return None


def _evaluate(controller: PassController, call: CallState, main_call: Callable[[dict], Tensor],
              args: dict) -> Tensor:
    plan = controller.plan
    chunks = host_chunks(args)
    slot = _slot_chunk(call, chunks)
    x, timestep = args["input"], args["timestep"]
    host: list[Chunk] = []
    extra: list[Chunk] = []
    sides: list[SideRows] = []
    for index, (flag, rows) in enumerate(chunks):
        if index != slot:
            host.append(Chunk(flag, tuple(rows), role=("host", index)))
            continue
        own = [image for image, need in enumerate(call.needs) if need.needs_host_row or not controller.routing]
        if own:
            host.append(Chunk(flag, tuple(rows[image] for image in own), role=("host", index)))
        prior_images = [image for image, need in enumerate(call.needs) if need.slot is Slot.PRIOR]
        if prior_images:
            picked = [rows[image] for image in prior_images]
            sides.append(_side_rows(plan.prior, call, 1, x[picked], timestep[picked], prior_images,
                                    ("slot", tuple(prior_images))))
        empty_images = [image for image, need in enumerate(call.needs) if need.slot is Slot.MAIN_EMPTY]
        if empty_images:
            extra.append(Chunk(1, tuple(rows[image] for image in empty_images),
                               plan.main_empty.condition(call.prompt_step, empty_images), plan.main_empty.name,
                               role=("empty", tuple(empty_images))))
    if not call.terms_done:
        call.terms_done = True
        images = list(range(call.batch))
        template = _template(call, args, chunks)
        for key in call.keys:
            source = plan.sources[key]
            if source.side is not None:
                sides.append(_side_rows(source, call, 0, call.x, call.sigma, images, ("term", key)))
            elif template is not None:
                extra.append(Chunk(0, tuple(template), source.condition(call.prompt_step, images), source.name,
                                   role=("term", key)))
            # else: `complete` evaluates it in a call of its own

    outputs = _run_main(controller, main_call, args, host + extra if controller.routing else host)
    if not controller.routing and extra:
        outputs.update(_run_main(controller, main_call, args, extra))
    if controller.routing:
        controller.stats.routed_calls += 1
    side_outputs = _run_sides(controller, call, args, sides)
    for role, out in [*outputs.items(), *side_outputs.items()]:
        if role[0] == "term":
            call.predictions[role[1]] = out

    parts = []
    for index, (_, rows) in enumerate(chunks):
        if index == slot:
            parts.append(_slot_output(controller, call, rows, outputs, side_outputs, index, x))
        else:
            parts.append(outputs[("host", index)])
    if slot is not None:
        call.slot_placed = True
        call.holds = [holds_for(need, negative) for need, negative in zip(call.needs, call.has_negative,
                                                                           strict=True)]
    return torch.cat(parts)


def _slot_output(controller: PassController, call: CallState, rows: list[int], outputs: dict, side_outputs: dict,
                 index: int, x: Tensor) -> Tensor:
    """The uncond chunk's rows, image by image as its need says (zeros for a FILLER); N kept aside where needed."""
    own = [image for image, need in enumerate(call.needs) if need.needs_host_row or not controller.routing]
    host = dict(zip(own, outputs[("host", index)], strict=True)) if own else {}
    placed: dict[int, Tensor] = {}
    for role, out in [*outputs.items(), *side_outputs.items()]:
        if role[0] in ("slot", "empty"):
            placed.update(zip(role[1], out, strict=True))
    result = torch.zeros((len(rows), *x.shape[1:]), dtype=x.dtype, device=x.device)
    for image, need in enumerate(call.needs):
        if need.slot is Slot.HOST:
            result[image] = host[image]
        elif need.slot in (Slot.PRIOR, Slot.MAIN_EMPTY):
            result[image] = placed[image]
        if need.negative_aside:
            call.negatives[image] = host[image]
    return result


def _side_rows(source, call: CallState, flag: int, x: Tensor, sigma: Tensor, images: Sequence[int],
               role: tuple) -> SideRows:
    return SideRows(source.side, source.name, flag, x, sigma, source.condition(call.prompt_step, list(images)), role)


def _lengths(args: dict, chunks: Sequence[Chunk]) -> list[int]:
    host = args["c"]["c_crossattn"]
    lengths = []
    for chunk in chunks:
        conditioning = chunk.conditioning
        if conditioning is None:
            lengths.append(int(host.shape[1]))
        else:
            lengths.append(int((conditioning["crossattn"] if isinstance(conditioning, dict) else conditioning)
                               .shape[1]))
    return lengths


def _run_main(controller: PassController, main_call: Callable[[dict], Tensor], args: dict,
              chunks: list[Chunk]) -> dict[tuple, Tensor]:
    """Evaluate `chunks` on the main model: one call, or one per chunk when their contexts cannot share one."""
    if not chunks:
        return {}
    groups = [chunks] if common_length(_lengths(args, chunks)) is not None else [[chunk] for chunk in chunks]
    results: dict[tuple, Tensor] = {}
    for group in groups:
        out = main_call(assemble(args, group))
        controller.stats.add_call("main")
        for chunk, part in zip(group, out.split([chunk.rows for chunk in group]), strict=True):
            results[chunk.role] = part
            if chunk.name is None:
                controller.stats.webui_rows += chunk.rows
            else:
                controller.stats.add(chunk.name, chunk.rows)
    return results


def _side_options(call: CallState, args: dict | None, group: list[SideRows]) -> dict:
    """`transformer_options` for a side model's call: the host call's (its patches reach the side UNet as they
    reach the main one), the rows' flags; attention-2 patches left out for the text-free concept UNet."""
    source = args["c"].get("transformer_options", {}) if args is not None else call.model_options.get(
        "transformer_options", {})
    base = dict(source)
    if getattr(group[0].side, "checkpoint", None) is None:
        base["patches"] = {name: value for name, value in base.get("patches", {}).items()
                           if name not in _ATTN2_PATCHES}
        base["patches_replace"] = {name: value for name, value in base.get("patches_replace", {}).items()
                                   if name != "attn2"}
    sigmas = base.get("sigmas", call.sigma)
    base["sigmas"] = sigmas
    return chunk_options(base, [rows.flag for rows in group], [rows.rows for rows in group], sigmas)


def _run_sides(controller: PassController, call: CallState, args: dict | None,
               sides: list[SideRows]) -> dict[tuple, Tensor]:
    """One call per side model (rows of all its purposes together, where their shapes allow)."""
    by_model: dict[int, list[SideRows]] = {}
    for rows in sides:
        by_model.setdefault(id(rows.side), []).append(rows)
    results: dict[tuple, Tensor] = {}
    for members in by_model.values():
        together = (common_length([rows.context.shape[1] for rows in members]) is not None
                    and len({tuple(rows.x.shape[1:]) for rows in members}) == 1)
        for group in [members] if together else [[rows] for rows in members]:
            length = common_length([rows.context.shape[1] for rows in group])
            x = torch.cat([rows.x for rows in group])
            sigma = torch.cat([rows.sigma for rows in group])
            context = torch.cat([repeat_to(rows.context.expand(rows.rows, -1, -1), length) for rows in group])
            out = group[0].side.apply(x, sigma, context.to(x.device), _side_options(call, args, group))
            controller.stats.add_call(group[0].name)
            for rows, part in zip(group, out.split([rows.rows for rows in group]), strict=True):
                results[rows.role] = part
                controller.stats.add(rows.name, rows.rows)
    return results


def standalone_main(controller: PassController, call: CallState, conditioning, flag: int) -> Tensor:
    """A main-model prediction of the whole batch outside Forge's batched call, through Forge's own batching (the
    inpainting image conditioning and the ControlNet chain attached as Forge attaches them)."""
    entries = host_api.cond_entries(conditioning, call.image_cond, call.control)
    controller.evaluating = True
    try:
        cond_pred, uncond_pred = host_api.calc_cond_uncond_batch(
            call.model, entries if flag == 0 else [], entries if flag == 1 else None, call.x, call.sigma,
            call.model_options)
    finally:
        controller.evaluating = False
    controller.stats.add_call("main")
    return cond_pred if flag == 0 else uncond_pred


def complete(controller: PassController, call: CallState) -> None:
    """Before the combination: evaluate in calls of their own whatever the batched calls did not — terms, E₀ where
    the uncond rows do not hold it and its coefficient is not 0."""
    plan = controller.plan
    images = list(range(call.batch))
    if call.expects_slot and not call.slot_placed:
        # Forge evaluated its uncond rows without GCFG's wrapper (another extension replaced it): they hold the
        # negative prompt, or the main model's empty prompt — E₀ only without a prior and without autoguidance.
        empty_is_e0 = plan.prior is None and plan.host_row_is_uncond
        call.holds = [Holds.NEGATIVE if negative else (Holds.E0 if empty_is_e0 else Holds.NOTHING)
                      for negative in call.has_negative]
    missing = [key for key in call.keys if key not in call.predictions]
    sides = [_side_rows(plan.sources[key], call, 0, call.x, call.sigma, images, ("term", key))
             for key in missing if plan.sources[key].side is not None]
    want_e0 = [image for image in images if call.coefficients.needs_uncond(image)
               and call.holds[image] is not Holds.E0 and image not in call.e0]
    if want_e0 and plan.prior is not None:
        sides.append(_side_rows(plan.prior, call, 1, call.x[want_e0], call.sigma[want_e0], want_e0,
                                ("e0", tuple(want_e0))))
    for role, out in _run_sides(controller, call, None, sides).items():
        if role[0] == "term":
            call.predictions[role[1]] = out
        else:
            call.e0.update(zip(role[1], out, strict=True))
    for key in missing:
        source = plan.sources[key]
        if source.side is None:
            call.predictions[key] = standalone_main(controller, call, source.condition(call.prompt_step, images), 0)
            controller.stats.add(source.name, len(images))
    if want_e0 and plan.prior is None:
        out = standalone_main(controller, call, plan.main_empty.condition(call.prompt_step, images), 1)
        controller.stats.add(plan.main_empty.name, len(want_e0))
        call.e0.update({image: out[image] for image in want_e0})
    if any(call.coefficients.needs_negative(image) and call.holds[image] is not Holds.NEGATIVE
           and image not in call.negatives for image in images):
        raise RuntimeError("GCFG: Forge did not evaluate this call's negative-prompt rows; another extension may "
                           "have changed Forge's conditions. Disable GCFG or that extension.")
