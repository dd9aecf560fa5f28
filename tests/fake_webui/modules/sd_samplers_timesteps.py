"""Timesteps samplers (DDIM): the inner model returns eps, "sigma" is the timestep (§3.1-3.2, §3.6)."""

import torch

from modules import sd_samplers_cfg_denoiser, sd_samplers_common, shared


class CompVisTimestepsDenoiser(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.inner_model = model

    def forward(self, input, timesteps, **kwargs):
        return self.inner_model.apply_model(input, timesteps, **kwargs)


class CFGDenoiserTimesteps(sd_samplers_cfg_denoiser.CFGDenoiser):
    def __init__(self, sampler):
        super().__init__(sampler)
        self.mask_before_denoising = True

    @property
    def inner_model(self):
        if self.model_wrap is None:
            self.model_wrap = CompVisTimestepsDenoiser(shared.sd_model)
        return self.model_wrap


class CompVisSampler(sd_samplers_common.Sampler):
    def __init__(self, funcname, sd_model):
        super().__init__(funcname)
        self.model_wrap_cfg = CFGDenoiserTimesteps(self)
        self.model_wrap = self.model_wrap_cfg.inner_model

    def sample(self, p, x, conditioning, unconditional, steps=None, image_conditioning=None):
        steps = steps or p.steps
        self.initialize(p)
        self.model_wrap_cfg.steps = self.model_wrap_cfg.total_steps = steps
        alphas = shared.sd_model.alphas_cumprod
        timesteps = torch.linspace(999, 0, steps).round().long()
        extra = {"cond": conditioning, "uncond": unconditional, "image_cond": image_conditioning,
                 "cond_scale": p.cfg_scale, "s_min_uncond": getattr(p, "s_min_uncond", 0.0)}
        for i, t in enumerate(timesteps):  # DDIM, eta 0
            eps = self.model_wrap_cfg(x, t.float() * x.new_ones([x.shape[0]]), **extra)
            a_t = alphas[t]
            a_prev = alphas[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.tensor(1.0)
            x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        return x
