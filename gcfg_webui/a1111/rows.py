"""Row batching: the WebUI's conditioning dicts, selecting rows of them, and one UNet call per model.

A conditioning dict is what the WebUI passes to its inner model: ``{"c_crossattn": [T], "c_concat": [I]}``, or
SDXL's ``{"crossattn": T, "vector": V, "c_concat": [I]}``; every tensor has one row per x row.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

Condition = dict
TermKey = tuple[str, str | None]


class SamplerSpace(enum.Enum):
    """The space the WebUI's `x_out` rows live in: denoised x₀ (k-diffusion) or noise ε (DDIM/PLMS/UniPC)."""

    DENOISED = "x0"
    NOISE = "eps"


class UnbatchableConditionError(ValueError):
    """A conditioning value that is neither a tensor nor a list of tensors, so its rows cannot be selected."""


@dataclass(frozen=True, eq=False)
class ModelRunner:
    """One UNet: `call(x, sigma, condition)` evaluates rows in the sampler's space; `name` is its statistics key."""

    name: str
    call: Callable[[Tensor, Tensor, Condition], Tensor]


@dataclass(frozen=True)
class RowSource:
    """One (model, prompt) pair: the UNet that evaluates it and the conditioning of given images' rows."""

    model: str  # row-statistics name (an @prior term run by the current model counts as "prior")
    runner: ModelRunner
    condition: Callable[[int, Sequence[int], Tensor | None], Condition]  # (prompt step, images, image_cond rows)


@dataclass(frozen=True)
class Block:
    """Rows to evaluate: x, sigma and conditioning of some images on one runner."""

    runner: ModelRunner
    model: str | None  # row-statistics name; None for rows the WebUI would have evaluated itself
    x: Tensor
    sigma: Tensor
    condition: Condition


@dataclass
class RowStats:
    """UNet rows and calls per denoiser call, by model: the WebUI's own rows and the ones GCFG adds."""

    calls: int = 0
    webui_rows: int = 0
    extra_rows: dict[str, int] = field(default_factory=dict)
    model_calls: dict[str, int] = field(default_factory=dict)
    skipped_calls: int = 0
    routed_calls: int = 0
    path: str = "overwrite"  # "routed" when the fast path may run; "overwrite" when routing is off
    step_source: str = "schedule"  # "schedule" (σ or timestep position) or "calls" (denoiser call count)
    steps_seen: list[int] = field(default_factory=list)  # the GCFG step index of each denoiser call

    def add(self, model: str, rows: int) -> None:
        self.extra_rows[model] = self.extra_rows.get(model, 0) + rows

    def add_call(self, model: str) -> None:
        self.model_calls[model] = self.model_calls.get(model, 0) + 1

    def per_call(self) -> dict[str, float]:
        calls = max(self.calls, 1)
        summary = {"webui": self.webui_rows / calls}
        summary.update({name: rows / calls for name, rows in sorted(self.extra_rows.items())})
        return summary

    def calls_per_call(self) -> dict[str, float]:
        """UNet calls per denoiser call by model (the main model's count includes the WebUI's own calls)."""
        calls = max(self.calls, 1)
        return {name: count / calls for name, count in sorted(self.model_calls.items())}


def condition_dict(cond, image_cond: Tensor | None) -> Condition:
    """The inner model's conditioning for text conds `cond` (tensor or SDXL dict) and image conds."""
    if isinstance(cond, dict):
        return {**cond, "c_concat": [image_cond]}
    return {"c_crossattn": [cond], "c_concat": [image_cond]}


def _map_condition(condition: Condition, function: Callable[[Tensor], Tensor]) -> Condition:
    mapped = {}
    for key, value in condition.items():
        if isinstance(value, Tensor):
            mapped[key] = function(value)
        elif isinstance(value, list) and all(isinstance(item, Tensor) for item in value):
            mapped[key] = [function(item) for item in value]
        else:
            raise UnbatchableConditionError(f"conditioning {key!r} holds {type(value).__name__}")
    return mapped


def select_rows(condition: Condition, index: list[int] | slice) -> Condition:
    """The conditioning of the rows `index` (every tensor sliced along its first dimension)."""
    return _map_condition(condition, lambda tensor: tensor[index])


def row_counts(condition: Condition) -> set[int]:
    """The first-dimension sizes of every tensor in the conditioning."""
    counts: set[int] = set()
    for value in condition.values():
        for tensor in value if isinstance(value, list) else [value]:
            if not isinstance(tensor, Tensor):
                raise UnbatchableConditionError(f"conditioning holds {type(tensor).__name__}")
            counts.add(int(tensor.shape[0]))
    return counts


def _shape_key(condition: Condition) -> tuple | None:
    """Equal keys for conditionings that can be stacked into one call: same keys, shapes past the batch dimension
    and dtypes; None when something in it is not a tensor (that block gets a call of its own)."""
    parts = []
    for key, value in sorted(condition.items()):
        tensors = value if isinstance(value, list) else [value]
        if not all(isinstance(tensor, Tensor) for tensor in tensors):
            return None
        parts.append((key, tuple((tuple(tensor.shape[1:]), tensor.dtype) for tensor in tensors)))
    return tuple(parts)


def _cat_conditions(conditions: Sequence[Condition]) -> Condition:
    first = conditions[0]
    return {key: [torch.cat(items) for items in zip(*(c[key] for c in conditions), strict=True)]
            if isinstance(value, list) else torch.cat([c[key] for c in conditions])
            for key, value in first.items()}


def source_block(source: RowSource, images: Sequence[int], x: Tensor, sigma: Tensor, image_cond: Tensor | None,
                 prompt_step: int) -> Block:
    """The rows of `images` (indices into the batch) of one source; x, sigma, image_cond hold every image."""
    images = list(images)
    return Block(source.runner, source.model, x[images], sigma[images], source.condition(
        prompt_step, images, None if image_cond is None else image_cond[images]))


def run_blocks(blocks: Sequence[Block], stats: RowStats) -> list[Tensor]:
    """Evaluate blocks with one UNet call per runner and conditioning shape.

    Blocks whose conditionings differ past the batch dimension (e.g. 77 vs 154 tokens) go to separate calls:
    padding them as the WebUI does would change the cross-attention, so results stay those of separate calls.
    """
    groups: dict[tuple, list[int]] = {}
    for index, block in enumerate(blocks):
        shape = _shape_key(block.condition)
        groups.setdefault((id(block.runner), shape if shape is not None else ("single", index)), []).append(index)
    outputs: list[Tensor | None] = [None] * len(blocks)
    for indices in groups.values():
        members = [blocks[index] for index in indices]
        runner = members[0].runner
        if len(members) == 1:
            x, sigma, condition = members[0].x, members[0].sigma, members[0].condition
        else:
            x = torch.cat([block.x for block in members])
            sigma = torch.cat([block.sigma for block in members])
            condition = _cat_conditions([block.condition for block in members])
        stats.add_call(runner.name)
        out = runner.call(x, sigma, condition)
        sizes = [int(block.x.shape[0]) for block in members]
        for index, block, part in zip(indices, members, out.split(sizes), strict=True):
            outputs[index] = part
            if block.model is not None:
                stats.add(block.model, int(block.x.shape[0]))
    return outputs


# sd-webui-controlnet marks every context row with one extra leading token, +1024 for cond rows and -1024 for
# uncond rows, and treats unmarked rows as cond. E₀ taken from the current model stands where the WebUI's uncond
# rows stand, so it must carry their mark; otherwise "ControlNet is more important" would control it.
CONTROLNET_UNCOND_MARK = -1024.0


def mark_like_webui_uncond(condition: Condition, text_uncond) -> Condition:
    """`condition` with the WebUI's uncond rows' ControlNet mark prepended, when they carry one; else unchanged."""
    crossattn = condition.get("c_crossattn")
    if not isinstance(text_uncond, Tensor) or text_uncond.dim() != 3 or not crossattn:
        return condition
    cond = crossattn[0]
    if not isinstance(cond, Tensor) or cond.shape[1] + 1 != text_uncond.shape[1]:
        return condition
    if not bool((text_uncond[:, 0] == CONTROLNET_UNCOND_MARK).all()):
        return condition
    mark = text_uncond[:1, :1].to(cond).expand(cond.shape[0], 1, cond.shape[2])
    return {**condition, "c_crossattn": [torch.cat([mark, cond], dim=1)]}


def unique_keys(terms) -> list[TermKey]:
    """The distinct (model, prompt) pairs that the terms need evaluators for, in first-use order."""
    return list(dict.fromkeys(term.key for term in terms))
