"""Sampler base and the refiner switch (webui-internals §3.1, §3.3 step 2), reduced to what the glue meets."""

import torch
from modules import shared


class InterruptedException(BaseException):
    pass


class SamplerData:
    def __init__(self, name, constructor, second_order=False):
        self.name, self.constructor, self.second_order = name, constructor, second_order

    def total_steps(self, steps):
        return steps * 2 if self.second_order else steps


class Sampler:
    def __init__(self, funcname):
        self.funcname = funcname
        self.model_wrap_cfg = None
        self.model_wrap = None
        self.config = None
        self.p = None
        self.last_latent = None
        self.sampler_extra_args = {}
        self.s_min_uncond = 0.0

    def initialize(self, p):
        self.p = p
        self.model_wrap_cfg.p = p
        self.model_wrap_cfg.step = 0
        self.model_wrap_cfg.mask = getattr(p, "mask", None)
        self.model_wrap_cfg.nmask = getattr(p, "nmask", None)
        self.model_wrap_cfg.init_latent = getattr(p, "init_latent", None)
        self.s_min_uncond = getattr(p, "s_min_uncond", 0.0)

    def extra_args(self, p, conditioning, unconditional, image_conditioning):
        self.sampler_extra_args = {"cond": conditioning, "image_cond": image_conditioning, "uncond": unconditional,
                                   "cond_scale": p.cfg_scale, "s_min_uncond": self.s_min_uncond}
        return self.sampler_extra_args

    def launch_sampling(self, steps, func):
        self.model_wrap_cfg.steps = steps
        self.model_wrap_cfg.total_steps = self.config.total_steps(steps)
        shared.state.sampling_steps = steps
        shared.state.sampling_step = 0
        return func()


def apply_refiner(cfg_denoiser, sigma=None):
    """Switch `shared.sd_model` to `p.refiner_model` once the completed ratio reaches `p.refiner_switch_at`: the
    WebUI reloads the weights, re-encodes the prompts (`p.setup_conds`) and drops its inner-model wrapper."""
    p = cfg_denoiser.p
    refiner = getattr(p, "refiner_model", None)
    if refiner is None or shared.sd_model is refiner:
        return False
    completed_ratio = cfg_denoiser.step / cfg_denoiser.total_steps
    if completed_ratio < p.refiner_switch_at:
        return False
    shared.sd_model = refiner
    p.setup_conds()
    cfg_denoiser.update_inner_model()
    return True


def setup_img2img_steps(p, steps=None):
    steps = steps or p.steps
    t_enc = int(min(p.denoising_strength, 0.999) * steps)
    return steps, t_enc


def first_cond_copy(x_out, conds_list):
    return torch.cat([x_out[conds[0][0]:conds[0][0] + 1] for conds in conds_list])
