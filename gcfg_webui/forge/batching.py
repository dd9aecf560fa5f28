"""Forge's batched UNet call, rearranged: which rows it evaluates, and their conditioning.

Forge evaluates ``apply_model(input, timestep, **c)`` with one chunk of B rows per cond dict (``cond_or_uncond``:
0 for a prompt's chunk, 1 for the negative prompt's) and ``c`` holding, row by row, ``c_crossattn`` (and SDXL's
``y``, an inpainting model's ``c_concat``, ControlNet's ``control`` residuals) plus ``transformer_options`` that
describe the chunks (``cond_or_uncond``, ``cond_mark``, ``cond_indices``, ``uncond_indices``).

A `Chunk` is a block of rows GCFG wants evaluated in such a call: rows of the host's own call (``template``: their
x, timestep, image conditioning and ControlNet residuals), optionally with another conditioning (a GCFG term's
prompt, the empty prompt). `assemble` builds the call's arguments for a list of chunks, with contexts of different
token lengths repeated to a common length as Forge's own `ConditionCrossAttn.concat` does (attention over a
repeated token sequence equals attention over the sequence).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# Forge batches contexts whose lengths' least common multiple is at most 4× the shorter one.
MAX_REPEAT = 4


@dataclass(frozen=True)
class Chunk:
    """Rows for one call: a cond/uncond flag, the host rows they copy, and their own conditioning (or the host's)."""

    flag: int  # 0: a prompt's rows, 1: an unconditional row (what transformer_options and ControlNet see)
    template: tuple[int, ...]  # rows of the host's call: x, timestep, c_concat and control of each row
    conditioning: object = None  # None: the host rows' own; else [n, T, C] or {"crossattn", "vector"}
    name: str | None = None  # statistics name of GCFG's rows; None: rows the host evaluates itself
    role: tuple = ()  # what the rows are for, the key of their output

    @property
    def rows(self) -> int:
        return len(self.template)


def _crossattn(conditioning) -> Tensor:
    return conditioning["crossattn"] if isinstance(conditioning, dict) else conditioning


def _vector(conditioning) -> Tensor | None:
    return conditioning.get("vector") if isinstance(conditioning, dict) else None


def common_length(lengths: Sequence[int]) -> int | None:
    """The token length all contexts repeat to (their lcm), or None when Forge would not batch them."""
    common = math.lcm(*lengths)
    return common if common // min(lengths) <= MAX_REPEAT else None


def repeat_to(context: Tensor, length: int) -> Tensor:
    return context if context.shape[1] == length else context.repeat(1, length // context.shape[1], 1)


def chunk_crossattn(chunk: Chunk, host_crossattn: Tensor) -> Tensor:
    if chunk.conditioning is None:
        return host_crossattn[list(chunk.template)]
    context = _crossattn(chunk.conditioning)
    return context.to(device=host_crossattn.device, dtype=host_crossattn.dtype).expand(chunk.rows, -1, -1) \
        if context.shape[0] == 1 else context.to(device=host_crossattn.device, dtype=host_crossattn.dtype)


def select_rows(value, rows: list[int], total: int):
    """`value` with every tensor of `total` rows (in dicts, lists and tuples) reduced to `rows`; the rest as is."""
    if isinstance(value, Tensor):
        return value[rows] if value.dim() > 0 and value.shape[0] == total else value
    if isinstance(value, dict):
        return {key: select_rows(item, rows, total) for key, item in value.items()}
    if isinstance(value, list):
        return [select_rows(item, rows, total) for item in value]
    if isinstance(value, tuple):
        return tuple(select_rows(item, rows, total) for item in value)
    return value


def chunk_options(base: dict, flags: Sequence[int], sizes: Sequence[int], sigmas: Tensor) -> dict:
    """`transformer_options` describing a call of chunks with these flags and row counts (per-row marks)."""
    options = dict(base)
    row_flags = [flag for flag, size in zip(flags, sizes, strict=True) for _ in range(size)]
    options["cond_or_uncond"] = list(flags)
    options["cond_mark"] = torch.tensor(row_flags, dtype=sigmas.dtype, device=sigmas.device)
    options["cond_indices"] = [row for row, flag in enumerate(row_flags) if flag == 0]
    options["uncond_indices"] = [row for row, flag in enumerate(row_flags) if flag != 0]
    return options


def assemble(args: dict, chunks: Sequence[Chunk]) -> dict:
    """The arguments of one batched call evaluating `chunks` (rows and conditioning taken from the host's `args`)."""
    x, timestep, c = args["input"], args["timestep"], args["c"]
    total = int(x.shape[0])
    rows = [row for chunk in chunks for row in chunk.template]
    host_crossattn = c["c_crossattn"]
    contexts = [chunk_crossattn(chunk, host_crossattn) for chunk in chunks]
    length = common_length([context.shape[1] for context in contexts])
    if length is None:
        raise ValueError("contexts of these token lengths cannot share one call")
    new_c = {}
    for key, value in c.items():
        if key == "transformer_options":
            continue
        if key == "c_crossattn":
            new_c[key] = torch.cat([repeat_to(context, length) for context in contexts])
        elif key == "y" and isinstance(value, Tensor):
            parts = []
            for chunk in chunks:
                vector = _vector(chunk.conditioning) if chunk.conditioning is not None else None
                parts.append(value[list(chunk.template)] if vector is None else
                             vector.to(device=value.device, dtype=value.dtype).expand(chunk.rows, -1))
            new_c[key] = torch.cat(parts)
        else:
            new_c[key] = select_rows(value, rows, total)
    base = c.get("transformer_options", {})
    sigmas = base.get("sigmas", timestep)
    new_c["transformer_options"] = chunk_options(base, [chunk.flag for chunk in chunks],
                                                 [chunk.rows for chunk in chunks], sigmas)
    return {"input": x[rows], "timestep": timestep[rows], "c": new_c,
            "cond_or_uncond": [chunk.flag for chunk in chunks]}


def host_chunks(args: dict) -> list[tuple[int, list[int]]]:
    """The host call's chunks: (flag, rows) each, in the call's order."""
    flags = list(args["cond_or_uncond"])
    size = int(args["input"].shape[0]) // max(len(flags), 1)
    return [(int(flag), list(range(index * size, (index + 1) * size))) for index, flag in enumerate(flags)]
