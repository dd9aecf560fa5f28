"""A pass's prompts as the host encodes them: the current model's schedules for GCFG prompts, each image's prompt
and negative prompt, the pass's size. AUTOMATIC1111 1.10 and Forge share this processing API
(`p.get_conds_with_caching`, `modules.prompt_parser`)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from modules import prompt_parser, sd_samplers, shared

from gcfg_webui.generation import Generation


def pass_size(p) -> tuple[int, int]:
    if getattr(p, "is_hr_pass", False):
        return p.hr_upscale_to_x, p.hr_upscale_to_y
    return p.width, p.height


def pass_prompts(p) -> list[str]:
    """Each image's prompt in this pass, its first AND part (what autoguidance conditions E₀ on)."""
    prompts = p.hr_prompts if getattr(p, "is_hr_pass", False) and getattr(p, "hr_prompts", None) else p.prompts
    return [re.split(r"\bAND\b", text, maxsplit=1)[0].strip() for text in prompts]


def pass_negative_prompts(p) -> list[str]:
    prompts = p.hr_negative_prompts if getattr(p, "is_hr_pass", False) else p.negative_prompts
    return list(prompts)


def main_conds(p, generation: Generation, prompts: Sequence[str]):
    """The current model's schedules for one prompt per image, encoded as the host encodes the pass's prompts."""
    width, height = pass_size(p)
    texts = prompt_parser.SdConditioning(list(prompts), width=width, height=height)
    if getattr(p, "is_hr_pass", False):
        config = sd_samplers.find_sampler_config(p.hr_sampler_name or p.sampler_name)
        steps = p.hr_second_pass_steps or p.steps
        hires_steps = config.total_steps(steps) if config else steps
        network_data = p.hr_extra_network_data
    else:
        hires_steps, network_data = None, p.extra_network_data
    checkpoint = getattr(shared.sd_model, "sd_checkpoint_info", None)
    cache = generation.cond_caches.setdefault((tuple(prompts), hires_steps, getattr(checkpoint, "filename", None)),
                                              [None, None])
    return p.get_conds_with_caching(prompt_parser.get_learned_conditioning, texts, p.firstpass_steps, [cache],
                                    network_data, hires_steps)
