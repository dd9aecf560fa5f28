"""Test-side helpers for the fake WebUI: a tiny LatentDiffusion-shaped `sd_model` and a `process_images` stand-in.

The call order follows webui-internals §1.3: process → (per batch) conds → sampler → process_before_every_sampling
→ sample [→ hires pass with its own sampler and hook call] → postprocess.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import torch
from modules import prompt_parser, script_callbacks, sd_hijack, sd_samplers, shared

from gcfg_core.configs import TINY
from gcfg_core.models import build_unet, dezero_, random_sd_model


class FakeSDModel(torch.nn.Module):
    """What the glue touches of a WebUI SD1 model: apply_model, conds, alphas, flags; counts UNet rows and calls."""

    def __init__(self, seed: int = 0, in_channels: int = 4):
        super().__init__()
        self.sd = random_sd_model(TINY, seed=seed)
        unet = self.sd.unet
        if in_channels != 4:
            unet = build_unet(dataclasses.replace(TINY.unet, in_channels=in_channels))
            dezero_(unet, seed=seed)
        self.unet = unet.eval()
        self.register_buffer("alphas_cumprod", self.sd.alphas_cumprod.float())
        self.model = SimpleNamespace(diffusion_model=self.unet,
                                     conditioning_key="hybrid" if in_channels == 9 else "crossattn")
        self.cond_stage_key = "txt"
        self.is_sd1, self.is_sd2, self.is_sdxl = True, False, False
        self.parameterization = "eps"
        self.rows = self.calls = 0
        with torch.no_grad():
            self.cond_stage_model_empty_prompt = self.sd.encode_prompts([""])

    @torch.no_grad()
    def get_learned_conditioning(self, texts):
        return self.sd.encode_prompts(list(texts))

    def apply_model(self, x, t, cond):
        self.rows += x.shape[0]
        self.calls += 1
        if self.model.conditioning_key == "hybrid":
            x = torch.cat([x, *cond["c_concat"]], dim=1)
        with torch.no_grad():  # row by row, so that results do not depend on how rows are batched (see sd_hijack)
            return sd_hijack.ldm_original_forward(self.unet, x, t, context=torch.cat(cond["c_crossattn"], 1))


class FakeSDXLModel(torch.nn.Module):
    """A WebUI SDXL model as the glue meets it (webui-internals §3.2, `sd_models_xl`): `get_learned_conditioning`
    returns {"crossattn", "vector"} with the empty negative zeroed and the size embeddings kept, `apply_model`
    reads those keys. Built from `gcfg_core`'s tiny random SDXL model."""

    def __init__(self, seed: int = 0):
        super().__init__()
        from gcfg_core.sdxl import random_sdxl_model

        self.sd = random_sdxl_model(seed=seed)
        self.unet = self.sd.unet.eval()
        self.register_buffer("alphas_cumprod", self.sd.alphas_cumprod.float())
        self.model = SimpleNamespace(diffusion_model=self.unet, conditioning_key="crossattn")
        self.cond_stage_key = "txt"
        self.is_sd1, self.is_sd2, self.is_sdxl = False, False, True
        self.parameterization = "eps"
        self.rows = self.calls = 0

    @torch.no_grad()
    def get_learned_conditioning(self, texts):
        from gcfg_core.conditioning import SizeConditioning

        width, height = getattr(texts, "width", None) or 1024, getattr(texts, "height", None) or 1024
        negative = getattr(texts, "is_negative_prompt", False)
        encoded = self.sd.encode_prompts(list(texts), sizes=SizeConditioning.for_image(width, height),
                                         negative=negative)
        return {"crossattn": encoded.crossattn, "vector": encoded.vector}

    def apply_model(self, x, t, cond):
        self.rows += x.shape[0]
        self.calls += 1
        with torch.no_grad():  # row by row, as the SD 1.x fake does
            return torch.cat([self.unet(x[row:row + 1], t[row:row + 1], context=cond["crossattn"][row:row + 1],
                                        y=cond["vector"][row:row + 1]) for row in range(x.shape[0])])


@dataclasses.dataclass
class FakeProcessing:
    prompt: str = "a cat"
    negative_prompt: str = ""
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 3
    cfg_scale: float = 5.0
    width: int = 64
    height: int = 64
    seed: int = 1
    sampler_name: str = "Euler"
    enable_hr: bool = False
    hr_prompt: str = ""
    hr_negative_prompt: str | None = None
    hr_second_pass_steps: int = 2
    hr_sampler_name: str | None = None
    init_latent: torch.Tensor | None = None
    denoising_strength: float = 0.6
    mask: torch.Tensor | None = None
    s_min_uncond: float = 0.0
    is_api: bool = False
    refiner_model: object = None  # switched to when the completed ratio reaches refiner_switch_at
    refiner_switch_at: float = 0.5
    refiner_checkpoint_info: object = None

    def __post_init__(self):
        self.extra_generation_params = {}
        self.extra_network_data = self.hr_extra_network_data = {}
        self.is_hr_pass = False
        self.sampler = None
        self.nmask = None if self.mask is None else 1 - self.mask
        self.hr_upscale_to_x, self.hr_upscale_to_y = self.width * 2, self.height * 2
        self.calls = []

    def setup_conds(self):
        """What the WebUI does after a refiner switch: the batch's prompts encoded again by the new model."""
        steps = sd_samplers.find_sampler_config(self.sampler_name).total_steps(self.steps)
        self.c = prompt_parser.get_multicond_learned_conditioning(shared.sd_model, _texts(self, self.prompts), steps)
        self.uc = prompt_parser.get_learned_conditioning(shared.sd_model, _texts(self, self.negative_prompts, True),
                                                         steps)

    def get_conds(self):
        return self.c, self.uc

    def get_conds_with_caching(self, function, required_prompts, steps, caches, extra_network_data,
                               hires_steps=None):
        key = (tuple(required_prompts), steps, hires_steps, id(shared.sd_model))  # the WebUI keys on the checkpoint
        for cache in caches:
            if cache[0] == key:
                return cache[1]
        value = function(shared.sd_model, required_prompts, steps, hires_steps, False)
        caches[0][0], caches[0][1] = key, value
        return value


def _texts(p, prompts, negative=False):
    return prompt_parser.SdConditioning(list(prompts), is_negative_prompt=negative, width=p.width, height=p.height)


def _all(value, count):
    return list(value) if isinstance(value, list) else [value] * count


def process_images(p: FakeProcessing, script, args, runner_hooks=True):
    """Sample every batch of `p` with `script` hooked in; returns the final latents, one batch after another."""
    total = p.batch_size * p.n_iter
    p.all_prompts, p.all_negative_prompts = _all(p.prompt, total), _all(p.negative_prompt, total)
    p.all_hr_negative_prompts = _all(p.negative_prompt if p.hr_negative_prompt is None else p.hr_negative_prompt,
                                     total)
    script.process(p, *args)
    outputs = []
    for n in range(p.n_iter):
        batch = slice(n * p.batch_size, (n + 1) * p.batch_size)
        p.prompts, p.negative_prompts = p.all_prompts[batch], p.all_negative_prompts[batch]
        p.hr_negative_prompts = p.all_hr_negative_prompts[batch]
        config = sd_samplers.find_sampler_config(p.sampler_name)
        p.firstpass_steps = config.total_steps(p.steps)
        p.c = prompt_parser.get_multicond_learned_conditioning(shared.sd_model, _texts(p, p.prompts),
                                                               p.firstpass_steps)
        p.uc = prompt_parser.get_learned_conditioning(shared.sd_model, _texts(p, p.negative_prompts, True),
                                                      p.firstpass_steps)
        generator = torch.Generator().manual_seed(p.seed + n)
        noise = torch.randn([p.batch_size, 4, p.height // 8, p.width // 8], generator=generator)
        image_cond = _image_cond(p, noise)
        p.sampler = sd_samplers.create_sampler(p.sampler_name, shared.sd_model)
        script.process_before_every_sampling(p, *args, x=noise, noise=noise, c=p.c, uc=p.uc)
        if p.init_latent is not None:
            samples = p.sampler.sample_img2img(p, p.init_latent, noise, p.c, p.uc, image_conditioning=image_cond)
        else:
            samples = p.sampler.sample(p, noise, p.c, p.uc, image_conditioning=image_cond)
        if p.enable_hr:
            samples = _hires_pass(p, script, args, samples)
        outputs.append(samples)
    p.gcfg_generation_seen = getattr(p, "gcfg_generation", None)
    script.postprocess(p, SimpleNamespace(images=outputs), *args)
    return torch.cat(outputs)


def _image_cond(p, latent):
    if shared.sd_model.model.conditioning_key == "hybrid":
        return torch.full([latent.shape[0], 5, *latent.shape[2:]], 0.5)
    return latent.new_zeros([latent.shape[0], 5, 1, 1])


def _hires_pass(p, script, args, samples):
    p.is_hr_pass = True
    samples = torch.nn.functional.interpolate(samples, scale_factor=2, mode="nearest")
    hr_prompts = _all(p.hr_prompt or p.prompt, p.batch_size)
    p.hr_prompts = hr_prompts
    size = dict(width=p.hr_upscale_to_x, height=p.hr_upscale_to_y)
    hr_c = prompt_parser.get_multicond_learned_conditioning(
        shared.sd_model, prompt_parser.SdConditioning(hr_prompts, **size), p.firstpass_steps)
    hr_uc = prompt_parser.get_learned_conditioning(
        shared.sd_model, prompt_parser.SdConditioning(p.hr_negative_prompts, is_negative_prompt=True, **size),
        p.firstpass_steps)
    p.sampler = sd_samplers.create_sampler(p.hr_sampler_name or p.sampler_name, shared.sd_model)
    noise = torch.randn(samples.shape, generator=torch.Generator().manual_seed(p.seed + 100))
    script.process_before_every_sampling(p, *args, x=samples, noise=noise, c=hr_c, uc=hr_uc)
    p.init_latent = None
    out = p.sampler.sample_img2img(p, samples, noise, hr_c, hr_uc, steps=p.hr_second_pass_steps,
                                   image_conditioning=_image_cond(p, samples))
    p.sampler = None
    p.is_hr_pass = False
    return out


def reset_callbacks():
    script_callbacks.clear_callbacks()
