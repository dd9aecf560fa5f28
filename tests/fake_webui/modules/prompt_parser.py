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
    result = []
    for prompt in prompts:
        schedule = _schedule(prompt, hires_steps or steps)
        conds = model.get_learned_conditioning([text for _, text in schedule])
        result.append([ScheduledPromptConditioning(end, cond) for (end, _), cond in zip(schedule, conds, strict=False)])
    return result


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
        schedules = get_learned_conditioning(model, [text for text, _ in parts], steps, hires_steps)
        batch.append([ComposableScheduledPromptConditioning(s, w) for s, (_, w) in zip(schedules, parts, strict=False)])
    return MulticondLearnedConditioning(shape=(len(prompts),), batch=batch)


def _at_step(schedule, step):
    for item in schedule:
        if step <= item.end_at_step:
            return item.cond
    return schedule[-1].cond


def reconstruct_cond_batch(c, current_step):
    return torch.stack([_at_step(schedule, current_step) for schedule in c])


def reconstruct_multicond_batch(c, current_step):
    tensors, conds_list = [], []
    for composables in c.batch:
        entries = []
        for composable in composables:
            entries.append((len(tensors), composable.weight))
            tensors.append(_at_step(composable.schedules, current_step))
        conds_list.append(entries)
    return conds_list, torch.stack(tensors)
