"""A pass's prompts as the host encodes them: the current model's schedules for a GCFG prompt, and each image's
negative prompt. AUTOMATIC1111 1.10 and Forge share this processing API (`p.get_conds_with_caching`,
`modules.prompt_parser`)."""

from __future__ import annotations

from modules import prompt_parser, sd_samplers, shared

from gcfg_webui.generation import Generation


def pass_negative_prompts(p) -> list[str]:
    prompts = p.hr_negative_prompts if getattr(p, "is_hr_pass", False) else p.negative_prompts
    return list(prompts)


def main_conds(p, generation: Generation, prompt: str):
    """The current model's schedules for `prompt`, one per image, encoded as the host encodes the pass's prompts."""
    if getattr(p, "is_hr_pass", False):
        config = sd_samplers.find_sampler_config(p.hr_sampler_name or p.sampler_name)
        steps = p.hr_second_pass_steps or p.steps
        hires_steps = config.total_steps(steps) if config else steps
        texts = prompt_parser.SdConditioning([prompt] * p.batch_size, width=p.hr_upscale_to_x,
                                             height=p.hr_upscale_to_y)
        network_data = p.hr_extra_network_data
    else:
        texts = prompt_parser.SdConditioning([prompt] * p.batch_size, width=p.width, height=p.height)
        hires_steps, network_data = None, p.extra_network_data
    checkpoint = getattr(shared.sd_model, "sd_checkpoint_info", None)
    cache = generation.cond_caches.setdefault((prompt, hires_steps, getattr(checkpoint, "filename", None)),
                                              [None, None])
    return p.get_conds_with_caching(prompt_parser.get_learned_conditioning, texts, p.firstpass_steps, [cache],
                                    network_data, hires_steps)
