"""Prompt schedules and AND-composition (webui-internals §5.2), reduced to what the glue relies on.

Scheduling understood here: `[a:b:N]` with an integer N (switch after denoiser call N); one per prompt.
"""

import re
from collections import namedtuple

import torch

ScheduledPromptConditioning = namedtuple("ScheduledPromptConditioning", ["end_at_step", "cond"])
ComposableScheduledPromptConditioning = namedtuple("ComposableScheduledPromptConditioning", ["schedules", "weight"])
_EDIT = re.compile(r"\[([^\[\]:]*):([^\[\]:]*):(\d+)\]")


class SdConditioning(list):
    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None, copy_from=None):
        super().__init__(prompts)
        self.width, self.height, self.is_negative_prompt = width, height, is_negative_prompt


class DictWithShape(dict):
    """SDXL conds: a dict of tensors whose `.shape` is the cross-attention context's (as in the WebUI)."""

    def __init__(self, x, shape=None):
        super().__init__()
        self.update(x)

    @property
    def shape(self):
        return self["crossattn"].shape


class MulticondLearnedConditioning:
    def __init__(self, shape, batch):
        self.shape, self.batch = shape, batch


def _schedule(text, steps):
    match = _EDIT.search(text)
    if match is None:
        return [(steps, text)]
    at = int(match.group(3))
    before = text[:match.start()] + match.group(1) + text[match.end():]
    after = text[:match.start()] + match.group(2) + text[match.end():]
    return [(at, before), (steps, after)]


def get_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    """As the WebUI: every distinct text of the batch's schedules encoded in one call, with the batch's
    `SdConditioning` attributes (negative prompt, size), then one schedule per prompt."""
    schedules = [_schedule(prompt, hires_steps or steps) for prompt in prompts]
    texts = list(dict.fromkeys(text for schedule in schedules for _, text in schedule))
    batch = SdConditioning(texts, is_negative_prompt=getattr(prompts, "is_negative_prompt", False),
                           width=getattr(prompts, "width", None), height=getattr(prompts, "height", None))
    conds = model.get_learned_conditioning(batch)
    if isinstance(conds, dict):  # SDXL: one dict of rows per text
        rows = {text: {key: value[i] for key, value in conds.items()} for i, text in enumerate(texts)}
    else:
        rows = {text: conds[i] for i, text in enumerate(texts)}
    return [[ScheduledPromptConditioning(end, rows[text]) for end, text in schedule] for schedule in schedules]


def _split_and(prompt):
    parts = []
    for part in prompt.split(" AND "):
        match = re.fullmatch(r"(.*?)\s*:\s*([-+]?\d*\.?\d+)\s*", part)
        parts.append((match.group(1), float(match.group(2))) if match else (part, 1.0))
    return parts


def get_multicond_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    batch = []
    for prompt in prompts:
        parts = _split_and(prompt)
        texts = SdConditioning([text for text, _ in parts], width=getattr(prompts, "width", None),
                               height=getattr(prompts, "height", None))
        schedules = get_learned_conditioning(model, texts, steps, hires_steps)
        batch.append([ComposableScheduledPromptConditioning(s, w) for s, (_, w) in zip(schedules, parts, strict=False)])
    return MulticondLearnedConditioning(shape=(len(prompts),), batch=batch)


def _at_step(schedule, step):
    for item in schedule:
        if step <= item.end_at_step:
            return item.cond
    return schedule[-1].cond


def _stack(rows):
    if isinstance(rows[0], dict):
        return DictWithShape({key: torch.stack([row[key] for row in rows]) for key in rows[0]})
    return torch.stack(rows)


def reconstruct_cond_batch(c, current_step):
    return _stack([_at_step(schedule, current_step) for schedule in c])


def reconstruct_multicond_batch(c, current_step):
    tensors, conds_list = [], []
    for composables in c.batch:
        entries = []
        for composable in composables:
            entries.append((len(tensors), composable.weight))
            tensors.append(_at_step(composable.schedules, current_step))
        conds_list.append(entries)
    return conds_list, _stack(tensors)
